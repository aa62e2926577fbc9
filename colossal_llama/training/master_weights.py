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
``r``-th equal piece). The checkpoint's ``index.json`` (written by rank 0 at the save) says which file holds which
slice of which part, so a rank opens only the old files its new slices overlap (about old/new count + 1 of them,
never all of them: 512 ranks each opening 512 files was 262,144 opens on a shared filesystem), memory-mapped, and
reads only the bytes it needs; without ZeRO every replica reads its part's file as before. On any other change
(tp/pp/sp split, optimizer, or a checkpoint older than the slice records) the masters are rebuilt from the saved
weights, and the log says so. gemini keeps its masters in chunks of its own: not covered.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from colossal_llama.utils.json_files import read_json, write_json

log = logging.getLogger(__name__)

MASTER_DIR = "master-weights"
INDEX_FILE = "index.json"  # under MASTER_DIR, ZeRO only: {"layout": ..., "files": [{"file", "part", "slice"}]}


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


def _span(numel: int, index: int, count: int) -> Tuple[int, int]:
    """[start, end) of the parameter's elements in slice ``index`` of ``count`` (empty where it is all padding)."""
    size = -(-numel // count)
    return index * size, min((index + 1) * size, numel)


def pieces_covered(numel: int, index: int, count: int, old_count: int) -> range:
    """The old pieces (of ``old_count``) that slice ``index`` of ``count`` of a flat parameter of ``numel``
    elements overlaps: the only ones :func:`recut` reads."""
    old = -(-numel // old_count)
    start, end = _span(numel, index, count)
    return range(start // old, (end - 1) // old + 1) if end > start else range(0)


def recut(pieces: Mapping[int, torch.Tensor], numel: int, index: int, count: int, old_count: int,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Slice ``index`` of ``count`` of a flat parameter of ``numel`` elements that ZeRO had cut into ``old_count``
    pieces (``pieces[i]``: piece ``i``, all of length ``ceil(numel / old_count)``, the parameter zero-padded to
    their sum; only the pieces :func:`pieces_covered` names are read, so a mapping of those suffices). ZeRO's rule:
    pad to a multiple of ``count``, cut into ``count`` equal pieces. Copies only the old pieces' elements the new
    slice covers (so memory-mapped pieces are read that far); the new padding is zeros, as ZeRO's own (Adam leaves
    zeros with zero gradients at zero). Shape ``(ceil(numel / count),)``, ``dtype`` (the masters': fp32)."""
    old = -(-numel // old_count)
    start, end = _span(numel, index, count)
    out = torch.zeros(-(-numel // count), dtype=dtype)
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
        _write_index(path, record)
    torch.save(record, path)
    return len(masters)


def _write_index(path: Path, record: dict) -> None:
    """Collective under ZeRO: rank 0 writes which file holds which slice of which part (:data:`INDEX_FILE`), so
    a resume on another rank count opens only the files it needs. Each rank's slice is one (index, count) for
    all its parameters (ZeRO shards them all over its data-parallel group); were they not, no index is written
    and a resume reads every file's own records."""
    entry = {"file": path.name, "part": record["part"], "slice": _rank_slice(record)}
    entries = [None] * dist.get_world_size()
    dist.all_gather_object(entries, entry)
    if dist.get_rank() == 0 and all(e["slice"] is not None for e in entries):
        write_json(path.parent / INDEX_FILE, {"layout": record["layout"], "files": entries})


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
    folder = Path(directory) / MASTER_DIR
    layout = layout_of(optimizer, parallel)
    if _sharded(optimizer) and any(folder.glob("rank-*.pt")):
        return _zero_masters(folder, masters, optimizer, parallel)
    own = _file(directory, optimizer, parallel.plugin)
    saved = _load(own) if own.is_file() else None
    if saved is not None and saved["layout"] == layout:
        return saved["tensors"], "saved"
    if saved is not None and _same_split(saved["layout"], layout):  # replicas hold whole masters: any count
        return saved["tensors"], f"saved with {saved['layout']['world_size']} ranks"
    if saved is None:  # another plugin's files, or none
        saved = next((_load(path) for path in sorted(folder.glob("*.pt"))), None)
    return None, NONE_SAVED if saved is None else _other_layout(saved["layout"], layout)


def _other_layout(saved: dict, mine: dict) -> str:
    return f"its master weights are of layout {saved}, this run's {mine}"


def _rank_slice(record: dict) -> Optional[list]:
    """``[index, count]`` of the slice a rank file holds of every parameter; None where they differ."""
    slices = {tuple(where) for where in record["slices"].values()}
    return list(slices.pop()) if len(slices) == 1 else None


def _zero_index(folder: Path) -> Tuple[dict, Optional[list], Dict[str, dict]]:
    """The saved ZeRO masters' layout, the entries of their :data:`INDEX_FILE` (``{"file", "part", "slice"}``;
    None where the files hold no slice records: an older version), and the records read to know them: none where
    the save wrote the index, every rank's file where it did not (a checkpoint of an older version)."""
    index = read_json(folder / INDEX_FILE, missing_ok=True)
    if index is not None:
        return index["layout"], index["files"], {}
    records = {path.name: _load(path) for path in sorted(folder.glob("rank-*.pt"))}
    layout = next(iter(records.values()))["layout"]
    if any("slices" not in record for record in records.values()):
        return layout, None, records
    return layout, [{"file": name, "part": record["part"], "slice": _rank_slice(record)}
                    for name, record in records.items()], records


def _zero_masters(folder: Path, masters: dict, optimizer, parallel) -> Tuple[Optional[dict], str]:
    """Under ZeRO: this rank's own file on the checkpoint's layout; on another number of data-parallel ranks its
    new slices cut out of those the ranks of its tp/pp part saved, opening only the files they overlap; or None
    and why not."""
    saved_layout, entries, records = _zero_index(folder)
    layout = layout_of(optimizer, parallel)
    if saved_layout == layout:
        own = _file(folder.parent, optimizer, parallel.plugin)
        if not own.is_file():
            return None, f"its master weights lack {own.name}"
        return (records.get(own.name) or _load(own))["tensors"], "saved"
    if not _same_split(saved_layout, layout):
        return None, _other_layout(saved_layout, layout)
    if entries is None or any(entry["slice"] is None for entry in entries):
        return None, (f"its master weights of {saved_layout['world_size']} ranks hold no slice records "
                      "(an older version)")
    part = list(_part_of(parallel.plugin))
    held = {tuple(e["slice"]): e["file"] for e in entries if e["part"] == part}
    counts = {count for _, count in held}
    old_count = counts.pop() if len(counts) == 1 else 0
    if not old_count or sorted(held) != [(i, old_count) for i in range(old_count)]:
        return None, f"its master weights lack slices of part {part} (found {sorted(held)})"
    needed = sorted({i for param, _ in masters.values()
                     for i in pieces_covered(param.numel(), *_slice_of(optimizer, param), old_count)})
    opened = {i: records.get(held[(i, old_count)]) or _load(folder / held[(i, old_count)]) for i in needed}
    tensors = {}
    for name, (param, master) in masters.items():
        if any(name not in record["tensors"] for record in opened.values()):
            return None, f"its master weights hold no {name}"
        pieces = {i: record["tensors"][name] for i, record in opened.items()}
        tensors[name] = recut(pieces, param.numel(), *_slice_of(optimizer, param), old_count, master.dtype)
    return tensors, (f"re-cut from the {saved_layout['world_size']}-rank run's slices, {len(opened)} of its "
                     f"{old_count} files opened on rank {dist.get_rank()}")


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
