"""The optimizer's fp32 master weights, saved with a checkpoint and put back on resume.

Under bf16/fp16 the ZeRO and 3d optimizers step fp32 copies of the weights (this rank's slices under ZeRO) and
cast them into the half-precision model. A checkpoint's ``modeling/`` holds the cast weights only, and the load
rebuilds the masters from them: every resume dropped the bits below bf16's 8-bit mantissa that the masters had
accumulated, and the resumed run's steps differed from the uninterrupted run's from the first one on. So each
rank writes its masters (``optimizer/master-weights/rank-RRRRR.pt``, 4 bytes a trained parameter in all) and a
resume on the same layout copies them back after the weights and the optimizer states are loaded.

On another layout (other world size or tp/pp/sp split: the slices differ) the masters are rebuilt from the saved
weights as before, and the log says so. gemini keeps its masters in chunks of its own: not covered here.
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


def _file(directory: Path) -> Path:
    return Path(directory) / MASTER_DIR / f"rank-{dist.get_rank():05d}.pt"


def save_master_weights(model, optimizer, directory: Path, layout: dict) -> int:
    """Write this rank's masters under ``directory`` (the checkpoint's ``optimizer/``; collective: every rank
    writes its own file). ``layout``: what must match on load. Returns the number of tensors written."""
    masters = _masters_by_name(model, optimizer)
    if masters:
        path = _file(directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"layout": layout, "tensors": {n: t.detach().cpu() for n, t in masters.items()}}, path)
    return len(masters)


def restore_master_weights(model, optimizer, directory: Path, layout: dict) -> Optional[bool]:
    """Copy this rank's saved masters back (after the weights and the optimizer states were loaded, which rebuilt
    them from the half-precision weights). True: restored; False: rebuilt from the weights (no file: a checkpoint
    of an older version; or another layout), logged; None: this run keeps no separate masters."""
    masters = _masters_by_name(model, optimizer)
    if not masters:
        return None
    path = _file(directory)
    if not path.is_file():
        if dist.get_rank() == 0:
            log.warning("%s: no master weights saved (an older checkpoint): the fp32 master weights are rebuilt from "
                        "the saved weights (the resumed run differs from the uninterrupted one in the low bits)",
                        directory.parent)
        return False
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["layout"] != layout or set(saved["tensors"]) != set(masters):
        if dist.get_rank() == 0:
            log.warning("%s: master weights saved with layout %s, running %s: rebuilt from the saved weights instead "
                        "(exact in the weights' precision)", directory.parent, saved["layout"], layout)
        return False
    with torch.no_grad():
        for name, master in masters.items():
            master.copy_(saved["tensors"][name])
    return True
