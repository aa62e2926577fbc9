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

A job resumed on another number of data-parallel ranks (a node lost, or nodes added) keeps its masters too, when
the tp/pp/sp split and the optimizer are the checkpoint's: under ZeRO each rank cuts its new slice out of the old
ones (:func:`recut`: ZeRO pads each flat parameter to a multiple of the rank count and gives rank ``r`` the
``r``-th equal piece), reading only the bytes it needs (the old files are memory-mapped); without ZeRO every
replica reads its part's file as before. On any other change (tp/pp/sp split, optimizer, or a checkpoint older than
the slice records) the masters are rebuilt from the saved weights, and the log says so. gemini keeps its masters in
chunks of its own: not covered.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MASTER_DIR = "master-weights"


def _masters_by_name(model, optimizer) -> Dict[str, Tuple[torch.nn.Parameter, torch.Tensor]]:
    """``{parameter name: (working parameter, this rank's master tensor)}`` for every parameter whose master is a
    separate copy in another dtype (empty without mixed precision, under ddp, or with optimizers colossalai keeps
    no map for)."""
    getter = getattr(optimizer, "get_working_to_master_map", None)
    if getter is None:
        return {}
    masters = getter() or {}  # colossalai's fp32 3d optimizer answers None
    found = {}
    for name, param in model.unwrap().named_parameters():
        master = masters.get(id(param))
        if master is not None and master is not param and master.dtype != param.dtype:
            found[name] = (param, master)
    return found


def layout_of(optimizer, parallel) -> dict:
    """What the masters' slices and shapes depend on: the world, its split, and the optimizer holding them."""
    return {"world_size": dist.get_world_size(), **parallel.sizes, "optimizer": type(optimizer).__name__}


def _same_split(saved: dict, mine: dict) -> bool:
    """Layouts that differ at most in the number of data-parallel replicas (the world size)."""
    return {**saved, "world_size": None} == {**mine, "world_size": None}


def _slice_of(optimizer, param) -> Tuple[int, int]:
    """(index, count) of this rank's slice of ``param``'s flat master under ZeRO: its rank in the group the
    parameter is sharded over, and that group's size."""
    store = optimizer.pid_to_bucket_store[id(param)]
    return int(store.local_rank), int(store.world_size)


