"""Read prepared output back: find the parts a ``--dataset`` value names, their manifests, the rows.

A ``--dataset`` value may be any of:

* ``OUT`` (an output with ``manifest.json``), or one shard of a sharded run ``OUT/shard-IIIII-of-NNNNN``;
* ``OUT`` of a sharded run (``shard-*`` folders, no manifest of its own): every shard, all of which must be there;
* ``OUT/arrow`` (all its parts), ``OUT/eval`` (the held-out parts), or one part ``OUT/arrow/part-XXXXX``.

``split="eval"`` turns any of these into the held-out parts (``OUT/eval``) of the output it belongs to: ``OUT/arrow``
and its parts are training rows, never a held-out split of their own.
"""
from __future__ import annotations

import glob
import json
import mmap
import os
from pathlib import Path

import numpy as np

from colossal_llama.dataset.config import SHARD_DIR, SHARD_DIR_FORMAT
from colossal_llama.dataset.manifest import Manifest, missing_manifest
from colossal_llama.utils.errors import UserInputError

SPLITS = ("train", "eval")


def part_dirs(path) -> list[Path]:
    """``OUT/arrow`` (all its parts, sorted) or one ``OUT/arrow/part-XXXXX`` -> list of part dirs."""
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"{path}: directory does not exist")
    if (path / "state.json").is_file():
        return [path]
    parts = sorted(p for p in path.glob("part-*") if (p / "state.json").is_file())
    if not parts:
        raise UserInputError(f"{path}: neither a prepared output, a shard, nor a dir of part-* dirs "
                             "(datasets.save_to_disk)")
    return parts


def _shards(root: Path) -> list[Path]:
    """The shard folders of a sharded output ``root`` (all of them, or a one-line error naming the first missing)."""
    found = {}
    for entry in sorted(root.iterdir()):
        match = SHARD_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            found[(int(match.group(1)), int(match.group(2)))] = entry
    counts = sorted({count for _, count in found})
    if len(counts) > 1:
        raise UserInputError(f"{root}: holds shards of runs with different --num_shards ({counts}); "
                             "name the shard folders of one run")
    if not counts:
        return []
    count = counts[0]
    for index in range(count):
        if (index, count) not in found:
            missing = root / SHARD_DIR_FORMAT.format(index=index, count=count)
            raise UserInputError(f"{missing}: shard {index} of {count} is missing (prepare it with --shard_index "
                                 f"{index}, or name the shard folders you want one by one)")
    shards = [found[(index, count)] for index in range(count)]
    _check_shards_belong_together(shards, count)
    return shards


def _check_shards_belong_together(shards: list[Path], count: int) -> None:
    """Each shard's manifest is of its folder's shard, and all read the same input files: shards prepared from
    other files (a machine's copy incomplete, one shard prepared again after the inputs changed, the folders given
    in another order) would hold some documents twice and others not at all. Shards not yet complete are left to
    the reader of their parts."""
    manifests = {shard: read_manifest(shard / "manifest.json") for shard in shards
                 if (shard / "manifest.json").is_file()}
    for index, shard in enumerate(shards):
        manifest = manifests.get(shard)
        if manifest is not None and (manifest.shard_index, manifest.num_shards) != (index, count):
            raise UserInputError(f"{shard / 'manifest.json'}: shard_index, num_shards: {manifest.shard_index}, "
                                 f"{manifest.num_shards}, not the folder's {index}, {count} (a folder renamed?)")
    recorded = [(shard, m.inputs) for shard, m in manifests.items() if m.inputs is not None]
    for shard, inputs in recorded[1:]:
        first, first_inputs = recorded[0]
        if (mismatch := inputs.mismatch(first_inputs)) is not None:
            raise UserInputError(
                f"{shard / 'manifest.json'}: inputs: {inputs.describe()}, but {first.name} read "
                f"{first_inputs.describe()} ({mismatch}): every shard of one output must read the same "
                "--data_input_dirs in the same order (each takes its lines of every file); prepare the shards again "
                "from one set of files")


