"""Streaming safetensors I/O: copy a checkpoint tensor by tensor without holding a shard in memory.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once (a 10 GB shard means
10 GB of RAM). The format is simple enough to stream: an 8-byte little-endian header length, a JSON
header mapping each name to ``{dtype, shape, data_offsets}`` (offsets relative to the data section,
contiguous, in file order), then the raw little-endian bytes. We write the header first (sizes are known
from shapes), then each tensor's bytes one after another, so peak memory is one tensor (or one copy
buffer). Files written here load with ``safetensors.safe_open`` and ``from_pretrained``;
:func:`write_safetensors` re-opens the result with ``safe_open`` to check that.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Dict, List, Optional, Tuple

import torch

from colossal_llama.utils.errors import UserInputError, damaged_file

# safetensors dtype names <-> torch dtypes (the subset torch can hold).
ST_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST: Dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}

COPY_BUFFER_BYTES = 64 << 20  # bounded memory for byte-range copies


@dataclass
class TensorRecord:
    """One tensor as a safetensors header describes it. ``start``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


# Bytes per element of every safetensors dtype (also those torch cannot hold), for the size check.
ST_ELEMENT_BYTES: Dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8,
}
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


def _damaged(path: Path, what: str) -> UserInputError:
    return damaged_file(path, "safetensors", what)


def read_header(path: Path) -> Tuple[List[TensorRecord], Dict[str, str]]:
    """Parse and check a safetensors header: ``(records in file order, __metadata__)``. Reads only the header.

    Raises :class:`UserInputError` ``"<path>: truncated or corrupt safetensors file (...)"`` unless the header is
    valid JSON, every tensor's byte range matches its dtype and shape, the ranges tile the data section, and the
    file is exactly as long as the header says (a cut-off download or copy is caught here, by its size, before
    any tensor is read).
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: safetensors file does not exist")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) != 8:
            raise _damaged(path, f"{size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise _damaged(path, f"header length {header_len}, file has {size} bytes")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _damaged(path, f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise _damaged(path, "header is not a JSON object")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    records = []
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            records.append(TensorRecord(name, str(info["dtype"]), tuple(int(d) for d in info["shape"]),
                                        data_start + begin, data_start + end))
        except (KeyError, TypeError, ValueError):
            raise _damaged(path, f"tensor {name}: header entry {info!r}") from None
    records.sort(key=lambda r: r.start)
    expected_end = data_start
    for r in records:
        if r.start != expected_end or r.end < r.start:
            raise _damaged(path, f"tensor {r.name}: byte range overlaps or leaves a gap")
        element = ST_ELEMENT_BYTES.get(r.dtype)
        if element is not None and r.nbytes != element * math.prod(r.shape):
            raise _damaged(path, f"tensor {r.name}: {r.dtype} {list(r.shape)} needs "
                                 f"{element * math.prod(r.shape)} bytes, header gives {r.nbytes}")
        expected_end = r.end
    if size != expected_end:
        how = "cut short" if size < expected_end else "trailing bytes"
        raise _damaged(path, f"{size} bytes, the header describes {expected_end}: {how}")
    return records, metadata


def check_safetensors_file(path) -> None:
    """Raise :class:`UserInputError` ``"<path>: truncated or corrupt safetensors file (...)"`` unless ``path`` is
    a complete safetensors file (see :func:`read_header`; only the header is read, so it costs milliseconds
    for any file size). Call it before handing a file to ``safetensors``/``from_pretrained``, whose own errors
    name no file."""
    read_header(path)


@dataclass
class OutputTensor:
    """A tensor to write: its header entry plus a callable that writes exactly ``nbytes`` to a file."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    nbytes: int
    write_to: Callable[[BinaryIO], None]


def tensor_output(name: str, tensor: torch.Tensor) -> OutputTensor:
    """An :class:`OutputTensor` that writes an in-memory tensor's bytes."""
    if tensor.dtype not in TORCH_TO_ST:
        raise UserInputError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
    tensor = tensor.detach().contiguous()

    def write_to(fh: BinaryIO) -> None:
        write_tensor_bytes(fh, tensor)

    return OutputTensor(name, TORCH_TO_ST[tensor.dtype], tuple(tensor.shape),
                        tensor.numel() * tensor.element_size(), write_to)


def byte_range_output(record: TensorRecord, source: Path, name: Optional[str] = None) -> OutputTensor:
    """An :class:`OutputTensor` that copies ``record``'s bytes verbatim from ``source`` (bit-identical)."""

    def write_to(fh: BinaryIO) -> None:
        copy_byte_range(source, record.start, record.nbytes, fh)

    return OutputTensor(name or record.name, record.dtype, record.shape, record.nbytes, write_to)


def write_tensor_bytes(fh: BinaryIO, tensor: torch.Tensor) -> None:
    """Write a contiguous CPU tensor's raw bytes (no copy: a uint8 view through numpy's buffer)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel():
        fh.write(memoryview(flat.view(torch.uint8).numpy()))


def copy_byte_range(source: Path, start: int, length: int, out: BinaryIO) -> None:
    """Copy ``length`` bytes at ``start`` of ``source`` into ``out`` through a bounded buffer."""
    buf = bytearray(min(COPY_BUFFER_BYTES, max(length, 1)))
    view = memoryview(buf)
    with open(source, "rb") as src:
        src.seek(start)
        left = length
        while left:
            got = src.readinto(view[: min(left, len(buf))])
            if not got:
                raise _damaged(source, f"ended while copying {length} bytes at offset {start}")
            out.write(view[:got])
            left -= got


def write_safetensors(path: Path, tensors: List[OutputTensor], metadata: Optional[Dict[str, str]] = None,
                      progress: Optional[Callable[[int], None]] = None) -> int:
    """Write ``tensors`` (in the given order) to ``path`` streamed; returns the file size in bytes.

    ``progress(n)`` is called with the bytes of each tensor after it is written (for a tqdm bar).
    """
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # data section 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header_bytes)))
        fh.write(header_bytes)
        for t in tensors:
            before = fh.tell()
            t.write_to(fh)
            written = fh.tell() - before
            if written != t.nbytes:
                raise RuntimeError(f"{path}: {t.name} wrote {written} bytes, header says {t.nbytes}")
            if progress is not None:
                progress(t.nbytes)
    _check_readable(path, tensors)
    return 8 + len(header_bytes) + offset


def _check_readable(path: Path, tensors: List[OutputTensor]) -> None:
    """Re-open with the safetensors library (header only) so a malformed file fails here, not at load time."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        for t in tensors:
            if t.name not in names or tuple(f.get_slice(t.name).get_shape()) != tuple(t.shape):
                raise RuntimeError(f"{path}: {t.name} missing or mis-shaped after writing")
