"""Training reads prepared output whole or not at all: what its manifest lists must be there and readable."""
from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import shutil
import sys

import numpy as np
import pyarrow as pa
import pytest

from colossal_llama.dataset.prepared import load_part, part_dirs, read_manifest
from colossal_llama.training.data import MAX_CATEGORIES, _category_codes, collect_parts, expand_dataset_args, \
    load_prepared
from colossal_llama.utils.errors import UserInputError


@pytest.fixture
def copied(tmp_path, prepared_with_heldout):
    """A copy of a real prepared output (2 bins, a held-out split), free to damage."""
    out = tmp_path / "copy"
    shutil.copytree(prepared_with_heldout, out)
    return out


def _rows(out, name="arrow"):
    parts, manifests = collect_parts(expand_dataset_args([str(out / name)] if name else [str(out)]))
    return len(load_prepared(parts, manifests).dataset)


def test_a_part_the_manifest_lists_must_be_there_whichever_folder_is_named(copied):
    """Shards gathered by hand, a copy cut short: without the check 25 % of the rows went missing in silence."""
    manifest = read_manifest(copied / "manifest.json")
    assert len(manifest.parts) == 2 and _rows(copied, None) == sum(p.num_sequences for p in manifest.parts)
    shutil.rmtree(copied / "arrow" / manifest.parts[1].name)
    assert not (copied / "arrow" / manifest.parts[1].name).exists()  # the fault: one of two parts gone
    for name in (None, "arrow"):
        with pytest.raises(UserInputError, match=rf"{manifest.parts[1].name}: is missing, but .*manifest.json lists "
                                                 r"it in its parts \(a copy cut short"):
            _rows(copied, name)


def test_a_part_without_its_state_file_is_incomplete_in_the_held_out_split_too(copied):
    manifest = read_manifest(copied / "manifest.json")
    (copied / manifest.eval_dir / manifest.eval_parts[0].name / "state.json").unlink()
    with pytest.raises(UserInputError, match=r": is incomplete \(no state.json\), but .*manifest.json lists it"):
        expand_dataset_args([str(copied)], split="eval")
    with pytest.raises(UserInputError, match=r": is incomplete \(no state.json\)"):
        expand_dataset_args([str(copied / manifest.eval_dir)], split="eval")


def test_an_arrow_file_cut_short_is_a_one_line_error_naming_its_part(copied):
    part = copied / "arrow" / read_manifest(copied / "manifest.json").parts[0].name
    (data_file,) = part.glob("*.arrow")
    size = data_file.stat().st_size
    with open(data_file, "r+b") as fh:
        fh.truncate(size // 3)
    assert data_file.stat().st_size == size // 3  # the fault: the data file really is a third of itself
    with pytest.raises(UserInputError, match=rf"^{part}: unreadable arrow part \(.*\); a copy cut short\? "):
        _rows(copied)


def test_more_categories_than_codes_hold_are_refused_in_one_line():
    """Category codes are 2 bytes a row; 40,000 categories (one per web domain) overflowed them with a traceback."""
    names = pa.array([f"site-{i}" for i in range(MAX_CATEGORIES + 1)]).dictionary_encode()
    with pytest.raises(UserInputError, match=r"^--dataset: the data has 32,768 categories, at most 32,767 train"):
        _category_codes([names], [len(names)])
    exactly = pa.array([f"site-{i}" for i in range(MAX_CATEGORIES)]).dictionary_encode()
    names_kept, codes = _category_codes([exactly], [len(exactly)])
    assert len(names_kept) == MAX_CATEGORIES and codes.max() == MAX_CATEGORIES - 1


def _write_multi_batch_part(part_dir, batches: int, batch_tokens: int = 1 << 18, row_tokens: int = 4096):
    """A part in PartWriter's layout: ``batches`` record batches of ``batch_tokens`` tokens (3 int32 columns: 3 MB
    each at 1 << 18), synced to disk so that its pages can be dropped."""
    from datasets.arrow_writer import ArrowWriter

    from colossal_llama.dataset.writing import DATA_FILE, PART_FEATURES, _write_saved_dataset_files

    part_dir.mkdir()
    rng = np.random.default_rng(0)
    writer = ArrowWriter(features=PART_FEATURES, path=str(part_dir / DATA_FILE))
    rows = batch_tokens // row_tokens
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * row_tokens)
    for _ in range(batches):
        lists = {name: pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 32000, batch_tokens, dtype=np.int32)))
                 for name in ("input_ids", "labels", "position_ids")}
        writer.write_table(pa.table({**lists, "category": pa.array(["news"] * rows, type=pa.string())}))
    writer.finalize()
    writer.close()
    _write_saved_dataset_files(part_dir, "multi-batch")
    return part_dir / DATA_FILE


