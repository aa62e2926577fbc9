"""Training reads prepared output whole or not at all: what its manifest lists must be there and readable."""
from __future__ import annotations

import shutil

import pyarrow as pa
import pytest

from colossal_llama.dataset.prepared import read_manifest
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
