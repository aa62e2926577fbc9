"""Training configuration: :class:`TrainConfig` *is* the ``train.py`` command line.

Every field carries its flag's help text, older spellings (the README's aliases) and choices in its metadata;
:func:`build_parser` derives argparse from the fields, so a default is written exactly once. Facts that depend
on the data, the machine or the plugin (steps, warm-up, precision, attention, dp size) are not flags: they live in
the typed :class:`colossal_llama.training.plan.RunPlan`, and both are written to ``--config_file``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from colossal_llama.utils.cli import OneLineErrorParser, add_flags, flag
from colossal_llama.utils.errors import UserInputError

PLUGINS = ("gemini", "gemini_auto", "zero2", "zero2_cpu", "3d", "ddp")
# fp32 is not in the README; it is what CPU runs use (fp16 needs CUDA) and what exactness tests compare.
PRECISIONS = ("fp16", "bf16", "fp32")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_PLUGINS = ("ddp", "zero2", "zero2_cpu")
SP_MODES = ("split_gather", "ring", "all_to_all", "ring_attn")
ATTENTION_CHOICES = ("auto", "flash", "flex", "sdpa")  # see colossal_llama.training.attention
WARMUP_FRACTION = 0.025  # README: warm-up defaults to 2.5% of the optimizer steps
# never stop signals: SIGKILL and SIGSTOP cannot be caught, and SIGINT (Ctrl-C) keeps meaning "stop now"
NOT_STOP_SIGNALS = ("SIGKILL", "SIGSTOP", "SIGINT")


def parse_signal_names(text: str) -> List[str]:
    """``--stop_signals SIGTERM,SIGUSR1`` (also ``term,usr1``) -> canonical names; ``none`` or empty: off."""
    names: List[str] = []
    for word in (w.strip().upper() for w in text.split(",")):
        if not word or word == "NONE":
            continue
        name = word if word.startswith("SIG") else f"SIG{word}"
        if name in NOT_STOP_SIGNALS or name not in signal.Signals.__members__:
            raise UserInputError(f"--stop_signals {text}: {word} is not a signal to stop on (e.g. SIGTERM,SIGUSR1; "
                                 "none turns the clean stop off)")
        if name not in names:
            names.append(name)
    return names


@dataclass
class TrainConfig:
    """Everything the user asks of one training run. Batch sizes are per data-parallel rank.

    One optimizer step consumes ``batch_size * accumulation_steps * dp_size`` sequences (the global batch).
    """

    pretrained: str = flag(help="HF model folder (config, weights, tokenizer)")
    dataset: List[str] = flag([], help="prepared data: OUT (or its shards), OUT/arrow or OUT/arrow/part-XXXXX, "
                                       "several allowed, each optionally DIR:WEIGHT (a replay mixture: WEIGHT is its "
                                       "share of every bucket); required unless --benchmark")
    category_weights: Optional[str] = flag(None, help="replay mixture by category, e.g. news=1,novel=0.2: shares "
                                                      "within each --dataset entry (every category needs one)")
    eval_dataset: List[str] = flag([], help="held-out prepared data for validation (same forms as --dataset, or "
                                            "OUT/eval); default: the held-out split of each --dataset that has one")
    eval_interval: int = flag(0, help="validate every N steps (0: every --save_interval steps); also before the "
                                      "first step and after the last")
    eval_batches: int = flag(100, help="validation batches of --batch_size rows, categories taking turns (0: no "
                                       "validation)")
    plugin: str = flag("gemini", choices=PLUGINS, help="booster plugin")
    load_checkpoint: Optional[str] = flag(
        None, help="full checkpoint dir (resume), a modeling/ dir (weights only: next stage), or 'latest'")
    overwrite: bool = flag(False, help="start afresh in a --save_dir that holds an earlier run (its checkpoints, "
                                       "modeling/ and logs are deleted first)")
    save_interval: int = flag(1000, help="save a checkpoint every N optimizer steps")
    keep_last_k: Optional[int] = flag(None, help="keep only the newest K complete checkpoints (older ones are "
                                                 "deleted once a newer one is complete; modeling/ is never touched)")
    async_save: bool = flag(False, help="write optimizer states in the background (CUDA, colossalai's async writer "
                                        "from the tensornvme package); a checkpoint still counts only once complete")
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
    lazy_init: bool = flag(True, help="3d and gemini: build the model without memory and materialise only each rank's "
                                      "part, then read the weights in (False: every rank first reads the whole model "
                                      "into host memory); ddp and zero2 always read it whole (on CUDA straight onto "
                                      "the GPU)")
    tp: int = flag(1, help="tensor-parallel size (3d plugin)")
    pp: int = flag(1, help="pipeline-parallel size (3d plugin; 1F1B schedule)")
    microbatch_size: int = flag(1, help="pipeline micro-batch size: each --batch_size batch is cut into "
                                        "batch_size / microbatch_size pipeline micro-batches (--pp > 1)")
    sp: int = flag(1, help="sequence-parallel size (3d plugin; all_to_all and ring_attn modes; split_gather and "
                           "ring use the tensor-parallel group)")
    sp_mode: str = flag("split_gather", choices=SP_MODES, help="sequence-parallelism mode (3d plugin)")
    enable_sequence_parallelism: bool = flag(False, help="turn sequence parallelism on (implied by --sp > 1)")
    zero_stage: int = flag(1, aliases=("--zero",), choices=(0, 1, 2), help="ZeRO stage for the 3d plugin")
    zero_cpu_offload: bool = flag(False, help="3d plugin with --zero_stage > 0: optimizer states in host memory")
    use_neft: bool = flag(False, aliases=("--use_neftune",),
                          help="NEFTune: uniform noise on input embeddings while training")
    neft_alpha: float = flag(0.1, help="NEFTune noise scale: U(-a, a) with a = alpha / sqrt(seq_len * hidden); "
                                       "0.1 as the original (the NEFTune paper used 5 to 15)")
    seed: int = flag(42, help="seed of the data order, the model's RNG and NEFTune's noise")
    dist_timeout_minutes: Optional[float] = flag(
        None, help="how long a rank waits for the others in a collective before the job fails, in every process "
                   "group (the world's and the plugin's tp/pp/dp groups); default torch's: 10 minutes on NCCL, 30 on "
                   "gloo. Raise it when one rank may work alone for longer (writing a large checkpoint to a slow "
                   "filesystem)")
    shuffle_buckets: bool = flag(False, help="shuffle all sequences globally instead of walking buckets in order")
    max_steps: Optional[int] = flag(None, help="stop after this many optimizer steps")
    log_interval: int = flag(10, help="log a line every N optimizer steps")
    padding_mode: str = flag("longest", choices=("longest", "max_length"), help="pad micro-batches to")
    lora_rank: int = flag(0, help="LoRA adapters of this rank on --lora_target_modules (0: train all weights)")
    lora_alpha: float = flag(32.0, help="LoRA scaling numerator (the update is alpha / rank x B A)")
    lora_dropout: float = flag(0.05, help="dropout on the LoRA branch while training")
    lora_target_modules: List[str] = flag(list(LORA_TARGETS), help="module names that get adapters")
    lora_train_embeddings: str = flag("auto", choices=("auto", "on", "off"),
                                      help="with --lora_rank: train embed_tokens and lm_head in full; auto = when "
                                           "init_model.py expanded the vocabulary of --pretrained")
    pad_token: str = flag("eos", choices=("eos", "unk"), help="token id that pads micro-batches (never attended "
                                                               "to, never trained on)")
    skip_save_each_epoch: bool = flag(False, help="no checkpoint at the end of every epoch (only every "
                                                  "--save_interval steps and at the end)")
    benchmark: bool = flag(False, help="measure throughput on --num_samples random sequences of --max_length tokens "
                                       "(no dataset, no checkpoints): tokens/s, MFU and peak memory every step")
    stop_signals: List[str] = flag(
        ["SIGTERM", "SIGUSR1", "SIGHUP"], parse=parse_signal_names,
        help="signals that stop the run cleanly (comma-separated; none: off; SIGHUP: the terminal of the launch was "
             "lost): the step in flight finishes, every rank "
             "stops at the same step, saves a checkpoint and exits with 128 + the signal's number; resume with "
             "--load_checkpoint latest. torchrun forwards SIGTERM to every rank and kills them "
             "TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later (default 30): set it to cover a step and a checkpoint save")
    rank_silence_s: float = flag(
        60.0, help="a rank whose heartbeat has been silent this many seconds, while the others' training stood still "
                   "as long, is taken for dead (or its machine for hung) and the others leave at once instead of "
                   "waiting out the collective timeout: with exit code 75, which torchrun --max_restarts restarts "
                   "(from the newest checkpoint with --load_checkpoint latest), or, after a stop signal (torchrun "
                   "sends SIGTERM when a rank died), with the signal's code and no checkpoint of the step in flight; "
                   "0: off (while debugging a rank)")
    num_samples: int = flag(500, help="sequences of the --benchmark dataset")
    liger: str = flag("auto", choices=("auto", "on", "off"),
                      help="Liger fused kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) on CUDA; "
                           "auto = when liger_kernel is installed")
    loss_chunk_tokens: Optional[int] = flag(
        None, help="the loss runs the LM head on scored positions only, this many at a time, recomputing each chunk's "
                   "logits in the backward pass (never the whole (tokens x vocab) logits); default: a chunk's float32 "
                   "logits take 256 MiB (523 positions at a 128k vocabulary); 0: transformers' loss over the full "
                   "logits. Not with Liger (its fused loss chunks itself) nor --tp/--pp/--sp (colossalai's loss)")


def build_parser() -> argparse.ArgumentParser:
    """argparse derived from :class:`TrainConfig`'s fields (names, defaults, help, aliases, choices)."""
    parser = OneLineErrorParser(
        prog="train.py", description="Continual pre-training / SFT of a LLaMA-family model with a booster plugin.")
    add_flags(parser, TrainConfig)
    return parser