def recut(pieces: List[torch.Tensor], numel: int, index: int, count: int) -> torch.Tensor:
    """Slice ``index`` of ``count`` of a flat parameter of ``numel`` elements that ZeRO had cut into ``pieces``
    (in slice order; all of one length, the parameter zero-padded to their sum). ZeRO's rule: pad to a multiple
    of ``count``, cut into ``count`` equal pieces. Copies only the old pieces' elements the new slice covers (so
    memory-mapped pieces are read that far); the new padding is zeros, as ZeRO's own (Adam leaves zeros with zero
    gradients at zero). Shape ``(ceil(numel / count),)``, dtype of the pieces."""
    old = pieces[0].numel()
    size = -(-numel // count)
    out = torch.zeros(size, dtype=pieces[0].dtype)
    start, end = index * size, min((index + 1) * size, numel)
    position = start
    while position < end:
        piece, offset = divmod(position, old)
        take = min(old - offset, end - position)
        out[position - start:position - start + take] = pieces[piece][offset:offset + take]
        position += take
    return out


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
    record = {"layout": layout_of(optimizer, parallel), "part": list(_part_of(parallel.plugin)),
              "tensors": {n: master.detach().cpu() for n, (_, master) in masters.items()}}
    if _sharded(optimizer):
        record["slices"] = {n: list(_slice_of(optimizer, param)) for n, (param, _) in masters.items()}
    torch.save(record, path)
    return len(masters)


def _fits(tensors: Dict[str, torch.Tensor], masters: dict) -> bool:
    return set(tensors) == set(masters) and all(
        tensors[n].shape == m.shape and tensors[n].dtype == m.dtype for n, (_, m) in masters.items())


def _load(path: Path) -> dict:
    # memory-mapped: a re-cut reads only the bytes of the old slices its new one covers
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


NONE_SAVED = "it holds no master weights (saved under ddp, gemini or fp32, or by an older version)"


def _saved_masters(directory: Path, masters: dict, optimizer, parallel) -> Tuple[Optional[dict], str]:
    """This rank's masters as the checkpoint under ``directory`` holds them (``{name: tensor}``), and how they were
    found (``"saved"``, or ``"re-cut ..."``); or None and why not."""
    layout = layout_of(optimizer, parallel)
    own = _file(directory, optimizer, parallel.plugin)
    saved = _load(own) if own.is_file() else None
    if saved is not None and saved["layout"] == layout:
        return saved["tensors"], "saved"
    if _sharded(optimizer):
        return _recut_all(sorted((Path(directory) / MASTER_DIR).glob("rank-*.pt")), masters, optimizer, parallel)
    if saved is not None and _same_split(saved["layout"], layout):  # replicas hold whole masters: any count
        return saved["tensors"], f"saved with {saved['layout']['world_size']} ranks"
    if saved is None:  # another plugin's files, or none
        saved = next((_load(path) for path in sorted((Path(directory) / MASTER_DIR).glob("*.pt"))), None)
    return None, NONE_SAVED if saved is None else _other_layout(saved["layout"], layout)


def _other_layout(saved: dict, mine: dict) -> str:
    return f"its master weights are of layout {saved}, this run's {mine}"


def _recut_all(files: List[Path], masters: dict, optimizer, parallel) -> Tuple[Optional[dict], str]:
    """Under ZeRO on another number of data-parallel ranks: this rank's new slices cut out of the slices the
    ranks of its tp/pp part saved, or None and why not."""
    if not files:
        return None, NONE_SAVED
    records = [_load(path) for path in files]
    layout = layout_of(optimizer, parallel)
    if not _same_split(records[0]["layout"], layout):
        return None, _other_layout(records[0]["layout"], layout)
    if any("slices" not in record for record in records):
        return None, (f"its master weights of {records[0]['layout']['world_size']} ranks hold no slice records "
                      "(an older version)")
    part = list(_part_of(parallel.plugin))
    mine = [record for record in records if record["part"] == part]
    tensors = {}
    for name, (param, _) in masters.items():
        held = {tuple(r["slices"][name]): r["tensors"][name] for r in mine if name in r["slices"]}
        counts = {count for _, count in held}
        count = counts.pop() if len(counts) == 1 else 0
        if not count or sorted(held) != [(i, count) for i in range(count)]:
            return None, f"its master weights lack slices of {name} (found {sorted(held)})"
        pieces = [held[(i, count)] for i in range(count)]
        tensors[name] = recut(pieces, param.numel(), *_slice_of(optimizer, param))
    return tensors, f"re-cut from the {records[0]['layout']['world_size']}-rank run's slices"


def restore_master_weights(model, optimizer, directory: Path, parallel) -> Optional[bool]:
    """Copy this rank's saved masters back (after the weights and the optimizer states were loaded, which rebuilt
    them from the half-precision weights), re-cut when only the number of data-parallel ranks changed. True:
    restored; False: rebuilt from the weights (none saved, or saved on another split), logged; None: this run keeps
    no separate masters."""
    masters = _masters_by_name(model, optimizer)
    if not masters:
        return None
    tensors, how = _saved_masters(Path(directory), masters, optimizer, parallel)
    if tensors is not None and not _fits(tensors, masters):
        tensors, how = None, f"its master weights' names or shapes are not this model's ({how})"
    if tensors is None:
        if dist.get_rank() == 0:
            log.warning("%s: %s: the fp32 master weights are rebuilt from the saved weights (exact in their "
                        "precision; the low bits the masters had are lost)", directory.parent, how)
        return False
    with torch.no_grad():
        for name, (_, master) in masters.items():
            master.copy_(tensors[name])
    if how != "saved" and dist.get_rank() == 0:
        log.info("%s: the fp32 master weights are %s (this run has %d)", directory.parent, how, dist.get_world_size())
    return True
