"""Training configuration: :class:`TrainConfig` *is* the ``train.py`` command line.

Every field carries its flag's help text, older spellings (the README's aliases) and choices in its metadata;
:func:`build_parser` derives argparse from the fields, so a default is written exactly once. Facts that depend
on the data, the machine or the plugin (steps, warm-up, precision, attention, dp size) are not flags: they live in
the typed :class:`colossal_llama.training.plan.RunPlan`, and both are written to ``--config_file``.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from colossal_llama.utils.cli import OneLineErrorParser, str2bool
from colossal_llama.utils.errors import UserInputError

PLUGINS = ("gemini", "gemini_auto", "zero2", "zero2_cpu", "3d", "ddp")
# fp32 is not in the README; it is what CPU runs use (fp16 needs CUDA) and what exactness tests compare.
PRECISIONS = ("fp16", "bf16", "fp32")
ATTENTION_CHOICES = ("auto", "flash", "flex", "sdpa")  # see colossal_llama.training.attention
WARMUP_FRACTION = 0.025  # README: warm-up defaults to 2.5% of the optimizer steps


def flag(default=dataclasses.MISSING, help: str = "", aliases: tuple = (), choices: Optional[tuple] = None,
         required: bool = False, nargs: Optional[str] = None):
    """A :class:`TrainConfig` field that is also a command-line flag ``--<name>`` (plus ``aliases``)."""
    metadata = {"help": help, "aliases": aliases, "choices": choices, "nargs": nargs}
    if default is dataclasses.MISSING:
        return field(metadata={**metadata, "required": True})
    return field(default=default, metadata={**metadata, "required": required})


@dataclass
class TrainConfig:
    """Everything the user asks of one training run. Batch sizes are per data-parallel rank.

    One optimizer step consumes ``batch_size * accumulation_steps * dp_size`` sequences (the global batch).
    """

    pretrained: str = flag(help="HF model folder (config, weights, tokenizer)")
    dataset: List[str] = flag(nargs="+", help="prepared data: OUT, OUT/arrow or OUT/arrow/part-XXXXX (several allowed)")
    plugin: str = flag("gemini", choices=PLUGINS, help="booster plugin")
    load_checkpoint: Optional[str] = flag(
        None, help="full checkpoint dir (resume), a modeling/ dir (weights only: next stage), or 'latest'")
    overwrite: bool = flag(False, help="start afresh in a --save_dir that holds an earlier run (its checkpoints, "
                                       "modeling/ and logs are deleted first)")
    save_interval: int = flag(1000, help="save a checkpoint every N optimizer steps")
    save_dir: str = flag("checkpoints", help="checkpoints, losses.jsonl, train_config.json and the final modeling/")
    tensorboard_dir: Optional[str] = flag(None, help="TensorBoard event files")
    config_file: Optional[str] = flag(None, help="also write the resolved config (and run plan) here as JSON")
    num_epochs: int = flag(1, help="passes over the data")
    batch_size: int = flag(4, aliases=("--micro_batch_size",), help="sequences per micro-batch per data-parallel rank")
    accumulation_steps: int = flag(1, help="micro-batches per optimizer step")
    lr: float = flag(3e-4, help="peak learning rate (linear warm-up, cosine to 0.1 x lr)")
    max_length: int = flag(4096, help="longest sequence in tokens (must cover the prepared data's max_length)")
    mixed_precision: Optional[str] = flag(None, choices=PRECISIONS, help="default bf16 on CUDA, fp32 on CPU")
    grad_clip: float = flag(1.0, aliases=("--gradient_clipping",), help="max gradient norm (0 disables clipping)")
    weight_decay: float = flag(0.1, aliases=("-w",), help="AdamW weight decay (not on norms and biases)")
    warmup_steps: Optional[int] = flag(None, aliases=("-s",), help="default: 2.5%% of the optimizer steps")
    use_grad_checkpoint: bool = flag(False, aliases=("-g",), help="activation (gradient) checkpointing")
    use_flash_attn: bool = flag(False, aliases=("-f",), help="same as --attention flash")
    attention: str = flag("auto", choices=ATTENTION_CHOICES,
                          help="packed-document attention: flash (flash-attn), flex (FlexAttention, CUDA), sdpa (dense "
                               "block mask); auto = flash if installed, else flex on CUDA, else sdpa; flash falls "
                               "back the same way when flash-attn is missing")
    freeze_non_embeds_params: bool = flag(False, help="train only embed_tokens and lm_head")
    tp: int = flag(1, help="tensor-parallel size (3d plugin)")
    pp: int = flag(1, help="pipeline-parallel size (3d plugin)")
    zero_stage: int = flag(1, aliases=("--zero",), choices=(0, 1, 2), help="ZeRO stage for the 3d plugin")
    use_neft: bool = flag(False, aliases=("--use_neftune",),
                          help="NEFTune: uniform noise on input embeddings while training")
    neft_alpha: float = flag(5.0, help="NEFTune noise scale alpha")
    seed: int = flag(42, help="seed of the data order, the model's RNG and NEFTune's noise")
    shuffle_buckets: bool = flag(False, help="shuffle all sequences globally instead of walking buckets in order")
    max_steps: Optional[int] = flag(None, help="stop after this many optimizer steps")
    log_interval: int = flag(10, help="log a line every N optimizer steps")
    padding_mode: str = flag("longest", choices=("longest", "max_length"), help="pad micro-batches to")
    liger: str = flag("auto", choices=("auto", "on", "off"),
                      help="Liger fused kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) on CUDA; "
                           "auto = when liger_kernel is installed")


def _flag_type(annotation):
    """(argparse type, is_bool, is_list) of a field annotation such as ``Optional[int]`` or ``List[str]``."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (list, List):
        return args[0], False, True
    if origin is typing.Union:
        annotation = args[0]
    if annotation is bool:
        return str2bool, True, False
    return annotation, False, False