def parse_config(argv: Optional[List[str]] = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Flag-level checks that need no data and no model. Raises :class:`UserInputError`."""
    positive = ("save_interval", "num_epochs", "batch_size", "accumulation_steps", "max_length", "tp", "pp", "sp",
                "microbatch_size", "log_interval", "num_samples")
    for name in ("eval_interval", "eval_batches"):
        if getattr(cfg, name) < 0:
            raise UserInputError(f"--{name} {getattr(cfg, name)}: must be >= 0")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UserInputError(f"--{name} {getattr(cfg, name)}: must be >= 1")
    if cfg.lr <= 0:
        raise UserInputError(f"--lr {cfg.lr}: must be > 0")
    if cfg.dist_timeout_minutes is not None and not cfg.dist_timeout_minutes > 0:
        raise UserInputError(f"--dist_timeout_minutes {cfg.dist_timeout_minutes}: must be > 0")
    if cfg.rank_silence_s < 0:
        raise UserInputError(f"--rank_silence_s {cfg.rank_silence_s}: must be >= 0 (0: off)")
    if cfg.loss_chunk_tokens is not None and cfg.loss_chunk_tokens < 0:
        raise UserInputError(f"--loss_chunk_tokens {cfg.loss_chunk_tokens}: must be >= 0 (0: transformers' loss)")
    if cfg.keep_last_k is not None and cfg.keep_last_k < 1:
        raise UserInputError(f"--keep_last_k {cfg.keep_last_k}: must be >= 1 (leave it out to keep every checkpoint)")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UserInputError(f"--max_steps {cfg.max_steps}: must be >= 1")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise UserInputError(f"--warmup_steps {cfg.warmup_steps}: must be >= 0")
    if cfg.grad_clip < 0:
        raise UserInputError(f"--grad_clip {cfg.grad_clip}: must be >= 0 (0 disables clipping)")
    _validate_parallelism(cfg)
    _validate_lora(cfg)
    if not cfg.dataset and not cfg.benchmark:
        raise UserInputError("--dataset is required (prepared data from prepare_pretrain_dataset.py / "
                             "prepare_sft_dataset.py), unless --benchmark")
    if not Path(cfg.pretrained).is_dir():
        raise UserInputError(f"--pretrained {cfg.pretrained}: model directory does not exist")
    if Path(cfg.save_dir).exists() and not Path(cfg.save_dir).is_dir():
        raise UserInputError(f"--save_dir {cfg.save_dir}: exists and is not a directory")


def sequence_parallel(cfg: TrainConfig) -> bool:
    return cfg.enable_sequence_parallelism or cfg.sp > 1


def validation_interval(cfg: TrainConfig) -> int:
    """Steps between validations: ``--eval_interval``, else ``--save_interval``."""
    return cfg.eval_interval or cfg.save_interval


def _validate_parallelism(cfg: TrainConfig) -> None:
    """Combinations colossalai would reject with an assertion deep inside the plugin, as one-line errors."""
    if cfg.plugin != "3d":
        for name, value in (("tp", cfg.tp), ("pp", cfg.pp), ("sp", cfg.sp)):
            if value > 1:
                raise UserInputError(f"--{name} {value}: tensor/pipeline/sequence parallelism needs --plugin 3d")
        if cfg.enable_sequence_parallelism or cfg.zero_cpu_offload:
            flag_name = "--enable_sequence_parallelism" if cfg.enable_sequence_parallelism else "--zero_cpu_offload"
            raise UserInputError(f"{flag_name} needs --plugin 3d (for ZeRO-2 with offload use --plugin zero2_cpu)")
        return
    if cfg.pp > 1:
        if cfg.accumulation_steps != 1:
            raise UserInputError(f"--accumulation_steps {cfg.accumulation_steps} with --pp {cfg.pp}: the pipeline "
                                 "accumulates over its micro-batches; give the per-step batch with --batch_size and "
                                 "its pipeline split with --microbatch_size")
        if cfg.batch_size % cfg.microbatch_size:
            raise UserInputError(f"--batch_size {cfg.batch_size} is not a multiple of --microbatch_size "
                                 f"{cfg.microbatch_size}")
    if sequence_parallel(cfg):
        if cfg.sp_mode in ("split_gather", "ring") and cfg.tp < 2:
            raise UserInputError(f"--sp_mode {cfg.sp_mode} splits sequences over the tensor-parallel group: it "
                                 "needs --tp 2 or more (--sp is ignored); all_to_all uses --sp ranks of its own")
        if cfg.sp_mode in ("split_gather", "ring") and cfg.zero_stage == 2 and cfg.accumulation_steps > 1:
            raise UserInputError(f"--sp_mode {cfg.sp_mode} with --zero_stage 2 and --accumulation_steps "
                                 f"{cfg.accumulation_steps}: colossalai re-reduces the sequence-parallel partial "
                                 "gradients at every micro-batch (over-counting them); use --zero_stage 1 or "
                                 "--accumulation_steps 1 with a larger --batch_size")
        if cfg.sp_mode in ("split_gather", "ring") and cfg.sp > 1:
            raise UserInputError(f"--sp {cfg.sp} with --sp_mode {cfg.sp_mode}: this mode uses the tensor-parallel "
                                 "group (--tp); leave --sp at 1 or use --sp_mode all_to_all")
    if cfg.zero_cpu_offload and cfg.zero_stage == 0:
        raise UserInputError("--zero_cpu_offload needs --zero_stage 1 or 2")


def _validate_lora(cfg: TrainConfig) -> None:
    if cfg.lora_rank < 0:
        raise UserInputError(f"--lora_rank {cfg.lora_rank}: must be >= 0 (0 turns LoRA off)")
    if cfg.lora_rank == 0:
        return
    if cfg.plugin not in LORA_PLUGINS:
        raise UserInputError(f"--lora_rank with --plugin {cfg.plugin}: LoRA runs with {', '.join(LORA_PLUGINS)}")
    if cfg.freeze_non_embeds_params:
        raise UserInputError("--lora_rank and --freeze_non_embeds_params both choose what trains: give one of them")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserInputError(f"--lora_dropout {cfg.lora_dropout}: must be in [0, 1)")


def resolve_for_device(cfg: TrainConfig, cuda: bool) -> TrainConfig:
    """What depends on the machine: ``--mixed_precision`` defaults to bf16 on CUDA, fp32 on CPU (fp16 on CPU is
    refused, not downgraded); ``--async_save`` needs CUDA and tensornvme."""
    precision = cfg.mixed_precision or ("bf16" if cuda else "fp32")
    if precision == "fp16" and not cuda:
        raise UserInputError("--mixed_precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    if cfg.async_save and not cuda:
        raise UserInputError("--async_save needs CUDA (colossalai writes from pinned host memory); leave it out on CPU")
    if cfg.async_save and importlib.util.find_spec("tensornvme") is None:
        raise UserInputError("--async_save needs the tensornvme package (colossalai's async file writer): "
                             "pip install git+https://github.com/hpcaitech/TensorNVMe.git, or leave the flag out")
    return dataclasses.replace(cfg, mixed_precision=precision)


def resolve_warmup(cfg: TrainConfig, total_steps: int) -> TrainConfig:
    """``--warmup_steps`` default: 2.5% of the optimizer steps."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(WARMUP_FRACTION * total_steps)
    return dataclasses.replace(cfg, warmup_steps=warmup)
