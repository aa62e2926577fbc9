"""Booster plugin selection (``--plugin``) and the data-parallel layout the sampler needs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from colossal_llama.training.config import TrainConfig
from colossal_llama.utils.errors import UserInputError

CUDA_ONLY_PLUGINS = ("gemini", "gemini_auto")


@dataclass
class ParallelLayout:
    """Which slice of the global batch this rank reads. Tensor-parallel peers share a dp rank (same data)."""

    dp_rank: int
    dp_size: int
    dp_group: Optional[object]  # process group for loss/token all-reduces; None = the default (world) group


def build_plugin(cfg: TrainConfig, cuda: bool):
    """The colossalai plugin for ``cfg.plugin``; ``cfg.mixed_precision`` must be resolved already."""
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
        return GeminiPlugin(precision=precision, initial_scale=2**16, max_norm=max_norm, placement_policy=placement,
                            enable_flash_attention=False)
    if cfg.zero_stage > 0 and precision == "fp32":
        raise UserInputError(f"--plugin 3d --zero_stage {cfg.zero_stage} needs --mixed_precision bf16/fp16 "
                             "(colossalai's ZeRO keeps fp32 master weights itself); use --zero_stage 0 for fp32")
    world = dist.get_world_size()
    if world % (cfg.tp * cfg.pp):
        raise UserInputError(f"--tp {cfg.tp} x --pp {cfg.pp} does not divide the {world} ranks")
    return HybridParallelPlugin(tp_size=cfg.tp, pp_size=cfg.pp, zero_stage=cfg.zero_stage, precision=precision,
                                initial_scale=2**16, max_norm=max_norm, overlap_communication=overlap,
                                enable_flash_attention=False, enable_fused_normalization=False)


def parallel_layout(plugin) -> ParallelLayout:
    """dp rank/size for the sampler: the world for ddp/zero/gemini, the plugin's dp group for 3d."""
    group = getattr(plugin, "dp_group", None)
    if group is not None:
        return ParallelLayout(dist.get_rank(group), dist.get_world_size(group), group)
    return ParallelLayout(dist.get_rank(), dist.get_world_size(), None)


def ddp_mixed_precision(cfg: TrainConfig) -> Optional[str]:
    """For ddp the Booster handles fp16 (grad scaler, CUDA); bf16 runs under autocast in the step loop."""
    return "fp16" if cfg.plugin == "ddp" and cfg.mixed_precision == "fp16" else None
