"""Bytes read from disk to open a prepared part and per random row: ``datasets.load_from_disk`` vs ``load_part``.

    .venv/bin/python benchmarks/prepared_open_reads.py [--tokens 67108864] [--batch_tokens N] [--rows 200]

Writes one part of ``--tokens`` tokens (rows of ``--row_tokens``, random ids, the four columns and the record
batches of ``PartWriter``: ``--batch_tokens`` defaults to ``WRITE_BATCH_TOKENS``) in a temporary folder on the
file system of ``--dir``, then, each way in a fresh process: evicts the file from the page cache
(``posix_fadvise(DONTNEED)``), opens the part (``/proc/self/io`` read_bytes, the growth of ``RssAnon``, time),
evicts it again and reads ``--rows`` random rows of the training columns (``input_ids``, ``labels``,
``position_ids``, numpy format, as training does). Both ways read the same part in the same run, so the ratios
hold whatever the disk; on a file system whose pages cannot be evicted (tmpfs) nothing is read and it says so.
The default (64 M tokens, about 800 MB) runs in well under a minute; ``--tokens 268435456`` is a 3 GB part.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COLUMNS = ["input_ids", "labels", "position_ids"]


def _read_bytes() -> int:
    with open("/proc/self/io") as fh:
        return int(dict(line.split(": ") for line in fh.read().splitlines())["read_bytes"])


def _anon_mb() -> float:
    with open("/proc/self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh.read().splitlines())
    return int(fields["RssAnon"].split()[0]) / 1024


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages (a part just written) cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (``mincore`` on a fresh mapping: faults nothing in)."""
    size = path.stat().st_size
    page = mmap.PAGESIZE
    if size == 0:
        return 0
    with open(path, "rb") as fh:  # a private mapping, writable for ctypes; nothing is written, nothing faulted
        mapped = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = (size + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    buf = ctypes.c_char.from_buffer(mapped)
    try:
        if libc.mincore(ctypes.addressof(buf), size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
    finally:
        del buf
        mapped.close()
    return sum(v & 1 for v in vec) * page


def write_part(part_dir: Path, tokens: int, row_tokens: int, batch_tokens: int) -> int:
    """A part as ``PartWriter`` lays it out; returns its number of record batches."""
    import numpy as np
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    from colossal_llama.dataset.writing import DATA_FILE, PART_FEATURES, _batches, _write_saved_dataset_files

    part_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    writer = ArrowWriter(features=PART_FEATURES, path=str(part_dir / DATA_FILE))
    ranges = _batches(np.full(tokens // row_tokens, row_tokens), batch_tokens)
    for a, b in ranges:
        n = b - a
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * row_tokens)
        lists = [pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 32000, n * row_tokens, dtype=np.int32)))
                 for _ in COLUMNS]
        categories = pa.array(np.where(np.arange(a, b) % 3 == 0, "news", "novel").tolist(), type=pa.string())
        writer.write_table(pa.table(dict(zip(COLUMNS, lists), category=categories)))
    writer.finalize()
    writer.close()
    _write_saved_dataset_files(part_dir, "benchmark")
    return len(ranges)


def measure(part_dir: Path, way: str, rows: int) -> dict:
    """In this process: open ``part_dir`` the ``way`` given, then read ``rows`` random rows, each from a cold cache."""
    import numpy as np
    from datasets import load_from_disk

    from colossal_llama.dataset.prepared import load_part
    from colossal_llama.dataset.writing import DATA_FILE

    data_file = part_dir / DATA_FILE
    _evict(data_file)
    evicted = resident_bytes(data_file) == 0
    anon, read, started = _anon_mb(), _read_bytes(), time.perf_counter()
    ds = load_from_disk(str(part_dir)) if way == "load_from_disk" else load_part(part_dir)
    opened = {"open_read": _read_bytes() - read, "open_s": time.perf_counter() - started,
              "open_anon_mb": _anon_mb() - anon, "open_resident": resident_bytes(data_file)}
    batches = ds.data.table.column(0).num_chunks
    rows_ds = ds.select_columns(COLUMNS).with_format("numpy")
    picks = np.random.default_rng(1).choice(len(ds), min(rows, len(ds)), replace=False)
    _evict(data_file)
    read, started, checksum = _read_bytes(), time.perf_counter(), 0
    for i in picks:
        row = rows_ds[int(i)]
        checksum += int(row["input_ids"].sum())
    return {"way": way, "evicted": evicted, "batches": batches, "rows": len(ds), "picked": len(picks),
            "row_read": _read_bytes() - read, "row_s": time.perf_counter() - started, "checksum": checksum,
            "fingerprint": ds._fingerprint, **opened}


def _child(part_dir: Path, way: str, rows: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", way, "--part", str(part_dir), "--rows", str(rows)],
                         cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{way}: the measuring process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main(argv=None) -> int:
    from colossal_llama.dataset.writing import WRITE_BATCH_TOKENS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1 << 26, help="tokens in the part (default 64 M, ~800 MB)")
    parser.add_argument("--row_tokens", type=int, default=4096)
    parser.add_argument("--batch_tokens", type=int, default=WRITE_BATCH_TOKENS,
                        help=f"tokens per record batch (default WRITE_BATCH_TOKENS, {WRITE_BATCH_TOKENS:,})")
    parser.add_argument("--rows", type=int, default=200, help="random rows read after the open")
    parser.add_argument("--dir", default=None, help="where to write the part (default: the system's temp folder)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: a way to open
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(Path(args.part), args.one, args.rows)))
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        part = Path(tmp) / "part-00000"
        started = time.perf_counter()
        batches = write_part(part, args.tokens, args.row_tokens, args.batch_tokens)
        size = sum(f.stat().st_size for f in part.iterdir())
        print(f"part: {args.tokens:,} tokens in rows of {args.row_tokens:,}, {batches:,} record batches of "
              f"{args.batch_tokens:,} tokens, {size / 2**20:,.0f} MiB, written in {time.perf_counter() - started:.1f} s")
        old, new = (_child(part, way, args.rows) for way in ("load_from_disk", "load_part"))
    if not (old["evicted"] and new["evicted"]):
        print("the part's pages could not be evicted from the page cache here (tmpfs?): the reads below are not "
              "those of a cold disk")
    assert (old["rows"], old["checksum"], old["fingerprint"]) == (new["rows"], new["checksum"], new["fingerprint"])
    row_bytes = args.row_tokens * 4 * len(COLUMNS)
    print(f"\n| way | read at open | per record batch | open s | anon at open | read per random row "
          f"({row_bytes // 1024} KiB of data) | resident after open |")
    print("|---|---|---|---|---|---|---|")
    for r in (old, new):
        print(f"| {r['way']} | {r['open_read'] / 2**20:,.1f} MiB | {r['open_read'] / r['batches'] / 1024:,.1f} KiB | "
              f"{r['open_s']:.2f} | {r['open_anon_mb']:,.1f} MiB | {r['row_read'] / r['picked'] / 1024:,.1f} KiB | "
              f"{r['open_resident'] / 2**20:,.1f} MiB |")
    ratio = (lambda a, b: f"{a / b:,.0f}x" if b else "inf")
    print(f"| load_from_disk / load_part | {ratio(old['open_read'], new['open_read'])} | | | | "
          f"{ratio(old['row_read'], new['row_read'])} | |")
    print(f"\nsame rows, checksum and fingerprint both ways: {new['rows']:,} rows, {new['picked']} read")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
