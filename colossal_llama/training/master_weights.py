"""The optimizer's fp32 master weights, saved with a checkpoint and put back on resume.

Under bf16/fp16 the ZeRO and 3d optimizers step fp32 copies of the weights (this rank's slices under ZeRO) and
cast them into the half-precision model. A checkpoint's ``modeling/`` holds the cast weights only, and the load
rebuilds the masters from them: every resume dropped the bits below bf16's 8-bit mantissa that the masters had
accumulated, and the resumed run's steps differed from the uninterrupted run's from the first one on. So the
masters are written under the checkpoint's ``optimizer/master-weights/`` (4 bytes a trained parameter in all)
and a resume on the same layout copies them back after the weights and the optimizer states are loaded:

* ZeRO (zero2, 3d ``--zero_stage`` 1/2): each rank holds a slice of its own, written as ``rank-RRRRR.pt``;
* 3d ``--zero_stage 0``: every data- (and sequence-) parallel replica holds the same masters of its tensor- and
  pipeline-parallel part: the lowest rank of each part writes ``tp-TTT_pp-PPP.pt`` once, every replica reads it.

On another layout (world size, tp/pp/sp split, or optimizer: the slices and shapes differ) the masters are rebuilt
from the saved weights as before, and the log says so. gemini keeps its masters in chunks of its own: not covered.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MASTER_DIR = "master-weights"


def _masters_by_name(model, optimizer) -> Dict[str, torch.Tensor]:
    """``{parameter name: this rank's master tensor}`` for every parameter whose master is a separate copy in
    another dtype (empty without mixed precision, under ddp, or with optimizers colossalai keeps no map for)."""
    getter = getattr(optimizer, "get_working_to_master_map", None)
    if getter is None:
        return {}
    masters = getter() or {}  # colossalai's fp32 3d optimizer answers None
    found = {}
    for name, param in model.unwrap().named_parameters():
        master = masters.get(id(param))
        if master is not None and master is not param and master.dtype != param.dtype:
            found[name] = master
    return found


def layout_of(optimizer, parallel) -> dict:
    """What the masters' slices and shapes depend on: the world, its split, and the optimizer holding them."""
    return {"world_size": dist.get_world_size(), **parallel.sizes, "optimizer": type(optimizer).__name__}


def _sharded(optimizer) -> bool:
    from colossalai.zero.low_level import LowLevelZeroOptimizer

    return isinstance(optimizer, LowLevelZeroOptimizer)


def _part_of(plugin) -> tuple[int, int]:
    """(tensor-parallel rank, pipeline stage) of this rank: what its replicated masters are of."""
    tp_group, stages = getattr(plugin, "tp_group", None), getattr(plugin, "stage_manager", None)
    return (dist.get_rank(tp_group) if tp_group is not None else 0, stages.stage if stages is not None else 0)


def _file(directory: Path, optimizer, plugin) -> Path:
    if _sharded(optimizer):
        name = f"rank-{dist.get_rank():05d}.pt"
    else:
        tp, pp = _part_of(plugin)
        name = f"tp-{tp:03d}_pp-{pp:03d}.pt"
    return Path(directory) / MASTER_DIR / name


def _writes(optimizer, plugin) -> bool:
    """Collective: whether this rank writes its masters (ZeRO: every rank; else the lowest rank of each part)."""
    if _sharded(optimizer):
        return True
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, _part_of(plugin))
    return parts.index(parts[dist.get_rank()]) == dist.get_rank()


def save_master_weights(model, optimizer, directory: Path, parallel) -> int:
    """Write this rank's masters under ``directory`` (the checkpoint's ``optimizer/``; collective: every rank calls
    it). Returns the number of tensors this rank wrote."""
    masters = _masters_by_name(model, optimizer)
    if not parallel.saves_master_weights or not _writes(optimizer, parallel.plugin) or not masters:
        return 0
    path = _file(directory, optimizer, parallel.plugin)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"layout": layout_of(optimizer, parallel), "tensors": {n: t.detach().cpu() for n, t in masters.items()}},
               path)
    return len(masters)


def _fits(saved: dict, masters: Dict[str, torch.Tensor], layout: dict) -> bool:
    tensors = saved["tensors"]
    return (saved["layout"] == layout and set(tensors) == set(masters)
            and all(tensors[n].shape == m.shape and tensors[n].dtype == m.dtype for n, m in masters.items()))


def restore_master_weights(model, optimizer, directory: Path, parallel) -> Optional[bool]:
    """Copy this rank's saved masters back (after the weights and the optimizer states were loaded, which rebuilt
    them from the half-precision weights). True: restored; False: rebuilt from the weights (none saved, or saved on
    another layout), logged; None: this run keeps no separate masters."""
    masters = _masters_by_name(model, optimizer)
    if not masters:
        return None
    path, layout = _file(directory, optimizer, parallel.plugin), layout_of(optimizer, parallel)
    saved = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    if saved is None or not _fits(saved, masters, layout):
        if dist.get_rank() == 0:
            why = ("it holds no master weights (saved under ddp, gemini or fp32, or by an older version)"
                   if saved is None else f"its master weights are of layout {saved['layout']}, this run's {layout}")
            log.warning("%s: %s: the fp32 master weights are rebuilt from the saved weights (exact in their "
                        "precision; the low bits the masters had are lost)", directory.parent, why)
        return False
    with torch.no_grad():
        for name, master in masters.items():
            master.copy_(saved["tensors"][name])
    return True