def build_parser() -> argparse.ArgumentParser:
    """argparse derived from :class:`TrainConfig`'s fields (names, defaults, help, aliases, choices)."""
    parser = OneLineErrorParser(
        prog="train.py", description="Continual pre-training / SFT of a LLaMA-family model with a booster plugin.")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        names = (f"--{f.name}", *meta["aliases"])
        kind, is_bool, is_list = _flag_type(hints[f.name])
        kwargs = {"dest": f.name, "help": meta["help"]}
        if meta["required"]:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        if is_bool:  # ``--flag`` alone means true; ``--flag False`` / ``--flag true`` too (older scripts)
            kwargs.update(nargs="?", const=True, type=str2bool)
        else:
            kwargs.update(type=kind, choices=meta["choices"], nargs="+" if is_list else meta["nargs"])
        parser.add_argument(*names, **kwargs)
    return parser


def parse_config(argv: Optional[List[str]] = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Flag-level checks that need no data and no model. Raises :class:`UserInputError`."""
    positive = ("save_interval", "num_epochs", "batch_size", "accumulation_steps", "max_length", "tp", "pp",
                "log_interval")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UserInputError(f"--{name} {getattr(cfg, name)}: must be >= 1")
    if cfg.lr <= 0:
        raise UserInputError(f"--lr {cfg.lr}: must be > 0")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UserInputError(f"--max_steps {cfg.max_steps}: must be >= 1")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise UserInputError(f"--warmup_steps {cfg.warmup_steps}: must be >= 0")
    if cfg.grad_clip < 0:
        raise UserInputError(f"--grad_clip {cfg.grad_clip}: must be >= 0 (0 disables clipping)")
    if (cfg.tp > 1 or cfg.pp > 1) and cfg.plugin != "3d":
        raise UserInputError(f"--tp {cfg.tp} --pp {cfg.pp}: tensor/pipeline parallelism needs --plugin 3d")
    if cfg.pp > 1:
        raise UserInputError("--pp > 1 is not supported by this trainer yet (use --tp with --plugin 3d)")
    if not Path(cfg.pretrained).is_dir():
        raise UserInputError(f"--pretrained {cfg.pretrained}: model directory does not exist")
    if Path(cfg.save_dir).exists() and not Path(cfg.save_dir).is_dir():
        raise UserInputError(f"--save_dir {cfg.save_dir}: exists and is not a directory")


def resolve_precision(cfg: TrainConfig, cuda: bool) -> TrainConfig:
    """``--mixed_precision`` default: bf16 on CUDA, fp32 on CPU (fp16 on CPU is refused, not downgraded)."""
    precision = cfg.mixed_precision or ("bf16" if cuda else "fp32")
    if precision == "fp16" and not cuda:
        raise UserInputError("--mixed_precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    return dataclasses.replace(cfg, mixed_precision=precision)


def resolve_warmup(cfg: TrainConfig, total_steps: int) -> TrainConfig:
    """``--warmup_steps`` default: 2.5% of the optimizer steps."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(WARMUP_FRACTION * total_steps)
    return dataclasses.replace(cfg, warmup_steps=warmup)