def _output_parts(root: Path, split: str) -> list[Path]:
    """Parts of the output folder ``root`` (which has ``manifest.json``) for ``split``."""
    manifest = read_manifest(root / "manifest.json")
    if split == "eval":
        if manifest.eval_dir is None:
            raise UserInputError(f"{root}: no held-out split (prepared without --holdout_fraction, or no category "
                                 "had enough documents to hold one out)")
        return _listed_parts(root / manifest.eval_dir, root / "manifest.json", manifest)
    return _listed_parts(root / "arrow", root / "manifest.json", manifest)


def _listed_parts(folder: Path, manifest_path: Path, manifest: Manifest) -> list[Path]:
    """The parts of ``folder`` (``OUT/arrow`` or the held-out folder), every one ``manifest`` (read from
    ``manifest_path``) lists, sorted.

    All must be there and complete: a part folder missing or without ``state.json`` (a copy of the output cut
    short, the shards gathered by hand) would otherwise leave its rows out of training without a word."""
    entries = manifest.split_parts("eval" if folder.name == manifest.eval_dir else "train")
    if not entries:
        return part_dirs(folder)
    parts = sorted(folder / entry.name for entry in entries)
    for part in parts:
        if not (part / "state.json").is_file():
            state = "is missing" if not part.exists() else "is incomplete (no state.json)"
            raise UserInputError(f"{part}: {state}, but {manifest_path} lists it in its parts (a copy cut short? "
                                 "copy the output again)")
    return parts


def _output_of_training_parts(path: Path) -> Path | None:
    """``OUT`` when ``path`` is its training parts folder (``OUT/arrow``) or one of their parts, else None."""
    is_part = (path / "state.json").is_file()
    if not is_part and not any(path.glob("part-*")):
        return None
    folder = path.parent if is_part else path
    manifest = folder.parent / "manifest.json"
    if not manifest.is_file() or folder.name == read_manifest(manifest).eval_dir:
        return None
    return folder.parent


def resolve_parts(path, split: str = "train") -> list[Path]:
    """The part dirs one ``--dataset`` value names (see the module docstring), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(path)
    for folder in (path, path / "arrow"):
        if _swap_interrupted(folder):
            raise missing_manifest(folder.parent / "manifest.json")
    if not path.is_dir():
        raise UserInputError(f"{path}: directory does not exist")
    owner = _output_of_training_parts(path) if split == "eval" else None
    if owner is not None:  # validation must not score the rows it trains on: OUT's held-out split, if it has one
        return _output_parts(owner, "eval")
    if (path / "state.json").is_file():
        return [path]
    has_manifest = (path / "manifest.json").is_file()
    shards = _shards(path)
    if has_manifest and shards:
        raise UserInputError(f"{path}: holds both a 1-shard output and shard folders; name one of them")
    if has_manifest:
        return _output_parts(path, split)
    if shards:
        return [part for shard in shards for part in resolve_parts(shard, split)]
    if (path / "arrow").is_dir():  # an output whose manifest is missing: reading it says so
        return part_dirs(path / "arrow")
    if (path.parent / "manifest.json").is_file():  # OUT/arrow or OUT/eval: the parts its manifest lists
        return _listed_parts(path, path.parent / "manifest.json", read_manifest(path.parent / "manifest.json"))
    return part_dirs(path)


def _swap_interrupted(folder: Path) -> bool:
    """``folder`` (``OUT/arrow``) is missing while a hidden ``.arrow.old-PID`` sibling holds the earlier parts: a
    preparation was killed between the two renames that swap the new parts in (utils.output.replace_dir), after
    it removed the manifest. Said as the missing manifest it is, not as a path that is no output."""
    old = f".{glob.escape(folder.name)}.old-*"  # utils.output.tmp_sibling(folder, "old")
    return not folder.exists() and folder.parent.is_dir() and any(folder.parent.glob(old))


def manifest_path_of(part_dir) -> Path:
    """Where the manifest of a part is: ``OUT/arrow/part-XXXXX`` (or ``OUT/eval/part-XXXXX``) -> ``OUT/manifest.json``."""
    return Path(part_dir).parent.parent / "manifest.json"


def split_of(part_dir, manifest: Manifest) -> str:
    """``"eval"`` for a part of the manifest's held-out folder, else ``"train"``."""
    return "eval" if manifest.eval_dir is not None and Path(part_dir).parent.name == manifest.eval_dir else "train"


