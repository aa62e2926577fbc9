"""Every per-plugin decision in one place: :func:`build_parallel` turns ``--plugin`` and friends into a
:class:`Parallelism` that the step loop and the checkpointer read (no ``cfg.plugin == ...`` elsewhere)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from colossal_llama.training.config import TrainConfig, sequence_parallel
from colossal_llama.utils.errors import UserInputError

log = logging.getLogger(__name__)

CUDA_ONLY_PLUGINS = ("gemini", "gemini_auto")
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ParallelLayout:
    """Which slice of the global batch this rank reads. Tensor-parallel peers share a dp rank (same data)."""

    dp_rank: int
    dp_size: int
    dp_group: Optional[object]  # process group for loss/token all-reduces; None = the default (world) group


@dataclass
class Parallelism:
    """The colossalai plugin and what follows from it for the step loop and for checkpoints."""

    plugin: object  # colossalai.booster.plugin.*
    layout: ParallelLayout
    booster_mixed_precision: Optional[str]  # what Booster(mixed_precision=...) takes (ddp + fp16 only)
    clip_in_step_loop: bool  # ddp: clip in the loop; ZeRO / gemini / 3d optimizers clip inside step() (max_norm)
    loss_scaling: bool  # fp16: the optimizer skips a step whose gradients overflow, so an infinite norm is normal
    no_sync_while_accumulating: bool  # skip gradient synchronisation on all but the last micro-batch (ddp; 3d
    # with ZeRO 0/1, where it also keeps colossalai from re-reducing sequence-parallel partial gradients, already
    # reduced, at every micro-batch)
    autocast_dtype: Optional[torch.dtype]  # ddp + bf16 runs under autocast; the other plugins cast the model
    params_replicated: bool  # every rank holds the full model (ddp, ZeRO-1/2): rank 0 can write it alone
    lazy_init: bool  # 3d / gemini shard the parameters: the model is built without memory (LazyInitContext), each
    # rank materialises its part at boost, and the weights are read in after (never the whole model in a process)
    param_dtype: torch.dtype  # what the model is built in (:func:`param_dtype`)
    build_on_device: bool  # the model is built on this rank's accelerator (lazily, or read there whole by ddp and
    # ZeRO on CUDA: host memory then holds one weight file at a time); else read whole into host memory
    optimizer_replicated: bool  # ddp: one optimizer.bin from rank 0; else colossalai's per-rank shards + index
    saves_master_weights: bool  # bf16/fp16 under zero2 or 3d: the optimizer's fp32 masters go into checkpoints
    # (:mod:`~colossal_llama.training.master_weights`); ddp trains the fp32 weights themselves
    pipeline_microbatch_size: int  # --pp > 1: batches go through booster.execute_pipeline (1F1B) in micro-batches
                                   # of this size; 0 without pipeline parallelism
    reports_loss: bool  # this rank's loss counts in the step loss (last pipeline stage, first tp/sp rank)
    sequence_multiple: int  # padded sequence lengths must divide by this (sequence parallelism splits them)
    additive_mask_dtype: Optional[torch.dtype]  # sequence parallelism: colossalai's attention adds the mask
    dense_mask_only: bool  # pipeline / sequence parallelism: colossalai's forwards take a dense mask, nothing else
    forwards_are_collective: bool  # gemini shards the parameters (ZeRO-3): every forward, inference too,
    # all-gathers them over the dp ranks, so every dp rank must run as many forwards as the others
    first_iteration_trains: bool  # gemini_auto: its memory tracer's warm-up must be a training iteration, so no
    # forward-only pass (validation) may come first in a process
    forward_is_the_models: bool  # the model's own (transformers) forward runs and computes the loss; tensor,
    # pipeline and sequence parallelism replace it with colossalai's (vocabulary-parallel cross-entropy)

    @property
    def plugin_class(self) -> str:
        return type(self.plugin).__name__

    @property
    def cpu_offload(self) -> bool:
        """Whether the built plugin keeps the optimizer states in host memory (zero2_cpu, 3d --zero_cpu_offload),
        read from colossalai's object, not from the flags."""
        config = getattr(self.plugin, "zero_optim_kwargs", None) or getattr(self.plugin, "zero_config", None) or {}
        return bool(config.get("cpu_offload", False))

    @property
    def sizes(self) -> dict:
        """What the built plugin really splits over: tensor- and pipeline-parallel sizes, and its sequence-parallel
        mode (None when off) and size (read from colossalai's objects, not from the flags)."""
        shard = getattr(self.plugin, "shard_config", None)
        sequence = shard.sequence_parallelism_mode if shard is not None and shard.enable_sequence_parallelism else None
        return {"tp_size": getattr(self.plugin, "tp_size", 1), "pp_size": getattr(self.plugin, "pp_size", 1),
                "sequence_parallelism": sequence, "sp_size": getattr(self.plugin, "sp_size", 1) if sequence else 1}


