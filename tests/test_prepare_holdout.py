"""Held-out split at preparation (``--holdout_fraction``) on the real corpora: whole documents, per category,
seeded, written to OUT/eval beside OUT/arrow, every token accounted for over both, and readable by training's
reader exactly like the training parts (also per shard)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig, Shard
from colossal_llama.dataset.pipeline import prepare_pretrain
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.training.data import expand_dataset_args, load_training_data
from colossal_llama.utils.errors import UserInputError
from tests.support.prepared_data import reassemble, write_input_slice

SLICE = {"en_novel_botchan.jsonl": 292, "zh_reviews.jsonl": 400, "zh_news_peoples_daily_199801.jsonl": 300}
FRACTION = 0.1


def _prepare(inputs: Path, tokenizer_dir: Path, out: Path, seed: int = 1, shard: Shard = Shard(), **kw):
    return prepare_pretrain(PretrainPrepConfig(
        input_dirs=[inputs], tokenizer_dir=tokenizer_dir, output=OutputLayout.under(out, shard), max_length=256,
        num_bins=3, seed=seed, shard=shard, **kw))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_dir) -> Path:
    return write_input_slice(data_dir, tmp_path_factory.mktemp("holdout") / "in", SLICE)


@pytest.fixture(scope="module")
def held(tmp_path_factory, inputs, mistral_dir):
    out = tmp_path_factory.mktemp("held") / "out"
    return out, _prepare(inputs, mistral_dir, out, holdout_fraction=FRACTION)


def _categories(inputs: Path) -> dict[str, str]:
    """doc id -> category, read from the input files."""
    return {f"{path}:{n}": json.loads(line)["category"] for path in sorted(inputs.iterdir())
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)}


def test_held_out_documents_are_whole_per_category_and_every_token_is_kept(held, inputs, mistral_dir, tmp_path):
    out, summary = held
    manifest, counts = summary.manifest, summary.counts
    assert (out / "eval" / "part-00000" / "state.json").is_file() and (out / "jsonl" / "eval-part-00000.jsonl").is_file()
    assert manifest.eval_dir == "eval" and manifest.holdout_fraction == FRACTION
    assert [p.name for p in manifest.eval_parts] == ["part-00000"]
    train, _ = reassemble(out)
    evaluation, chunks = reassemble(out, "eval")
    assert not set(train) & set(evaluation)  # a document is held out whole, never split between the two
    assert all(c == list(range(len(c))) for c in chunks.values())
    everything, _ = reassemble(_prepare(inputs, mistral_dir, tmp_path / "all").arrow_dir.parent)
    assert train | evaluation == everything  # token for token
    assert counts.tokens_in == counts.tokens_out == sum(len(ids) for ids, _ in everything.values())
    assert counts.eval_tokens == sum(len(ids) for ids, _ in evaluation.values())
    category = _categories(inputs)
    per_category = Counter(category[d] for d in everything)
    held_per_category = Counter(category[d] for d in evaluation)
    assert held_per_category == {c: round(FRACTION * n) for c, n in per_category.items()}
    assert counts.eval_documents == len(evaluation) and manifest.eval_parts[0].per_category.keys() == per_category.keys()


def test_the_held_out_documents_depend_on_the_seed_only(held, inputs, mistral_dir, tmp_path):
    out, _ = held
    again = _prepare(inputs, mistral_dir, tmp_path / "again", holdout_fraction=FRACTION)
    other = _prepare(inputs, mistral_dir, tmp_path / "other", seed=2, holdout_fraction=FRACTION)
    first = set(reassemble(out, "eval")[0])
    assert set(reassemble(again.arrow_dir.parent, "eval")[0]) == first
    assert set(reassemble(other.arrow_dir.parent, "eval")[0]) != first


def test_training_reads_the_held_out_split_like_the_training_parts(held, mistral_dir, tmp_path, inputs):
    out, summary = held
    tokenizer = load_tokenizer(mistral_dir)
    data = load_training_data([str(out)], tokenizer, 32000, 256, "mistral", split="eval")
    assert data.bucket_sizes == [summary.manifest.eval_parts[0].num_sequences] and len(data.dataset) > 10
    assert data.manifest.eval_dir == "eval"
    train = load_training_data([str(out)], tokenizer, 32000, 256, "mistral")
    assert sum(train.bucket_sizes) == sum(p.num_sequences for p in summary.manifest.parts)
    assert expand_dataset_args([str(out)], split="eval") == [out / "eval" / "part-00000"]
    plain = _prepare(inputs, mistral_dir, tmp_path / "plain")
    with pytest.raises(UserInputError, match=r"no held-out split \(prepared without --holdout_fraction, or no "):
        expand_dataset_args([str(plain.arrow_dir.parent)], split="eval")


def test_the_training_parts_are_never_their_own_held_out_split(held, inputs, mistral_dir, tmp_path):
    """``--dataset OUT/arrow`` (the README's form) or one of its parts: validation reads OUT's held-out split, and
    without one there is none to read (not the training rows, scored as if held out)."""
    from colossal_llama.training.inputs import held_out_splits

    out, _ = held
    for named in (out / "arrow", out / "arrow" / "part-00001", out / "eval", out / "eval" / "part-00000"):
        assert expand_dataset_args([str(named)], split="eval") == [out / "eval" / "part-00000"], named
    plain = _prepare(inputs, mistral_dir, tmp_path / "plain").arrow_dir
    for named in (plain, plain / "part-00000"):
        with pytest.raises(UserInputError, match="no held-out split"):
            expand_dataset_args([str(named)], split="eval")
    assert held_out_splits([str(plain), f"{plain / 'part-00000'}:0.5", str(out / "arrow")]) == [str(out / "arrow")]
    assert expand_dataset_args([str(plain)]) == [plain / f"part-{k:05d}" for k in range(3)]  # training reads them


def test_each_shard_holds_out_its_own_documents(inputs, mistral_dir, tmp_path):
    shards = [_prepare(inputs, mistral_dir, tmp_path / "out", shard=Shard(i, 2), holdout_fraction=FRACTION)
              for i in range(2)]
    parts = expand_dataset_args([str(tmp_path / "out")], split="eval")
    assert parts == [s.arrow_dir.parent / "eval" / "part-00000" for s in shards]
    for s in shards:
        assert s.counts.tokens_in == s.counts.tokens_out and s.counts.eval_documents > 0
    data = load_training_data([str(tmp_path / "out")], load_tokenizer(mistral_dir), 32000, 256, "m", split="eval")
    assert data.bucket_sizes == [sum(s.counts.eval_sequences for s in shards)]
