"""Finding and opening the weight files of a Hugging Face model folder, one shard at a time.

Safetensors shards are opened header-only (tensors are later copied as byte ranges or read lazily with
``safetensors.safe_open``). ``pytorch_model*.bin`` shards are pickles: ``torch.load`` with ``mmap=True``
maps the file, but every tensor we copy is still read in full, so a ``.bin`` shard costs up to its size in
memory while it is being converted; convert such models to safetensors first when memory is tight.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from colossal_llama.model.safetensors_stream import (
    TORCH_TO_ST,
    OutputTensor,
    byte_range_output,
    check_safetensors_file,
    read_header,
    tensor_output,
)
from colossal_llama.utils.errors import DataError, UserInputError, damaged_file
from colossal_llama.utils.json_files import read_json

log = logging.getLogger(__name__)

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json", ".msgpack", ".h5")


@dataclass
class CheckpointLayout:
    """The weight files of a model folder. ``index`` is the parsed ``*.index.json`` (None if unsharded)."""

    folder: Path
    shard_files: List[str]
    is_safetensors: bool
    index: Optional[dict]

    def output_name(self, shard_file: str) -> str:
        """Output safetensors name of a source shard (``pytorch_model-0001-of-0002.bin`` ->
        ``model-0001-of-0002.safetensors``); safetensors shards keep their names."""
        if self.is_safetensors:
            return shard_file
        stem = shard_file[: -len(".bin")]
        return "model" + stem[len("pytorch_model"):] + ".safetensors"


@dataclass
class OpenShard:
    """One opened shard: its tensors as verbatim outputs (file order) and a loader for single tensors."""

    path: Path
    tensors: List[OutputTensor]
    load: Callable[[str], torch.Tensor]
    metadata: Dict[str, str]


def find_checkpoint(folder: Path) -> CheckpointLayout:
    """Locate the weights of ``folder`` (safetensors preferred over ``.bin``); one-line error if none."""
    folder = Path(folder)
    for single, index_name, is_safe in ((SAFE_SINGLE, SAFE_INDEX, True), (BIN_SINGLE, BIN_INDEX, False)):
        index_path = folder / index_name
        if index_path.is_file():
            index = read_shard_index(index_path)
            shards = sorted(set(index["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise UserInputError(f"{index_path}: weight_map: shard {missing[0]} does not exist")
            return CheckpointLayout(folder, shards, is_safe, index)
        if (folder / single).is_file():
            return CheckpointLayout(folder, [single], is_safe, None)
    raise UserInputError(f"{folder}: no model weights ({SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})")


def read_shard_index(index_path: Path) -> dict:
    """The parsed ``*.index.json``; a one-line error naming it unless it is JSON whose ``weight_map`` is a
    non-empty object mapping tensor names to shard file names (strings)."""
    index = read_json(index_path)  # one line for a cut-off or non-UTF-8 file
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise DataError(index_path, None, "weight_map", "not a valid shard index (expected a non-empty object "
                                                        "{tensor name: shard file})")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise DataError(index_path, None, "weight_map", f"{name}: expected a shard file name, got {shard!r}")
    return index


def check_checkpoint(folder: Path) -> CheckpointLayout:
    """:func:`find_checkpoint`, then every safetensors shard checked complete (headers only, milliseconds), so
    a damaged file is named in one line before a library loads it."""
    layout = find_checkpoint(folder)
    if layout.is_safetensors:
        for shard in layout.shard_files:
            check_safetensors_file(layout.folder / shard)
    return layout


def open_shard(layout: CheckpointLayout, shard_file: str) -> OpenShard:
    """Open one shard for streaming (see module docstring for what ``.bin`` shards cost)."""
    path = layout.folder / shard_file
    if layout.is_safetensors:
        return _open_safetensors(path)
    return _open_bin(path)


def _open_safetensors(path: Path) -> OpenShard:
    from safetensors import safe_open

    records, metadata = read_header(path)

    def load(name: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:  # mmap closed again right after the read
            return f.get_tensor(name)

    return OpenShard(path, [byte_range_output(r, path) for r in records], load, metadata)


def _open_bin(path: Path) -> OpenShard:
    log.info("%s: a .bin shard; tensors are read from a memory map but copied in full", path.name)
    state = _load_bin(path)
    outputs, seen_storage = [], {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in TORCH_TO_ST:
            raise UserInputError(f"{path}: {name}: not a tensor safetensors can store")
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen_storage:  # a tied alias (e.g. lm_head sharing embed_tokens): HF re-ties on load
            log.info("%s: %s is an alias of %s; not stored twice", path.name, name, seen_storage[key])
            continue
        seen_storage[key] = name
        outputs.append(tensor_output(name, tensor))
    return OpenShard(path, outputs, lambda name: state[name], {"format": "pt"})


def _load_bin(path: Path) -> dict:
    """The state dict of a ``.bin`` shard; any failure (cut-off zip, garbage, a pickle that is not weights only)
    is a one-line error naming the file."""
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # pre-zipfile pickles cannot be memory-mapped; a damaged file fails again below
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise damaged_file(path, "PyTorch checkpoint", (str(err).strip().splitlines() or [type(err).__name__])[0]) \
            from None
    if not isinstance(state, dict):
        raise damaged_file(path, "PyTorch checkpoint", f"holds a {type(state).__name__}, not a state dict")
    return state


def shard_shapes(layout: CheckpointLayout) -> Dict[str, tuple]:
    """``name -> shape`` of every tensor in the checkpoint (headers only for safetensors)."""
    shapes = {}
    for shard_file in layout.shard_files:
        for t in open_shard(layout, shard_file).tensors:
            shapes[t.name] = t.shape
    return shapes