def _plugin(cfg: TrainConfig, cuda: bool):
    from colossalai.booster.plugin import GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin

    if cfg.plugin in CUDA_ONLY_PLUGINS and not cuda:
        raise UserInputError(f"--plugin {cfg.plugin} needs CUDA (HybridAdam, chunk manager); on CPU use ddp, zero2 or 3d")
    precision = cfg.mixed_precision
    max_norm = cfg.grad_clip
    # Stream/event overlap needs CUDA streams; on CPU the reduce happens in line (same numbers, less overlap).
    overlap = cuda
    if cfg.plugin == "ddp":
        return TorchDDPPlugin(find_unused_parameters=False)
    if cfg.plugin in ("zero2", "zero2_cpu"):
        return LowLevelZeroPlugin(stage=2, precision=precision, initial_scale=2**16, max_norm=max_norm,
                                  cpu_offload=cfg.plugin == "zero2_cpu", overlap_communication=overlap)
    if cfg.plugin in ("gemini", "gemini_auto"):
        placement = "auto" if cfg.plugin == "gemini_auto" else "static"
        # Without gradient accumulation gemini reuses the fp16 chunk for the gradient and copies (not adds) each
        # micro-batch's into it: with --accumulation_steps > 1 only the last micro-batch would be trained on.
        return GeminiPlugin(precision=precision, initial_scale=2**16, max_norm=max_norm, placement_policy=placement,
                            enable_flash_attention=False,
                            enable_gradient_accumulation=cfg.accumulation_steps > 1)
    if cfg.sp_mode == "ring_attn" and sequence_parallel(cfg):
        # colossalai's ring attention asserts flash attention in its shardformer and takes a 2-D padding mask:
        # neither fits packed rows, whose document boundaries need the block mask (or FlexAttention)
        raise UserInputError("--sp_mode ring_attn is not supported (colossalai's ring attention cannot keep packed "
                             "documents apart); use all_to_all (--sp), or split_gather / ring (with --tp)")
    if cfg.sp_mode == "ring" and sequence_parallel(cfg):
        log.warning("--sp_mode ring: measured on CPU, its gradients differ from ddp's by about 0.2%% from the "
                    "first step (colossalai 0.5.0); split_gather has the same layout and matches ddp")
    if cfg.zero_stage > 0 and precision == "fp32":
        raise UserInputError(f"--plugin 3d --zero_stage {cfg.zero_stage} needs --mixed_precision bf16/fp16 "
                             "(colossalai's ZeRO keeps fp32 master weights itself); use --zero_stage 0 for fp32")
    if math.prod(_heads_splits(cfg)) > 1:  # the model's config read only where the heads are split
        check_heads_split(cfg, _model_config(cfg))
    world = dist.get_world_size()
    sp = cfg.sp if sequence_parallel(cfg) and cfg.sp_mode in ("all_to_all", "ring_attn") else 1
    if world % (cfg.tp * cfg.pp * sp):
        raise UserInputError(f"--tp {cfg.tp} x --pp {cfg.pp} x --sp {sp} does not divide the {world} ranks")
    # the 1F1B schedule caches the first activation shape it sends unless told not to: with --padding_mode longest
    # the next batch of another width failed in a later stage (a size mismatch in rotary embeddings)
    pipeline = ({"microbatch_size": cfg.microbatch_size, "pp_style": "1f1b", "enable_metadata_cache": False}
                if cfg.pp > 1 else {})
    sequence = ({"enable_sequence_parallelism": True, "sequence_parallelism_mode": cfg.sp_mode, "sp_size": sp}
                if sequence_parallel(cfg) else {})
    return HybridParallelPlugin(tp_size=cfg.tp, pp_size=cfg.pp, zero_stage=cfg.zero_stage, precision=precision,
                                initial_scale=2**16, max_norm=max_norm, overlap_communication=overlap,
                                cpu_offload=cfg.zero_cpu_offload, enable_flash_attention=False,
                                enable_fused_normalization=False, **pipeline, **sequence)


def _model_config(cfg: TrainConfig):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(cfg.pretrained)


def _heads_splits(cfg: TrainConfig) -> tuple[int, int]:
    """``(tp, sp)`` that split the attention heads: tensor parallelism always; sequence parallelism only in
    all_to_all mode (which trades the sequence split for a head split inside attention; split_gather and ring
    split the sequence alone)."""
    sp = cfg.sp if sequence_parallel(cfg) and cfg.sp_mode == "all_to_all" else 1
    return cfg.tp, sp


def check_heads_split(cfg: TrainConfig, model_config) -> None:
    """Refuse a ``--tp`` / ``--sp`` (all_to_all) the model's attention heads and key/value heads do not divide by.

    colossalai 0.5.0 asserts ``heads % tp == 0`` and ``kv_heads % tp == 0`` (kv_heads >= tp) in its LLaMA policy
    at boost, after the model is built, with a traceback on every rank; all_to_all divides both by ``sp`` first
    without a check and fails at the first forward (a view of a fraction of a head). Both splits divide the heads
    in turn, so their product must divide both counts. ``--pp`` needs nothing here: colossalai gives a stage with
    no decoder layer (more stages than layers) nothing to do, and trains (measured: 3 stages, 2 layers)."""
    tp, sp = _heads_splits(cfg)
    heads = getattr(model_config, "num_attention_heads", None)
    if tp * sp == 1 or heads is None:
        return
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    if heads % (tp * sp) or kv_heads % (tp * sp):
        raise _heads_error(tp, sp, heads, kv_heads)