def read_manifest(manifest_path) -> Manifest:
    """The manifest at ``manifest_path``, checked. One-line errors."""
    return Manifest.read(manifest_path)


def load_manifest(part_dir) -> Manifest:
    """The manifest of the output a part belongs to."""
    return read_manifest(manifest_path_of(part_dir))


def load_part(part_dir):
    """One arrow part, memory-mapped for random reads; a data file cut short (a copy interrupted) is a one-line
    error naming it.

    The same ``datasets.Dataset`` as ``datasets.load_from_disk`` (columns, features, length, format, the
    fingerprint of the part's ``state.json``; a ``MemoryMappedTable``, pickled by path), but the data file is mapped
    with ``MADV_RANDOM``. Opening a part walks the header of every record batch; through ``pyarrow.memory_map``
    each of those page faults pulled in the kernel's read-ahead window (8 MiB here, megabytes on NFS/Lustre)
    around it, so opening a 3.0 GB part read 3,072 MiB from disk, every node at every start. Mapped this way it
    read 1.1 MiB, and a random 48 KiB row 66 KiB instead of 9.9 MiB (``benchmarks/prepared_open_reads.py``).
    Where ``madvise`` is missing, ``load_from_disk`` itself."""
    import pyarrow as pa
    from datasets import load_from_disk

    try:
        if not hasattr(mmap.mmap, "madvise") or not hasattr(mmap, "MADV_RANDOM"):
            return load_from_disk(str(part_dir))
        return _load_random_access(Path(part_dir))
    except (OSError, ValueError, pa.ArrowException) as err:
        raise UserInputError(f"{part_dir}: unreadable arrow part ({err}); a copy cut short? copy it again") from None


def _random_access_table(path: Path):
    """The Arrow IPC stream file at ``path`` as a ``pyarrow.Table`` whose buffers point into a ``MADV_RANDOM``
    mapping of it (zero-copy: only the record batch headers are read)."""
    import pyarrow as pa

    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise pa.ArrowInvalid("empty file")
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # outlives fh; closed when no buffer uses it
    mapped.madvise(mmap.MADV_RANDOM)
    return pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(mapped))).read_all()


def _load_random_access(part_dir: Path):
    """``load_from_disk(part_dir)`` with the data files mapped by :func:`_random_access_table`."""
    from datasets import Dataset, DatasetInfo, Split
    from datasets.table import MemoryMappedTable, concat_tables

    state = json.loads((part_dir / "state.json").read_text(encoding="utf-8"))
    info = DatasetInfo.from_dict(json.loads((part_dir / "dataset_info.json").read_text(encoding="utf-8")))
    tables = []
    for entry in state["_data_files"]:
        path = part_dir / entry["filename"]
        tables.append(MemoryMappedTable(_random_access_table(path), str(path)))
    split = state["_split"]
    dataset = Dataset(arrow_table=concat_tables(tables), info=info, split=Split(split) if split is not None else None,
                      fingerprint=state["_fingerprint"])
    return dataset.with_format(type=state["_format_type"], format_kwargs=state["_format_kwargs"],
                               columns=state["_format_columns"], output_all_columns=state["_output_all_columns"])


def document_spans(position_ids) -> list[tuple[int, int]]:
    """``[start, end)`` of each document piece in a packed row: a piece starts where position_ids == 0."""
    pos = np.asarray(position_ids)
    starts = np.flatnonzero(pos == 0).tolist()
    return list(zip(starts, starts[1:] + [len(pos)]))