def _drop_from_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages (a file just written) stay
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _resident_bytes(path) -> int:
    """Bytes of ``path`` in the page cache, by ``mincore`` over a fresh private mapping (which faults nothing in)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY)  # writable, for ctypes; nothing written
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
    anchor = ctypes.c_char.from_buffer(mapped)
    try:
        assert libc.mincore(ctypes.addressof(anchor), size, vec) == 0, os.strerror(ctypes.get_errno())
    finally:
        del anchor
        mapped.close()
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


def _vm_flags_of_mappings(path) -> list[set[str]]:
    """VmFlags of every mapping of ``path`` in this process (/proc/self/smaps)."""
    flags, current = [], False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            first = line.split(maxsplit=5)
            if len(first) >= 5 and "-" in first[0] and ":" not in first[0]:  # a mapping's header line
                current = len(first) == 6 and first[5].strip() == str(path)
            elif current and line.startswith("VmFlags:"):
                flags.append(set(line.split()[1:]))
    return flags


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page cache residency: Linux mincore/fadvise")
def test_opening_a_part_reads_its_record_batch_headers_not_its_data(tmp_path):
    """Opened through pyarrow.memory_map, each of a part's record batch headers faulted in the kernel's read-ahead
    window around it (8 MiB on this machine): the whole 3.0 GB part was read at every training start (and by every
    node). Mapped MADV_RANDOM, only the headers' pages are."""
    data_file = _write_multi_batch_part(tmp_path / "part-00000", batches=24)
    size = data_file.stat().st_size
    assert size > 70 * 2**20
    _drop_from_page_cache(data_file)
    if _resident_bytes(data_file) != 0:
        pytest.skip(f"{tmp_path}: its pages cannot be dropped from the page cache (tmpfs?): nothing to measure")
    ds = load_part(data_file.parent)
    assert ds.data.table.column(0).num_chunks == 24 and len(ds) == 24 * 64
    opened = _resident_bytes(data_file)
    assert 0 < opened <= 24 * 4 * mmap.PAGESIZE, f"{opened / 2**20:.1f} MiB of {size / 2**20:.0f} MiB read to open"
    # the measure sees what is read: one whole row brings its 16 KiB in, and not a read-ahead window with it
    row = ds.with_format("numpy")[24 * 64 // 2]["input_ids"]
    assert row.shape == (4096,)
    after_row = _resident_bytes(data_file)
    assert 16 * 1024 <= after_row - opened <= 64 * 1024, after_row - opened


@pytest.mark.skipif(not hasattr(mmap, "MADV_RANDOM") or not os.path.exists("/proc/self/smaps"),
                    reason="madvise(MADV_RANDOM) and /proc/self/smaps")
def test_a_part_is_mapped_for_random_reads_on_any_file_system(tmp_path):
    """Where pages cannot be dropped (tmpfs) the test above skips; the advice itself is checked everywhere."""
    data_file = _write_multi_batch_part(tmp_path / "part-00000", batches=2, batch_tokens=1 << 14)
    ds = load_part(data_file.parent)
    flags = _vm_flags_of_mappings(data_file)
    assert flags and all("rr" in f for f in flags), flags  # rr: MADV_RANDOM ("random read advise provided")
    assert len(ds) == 8


def test_a_part_loads_as_load_from_disk_loads_it(prepared_with_heldout):
    """Same columns, features, rows, format and fingerprint as ``datasets.load_from_disk``, memory-mapped (pickled
    by path, not by value) and readable the ways training reads it."""
    from datasets import concatenate_datasets, load_from_disk
    from datasets.table import MemoryMappedTable

    part = part_dirs(prepared_with_heldout / "arrow")[0]
    ours, theirs = load_part(part), load_from_disk(str(part))
    assert len(ours) == len(theirs) > 0
    assert ours.column_names == theirs.column_names and ours.features == theirs.features
    assert ours._fingerprint == theirs._fingerprint and ours.format == theirs.format
    assert ours.to_dict() == theirs.to_dict()
    assert isinstance(ours.data, MemoryMappedTable) and ours.data.path == theirs.data.path
    assert len(pickle.dumps(ours)) < 10_000 and pickle.loads(pickle.dumps(ours)).to_dict() == theirs.to_dict()
    rows = concatenate_datasets([ours.select_columns(["input_ids", "labels", "position_ids"])] * 2).with_format("numpy")
    assert np.array_equal(rows[len(ours)]["input_ids"], np.asarray(theirs[0]["input_ids"]))
    assert ours.data.table.column("category").to_pylist() == theirs["category"]
