"""Training configuration: the ``train.py`` flags (with the README's older spellings) and a typed dataclass.

``parse_config(argv)`` is the only place that knows about argparse; everything downstream takes a
:class:`TrainConfig`. Defaults that depend on the data (warm-up length) or the machine (precision) are filled
in later by :func:`resolve`, and the resolved config is what gets written to ``--config_file``.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from colossal_llama.utils.cli import str2bool
from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.json_files import write_json

PLUGINS = ("gemini", "gemini_auto", "zero2", "zero2_cpu", "3d", "ddp")
# fp32 is not in the README; it is what CPU runs use (fp16 needs CUDA) and what exactness tests compare.
PRECISIONS = ("fp16", "bf16", "fp32")
WARMUP_FRACTION = 0.025  # README: warm-up defaults to 2.5% of the optimizer steps


@dataclass
class TrainConfig:
    """Everything one training run needs. Batch sizes are per data-parallel rank.

    One optimizer step consumes ``batch_size * accumulation_steps * dp_size`` sequences (the global batch).
    """

    pretrained: str
    dataset: List[str]
    plugin: str = "gemini"
    load_checkpoint: Optional[str] = None
    save_interval: int = 1000
    save_dir: str = "checkpoints"
    tensorboard_dir: Optional[str] = None
    config_file: Optional[str] = None
    num_epochs: int = 1
    batch_size: int = 4
    accumulation_steps: int = 1
    lr: float = 3e-4
    max_length: int = 4096
    mixed_precision: Optional[str] = None  # None -> bf16 on CUDA, fp32 on CPU (see resolve)
    grad_clip: float = 1.0
    weight_decay: float = 0.1
    warmup_steps: Optional[int] = None  # None -> 2.5% of the optimizer steps
    use_grad_checkpoint: bool = False
    use_flash_attn: bool = False
    freeze_non_embeds_params: bool = False
    tp: int = 1
    pp: int = 1
    zero_stage: int = 1
    use_neft: bool = False
    neft_alpha: float = 5.0
    seed: int = 42
    shuffle_buckets: bool = False
    max_steps: Optional[int] = None
    log_interval: int = 10
    padding_mode: str = "longest"  # "longest" in the batch, or "max_length"
    liger: str = "auto"  # Liger fused kernels: auto = on when CUDA and liger_kernel are present
    extra: dict = field(default_factory=dict)  # resolved facts recorded for the run (attention impl, steps, ...)


def _bool_flag(parser: argparse.ArgumentParser, *names: str, help: str) -> None:
    """``--flag`` alone means true; ``--flag False`` / ``--flag true`` are accepted too (older scripts)."""
    parser.add_argument(*names, nargs="?", const=True, default=False, type=str2bool, help=help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Continual pre-training / SFT of a LLaMA-family model with a booster plugin.")
    p.add_argument("--pretrained", required=True, help="HF model folder (config, weights, tokenizer)")
    p.add_argument("--dataset", nargs="+", required=True, help="prepared OUT/arrow/part-XXXXX dirs, or OUT/arrow")
    p.add_argument("--plugin", default="gemini", choices=PLUGINS)
    p.add_argument("--load_checkpoint", default=None,
                   help="full checkpoint dir (resume), a modeling/ dir (weights only), or 'latest' (newest in save_dir)")
    p.add_argument("--save_interval", type=int, default=1000, help="save a checkpoint every N optimizer steps")
    p.add_argument("--save_dir", default="checkpoints")
    p.add_argument("--tensorboard_dir", default=None)
    p.add_argument("--config_file", default=None, help="write the resolved config here as JSON")
    p.add_argument("--num_epochs", type=int, default=1)
    p.add_argument("--batch_size", "--micro_batch_size", dest="batch_size", type=int, default=4,
                   help="sequences per micro-batch per data-parallel rank")
    p.add_argument("--accumulation_steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max_length", type=int, default=4096)
    p.add_argument("--mixed_precision", default=None, choices=PRECISIONS,
                   help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--grad_clip", "--gradient_clipping", dest="grad_clip", type=float, default=1.0)
    p.add_argument("-w", "--weight_decay", type=float, default=0.1)
    p.add_argument("-s", "--warmup_steps", type=int, default=None, help="default: 2.5%% of the optimizer steps")
    _bool_flag(p, "--use_grad_checkpoint", "-g", help="activation (gradient) checkpointing")
    _bool_flag(p, "--use_flash_attn", "-f", help="flash-attention 2 when importable on CUDA, else sdpa")
    _bool_flag(p, "--freeze_non_embeds_params", help="train only embed_tokens and lm_head")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (3d plugin)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (3d plugin)")
    p.add_argument("--zero_stage", "--zero", dest="zero_stage", type=int, default=1, choices=(0, 1, 2),
                   help="ZeRO stage for the 3d plugin")
    _bool_flag(p, "--use_neft", "--use_neftune", help="NEFTune: uniform noise on input embeddings while training")
    p.add_argument("--neft_alpha", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=42)
    _bool_flag(p, "--shuffle_buckets", help="shuffle all sequences globally instead of walking buckets in order")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--log_interval", type=int, default=10, help="log a line every N optimizer steps")
    p.add_argument("--padding_mode", default="longest", choices=("longest", "max_length"))
    p.add_argument("--liger", default="auto", choices=("auto", "on", "off"),
                   help="Liger fused kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) on CUDA; "
                        "auto = when liger_kernel is installed")
    return p


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


def resolve_precision(cfg: TrainConfig, cuda: bool) -> TrainConfig:
    """``--mixed_precision`` default: bf16 on CUDA, fp32 on CPU (fp16 on CPU is refused, not downgraded)."""
    precision = cfg.mixed_precision or ("bf16" if cuda else "fp32")
    if precision == "fp16" and not cuda:
        raise UserInputError("--mixed_precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    return dataclasses.replace(cfg, mixed_precision=precision)


def resolve_schedule(cfg: TrainConfig, total_steps: int) -> TrainConfig:
    """``--warmup_steps`` default (2.5% of the optimizer steps); records ``total_steps`` in ``extra``."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(WARMUP_FRACTION * total_steps)
    return dataclasses.replace(cfg, warmup_steps=warmup, extra={**cfg.extra, "total_steps": total_steps})


def write_config(cfg: TrainConfig, path: Path) -> None:
    """Atomically write the resolved config as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, dataclasses.asdict(cfg), sort_keys=True)