def _heads_error(tp: int, sp: int, heads: int, kv_heads: int) -> UserInputError:
    counts = f"the model's {heads} attention heads" + (f" ({kv_heads} key/value heads)" if kv_heads != heads else "")
    both = "both" if kv_heads != heads else "them"
    common = math.gcd(heads, kv_heads)
    fits = _or_list([d for d in range(1, common + 1) if common % d == 0])
    sp_flag = f"--sp {sp} (--sp_mode all_to_all)"
    if sp == 1:
        return UserInputError(f"--tp {tp}: {counts} do not divide by it; use a --tp that divides {both} ({fits})")
    if tp == 1:
        return UserInputError(f"{sp_flag}: {counts} do not divide by it; use an --sp that divides {both} ({fits})")
    return UserInputError(f"--tp {tp} with {sp_flag}: each splits the attention heads, and {counts} do not divide "
                          f"by {tp} x {sp} = {tp * sp}; use a --tp x --sp that divides {both} ({fits})")


def _or_list(values: list) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _layout(plugin) -> ParallelLayout:
    """dp rank/size for the sampler: the world for ddp/zero/gemini, the plugin's dp group for 3d."""
    group = getattr(plugin, "dp_group", None)
    if group is not None:
        return ParallelLayout(dist.get_rank(group), dist.get_world_size(group), group)
    return ParallelLayout(dist.get_rank(), dist.get_world_size(), None)


def _reports_loss(plugin) -> bool:
    """Pipeline: only the last stage has the loss. Tensor/sequence-parallel peers compute the same loss once each:
    only their first rank reports it, so summing over the world counts every data-parallel replica once."""
    stage_manager = getattr(plugin, "stage_manager", None)
    if stage_manager is not None and not stage_manager.is_last_stage():
        return False
    for group_name in ("tp_group", "sp_group"):
        group = getattr(plugin, group_name, None)
        if group is not None and dist.get_rank(group) != 0:
            return False
    return True


def param_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the model is built in: ``--mixed_precision`` (resolved), except under ddp, which autocasts over
    fp32 weights. ZeRO, gemini and 3d cast the whole module to their precision when they boost it and copy their
    fp32 master weights from that cast, so building it in the precision gives the same numbers (bit for bit) with
    half the memory of fp32 (and nothing to cast)."""
    return torch.float32 if cfg.plugin == "ddp" else PRECISION_DTYPES[cfg.mixed_precision]


def build_parallel(cfg: TrainConfig, cuda: bool) -> Parallelism:
    """The plugin for ``cfg`` and its consequences; ``cfg.mixed_precision`` must be resolved already and the
    process group initialised."""
    plugin = _plugin(cfg, cuda)
    layout = _layout(plugin)
    ddp = cfg.plugin == "ddp"
    replicated = cfg.plugin in ("ddp", "zero2", "zero2_cpu")
    lazy = cfg.lazy_init and not replicated
    return Parallelism(
        plugin=plugin,
        layout=layout,
        booster_mixed_precision="fp16" if ddp and cfg.mixed_precision == "fp16" else None,
        clip_in_step_loop=ddp,
        loss_scaling=cfg.mixed_precision == "fp16",
        no_sync_while_accumulating=ddp or (cfg.plugin == "3d" and cfg.zero_stage < 2),
        autocast_dtype=torch.bfloat16 if ddp and cfg.mixed_precision == "bf16" else None,
        params_replicated=replicated,
        lazy_init=lazy,
        param_dtype=param_dtype(cfg),
        build_on_device=lazy or (cuda and replicated),
        optimizer_replicated=ddp,
        saves_master_weights=cfg.mixed_precision != "fp32" and cfg.plugin in ("zero2", "zero2_cpu", "3d"),
        pipeline_microbatch_size=cfg.microbatch_size if cfg.pp > 1 else 0,
        reports_loss=_reports_loss(plugin),
        forwards_are_collective=cfg.plugin in ("gemini", "gemini_auto"),
        first_iteration_trains=cfg.plugin == "gemini_auto",
        sequence_multiple=max(cfg.tp, cfg.sp) if sequence_parallel(cfg) else 1,
        additive_mask_dtype=PRECISION_DTYPES[cfg.mixed_precision] if sequence_parallel(cfg) else None,
        dense_mask_only=cfg.pp > 1 or sequence_parallel(cfg),
        forward_is_the_models=not (cfg.tp > 1 or cfg.pp > 1 or sequence_parallel(cfg)),
    )
