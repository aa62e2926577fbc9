"""Preparation split over shards (nodes) on the real corpora: the union of N shards is exactly the 1-shard run,
and training reads bucket k as the union of part k of every shard, once every manifest agrees."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig, Shard
from colossal_llama.dataset.pipeline import prepare_pretrain
from colossal_llama.dataset.prepared import load_part, resolve_parts
from colossal_llama.training.data import StepBatchSampler, collect_parts, epoch_order, expand_dataset_args, load_prepared
from colossal_llama.utils.errors import UserInputError
from tests.support.launch import torchrun_command
from tests.support.prepared_data import reassemble, write_input_slice

REPO = Path(__file__).resolve().parents[1]
SLICE = {"en_novel_botchan.jsonl": 292, "zh_reviews.jsonl": 500, "zh_news_peoples_daily_199801.jsonl": 500}
BINS = 3


def _prepare(inputs: Path, tokenizer_dir: Path, out: Path, shard: Shard = Shard(), **kw):
    config = PretrainPrepConfig(input_dirs=[inputs], tokenizer_dir=tokenizer_dir, output=OutputLayout.under(out, shard),
                                max_length=kw.pop("max_length", 256), num_bins=kw.pop("num_bins", BINS), seed=3,
                                shard=shard, **kw)
    return prepare_pretrain(config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, mistral_dir) -> dict:
    """The same real slice prepared as 1 shard and as 2 shards (in one process, shard by shard)."""
    root = tmp_path_factory.mktemp("shards")
    inputs = write_input_slice(data_dir, root / "in", SLICE)
    one = _prepare(inputs, mistral_dir, root / "one")
    two = [_prepare(inputs, mistral_dir, root / "two", Shard(i, 2)) for i in range(2)]
    return {"inputs": inputs, "root": root, "one": one, "two": two}


def test_two_shards_hold_exactly_the_documents_and_tokens_of_one_run(runs):
    one, two = runs["one"], runs["two"]
    root = runs["root"]
    assert [s.arrow_dir for s in two] == [root / "two" / f"shard-0000{i}-of-00002" / "arrow" for i in range(2)]
    docs_one, _ = reassemble(root / "one")
    docs_two = [reassemble(s.arrow_dir.parent)[0] for s in two]
    assert not set(docs_two[0]) & set(docs_two[1])                  # no document in both shards
    assert docs_two[0] | docs_two[1] == docs_one                     # every document, token for token
    # the 3 files split evenly into whole files (largest first to the lighter shard): each shard reads its own
    files = [{doc.rsplit(":", 1)[0] for doc in docs} for docs in docs_two]
    assert [sorted(Path(f).name for f in names) for names in files] == [
        ["zh_reviews.jsonl"], ["en_novel_botchan.jsonl", "zh_news_peoples_daily_199801.jsonl"]]
    counts = [s.counts for s in two]
    for name in ("lines_read", "documents_in", "tokens_in", "tokens_out", "tokens_trained"):
        assert sum(getattr(c, name) for c in counts) == getattr(one.counts, name), name
    assert Counter(one.counts.skipped) == sum((Counter(c.skipped) for c in counts), Counter())
    assert one.counts.skipped == {"empty_text": 1}  # en_novel_botchan.jsonl:292, a real row without text
    for s in two:
        assert (s.manifest.shard_index, s.manifest.num_shards) == (two.index(s), 2)
        assert s.counts.tokens_in == s.counts.tokens_out


def test_shards_read_whole_files_where_the_inputs_split_evenly_into_them_else_their_lines_of_every_file(
        data_dir, mistral_dir, tmp_path, monkeypatch):
    """Each shard scanned every line of every input file to keep 1/N of them: 64 machines each read a 400 GB corpus
    to tokenise a 64th of it. Where the files split evenly (largest first, each to the shard with the fewest bytes
    so far; the largest shard within 25 % of the mean), a shard opens its own files only; else (fewer files than
    shards, or one file most of the bytes) it keeps line L of file F when (F + L) % N is its index, an even split
    of the documents. Either way the shards hold the 1-shard run's documents, each once."""
    from colossal_llama.dataset import records

    assert Shard(0, 2).whole_files([10, 10, 10, 10]) == {0, 2} and Shard(1, 2).whole_files([10, 10, 10, 10]) == {1, 3}
    # 30 to shard 0, 20 to shard 1, 10 to the lighter shard 1, 5 to shard 0 (30 each: a tie goes to the lower)
    assert Shard(1, 2).whole_files([30, 10, 20, 5]) == {1, 2} and Shard(0, 2).whole_files([30, 10, 20, 5]) == {0, 3}
    assert Shard(0, 2).whole_files([100, 1, 1]) is None  # one file most of the bytes: 100 > 1.25 x 51
    assert Shard(0, 3).whole_files([5, 5]) is None  # fewer files than shards
    original, opened = records.iter_lines, []
    monkeypatch.setattr(records, "iter_lines", lambda path: opened.append(path.name) or original(path))
    inputs = write_input_slice(data_dir, tmp_path / "in", {"zh_reviews.jsonl": 150, "en_novel_botchan.jsonl": 100})
    one = reassemble(_prepare(inputs, mistral_dir, tmp_path / "one").arrow_dir.parent)[0]
    for count, whole in ((2, True), (3, False)):  # 2 files on 3 shards: by line
        opened.clear()
        shards = [_prepare(inputs, mistral_dir, tmp_path / f"of-{count}", Shard(i, count)) for i in range(count)]
        docs = [reassemble(s.arrow_dir.parent)[0] for s in shards]
        assert sum(len(d) for d in docs) == len(one) and dict(kv for d in docs for kv in d.items()) == one
        if whole:
            assert sorted(opened) == ["en_novel_botchan.jsonl", "zh_reviews.jsonl"], opened  # each file by one shard
        else:
            assert sorted(opened) == sorted(["en_novel_botchan.jsonl", "zh_reviews.jsonl"] * count)
            assert all(0.25 < len(d) / len(one) < 0.42 for d in docs), [len(d) for d in docs]


def test_shards_that_read_other_input_files_are_refused(runs, mistral_dir, tmp_path):
    """Each shard takes the lines (file index + line) % N: a shard prepared from another set of files (a machine's
    copy without one file) shifts every later file's index, so both shards took the same lines of some documents
    and neither the others, and training read them without a word. A shard folder renamed is refused too."""
    import shutil

    fewer = tmp_path / "fewer"
    shutil.copytree(runs["inputs"], fewer)
    (fewer / "en_novel_botchan.jsonl").unlink()
    root = runs["root"]
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "two" / "shard-00000-of-00002", mixed / "shard-00000-of-00002")
    _prepare(fewer, mistral_dir, mixed, Shard(1, 2))
    with pytest.raises(UserInputError, match=r"shard-00001-of-00002/manifest.json: inputs: 2 files, [\d,]+ bytes, "
                                             r"but shard-00000-of-00002 read 3 files, [\d,]+ bytes"):
        resolve_parts(mixed)
    renamed = tmp_path / "renamed"
    shutil.copytree(root / "two" / "shard-00000-of-00002", renamed / "shard-00000-of-00002")
    shutil.copytree(root / "two" / "shard-00000-of-00002", renamed / "shard-00001-of-00002")
    with pytest.raises(UserInputError, match=r"shard_index, num_shards: 0, 2, not the folder's 1, 2"):
        resolve_parts(renamed)
    assert len(resolve_parts(root / "two")) == 2 * BINS  # the shards of one run: read


def test_a_shard_keeps_its_token_cache_on_a_local_disk(runs, mistral_dir, tmp_path):
    """--data_cache_dir with --data_output_dirs: the cache (read back at random while the parts are written) on the
    machine's own disk instead of OUT/ on the shared filesystem, in a folder of its shard; the same parts."""
    from colossal_llama.dataset.cli import pretrain_main

    local, out = tmp_path / "local", tmp_path / "shared"
    assert pretrain_main(["--data_input_dirs", str(runs["inputs"]), "--tokenizer_dir", str(mistral_dir),
                          "--data_output_dirs", str(out), "--data_cache_dir", str(local), "--num_shards", "2",
                          "--shard_index", "1", "--max_length", "256", "--num_spliced_dataset_bins", str(BINS),
                          "--seed", "3"]) == 0
    shard = "shard-00001-of-00002"
    assert (local / shard).is_dir() and not any((local / shard).iterdir())  # used, and emptied at the end
    assert not (out / shard / "cache").exists()
    ours, theirs = out / shard, runs["root"] / "two" / shard
    for k in range(BINS):
        assert load_part(ours / "arrow" / f"part-0000{k}")["input_ids"] == \
            load_part(theirs / "arrow" / f"part-0000{k}")["input_ids"], k


def test_training_buckets_are_the_union_of_each_shards_part(runs):
    root, two = runs["root"], runs["two"]
    parts, manifests = collect_parts(expand_dataset_args([str(root / "two")]))
    assert [p.path for p in parts] == [s.arrow_dir / f"part-0000{k}" for s in two for k in range(BINS)]
    data = load_prepared(parts, manifests)
    shard_sizes = [[len(load_part(s.arrow_dir / f"part-0000{k}")) for k in range(BINS)] for s in two]
    assert data.bucket_sizes == [a + b for a, b in zip(*shard_sizes)]
    # the sampler walks bucket k = part k of shard 0 then of shard 1, shuffled together
    order = epoch_order(data.bucket_sizes, seed=5, epoch=0, shuffle_buckets=False)
    start = 0
    for k, size in enumerate(data.bucket_sizes):
        rows = {tuple(data.dataset[int(i)]["input_ids"]) for i in order[start:start + size]}
        expected = {tuple(r) for s in two for r in load_part(s.arrow_dir / f"part-0000{k}")["input_ids"]}
        assert rows == expected, k
        start += size
    sampler = StepBatchSampler(data.bucket_sizes, micro_batch=2, accumulation_steps=1, dp_rank=0, dp_size=1,
                               seed=5, shuffle_buckets=False)
    assert [i for batch in sampler for i in batch] == order[: sampler.steps_per_epoch * 2].tolist()


def test_every_form_of_dataset_argument_names_the_same_parts(runs):
    root, two = runs["root"], runs["two"]
    everything = expand_dataset_args([str(root / "two")])
    shard_dirs = [str(s.arrow_dir.parent) for s in two]
    assert expand_dataset_args(shard_dirs) == everything
    assert expand_dataset_args([str(s.arrow_dir) for s in two]) == everything
    assert expand_dataset_args([str(p) for p in everything]) == everything
    assert resolve_parts(root / "one") == resolve_parts(root / "one" / "arrow")
    with pytest.raises(UserInputError, match="named twice"):
        expand_dataset_args([str(root / "two"), shard_dirs[0]])


def test_a_missing_or_disagreeing_shard_is_refused(runs, mistral_dir, tmp_path):
    root, inputs = runs["root"], runs["inputs"]
    lonely = tmp_path / "lonely"
    _prepare(inputs, mistral_dir, lonely, Shard(0, 2))
    with pytest.raises(UserInputError, match=r"shard-00001-of-00002: shard 1 of 2 is missing \(prepare it"):
        expand_dataset_args([str(lonely)])
    _prepare(inputs, mistral_dir, lonely, Shard(1, 2), num_bins=2)
    with pytest.raises(UserInputError, match=r"shard-00001-of-00002/manifest.json: num_bins: 2 differs from 3 in "):
        collect_parts(expand_dataset_args([str(lonely)]))
    mixed = [str(root / "two" / "shard-00000-of-00002"), str(lonely / "shard-00001-of-00002")]
    with pytest.raises(UserInputError, match="num_bins: 2 differs from 3"):
        collect_parts(expand_dataset_args(mixed))


def test_a_shard_run_does_not_mix_with_another_layout(runs, mistral_dir, capsys):
    from colossal_llama.dataset.cli import pretrain_main

    root, inputs = runs["root"], runs["inputs"]
    common = ["--data_input_dirs", str(inputs), "--tokenizer_dir", str(mistral_dir), "--max_length", "256",
              "--num_spliced_dataset_bins", str(BINS), "--overwrite"]
    with pytest.raises(SystemExit):
        pretrain_main(common + ["--data_output_dirs", str(root / "one"), "--num_shards", "2", "--shard_index", "0"])
    assert capsys.readouterr().err.strip().endswith(
        f"{root / 'one'}: holds the output of a 1-shard run; a 2-shard run cannot write its shards beside it "
        "(remove it or choose another --data_output_dirs)")
    with pytest.raises(SystemExit):
        pretrain_main(common + ["--data_output_dirs", str(root / "two"), "--num_shards", "3", "--shard_index", "2"])
    assert capsys.readouterr().err.strip().endswith(
        f"{root / 'two' / 'shard-00000-of-00002'}: a shard of a 2-shard run; this run writes 3 shard(s) "
        "(remove it or choose another --data_output_dirs)")


@pytest.mark.parametrize("flags, env, expected", [
    ((None, None), {}, Shard(0, 1)),
    ((None, None), {"WORLD_SIZE": "4", "RANK": "3"}, Shard(3, 4)),       # torchrun / colossalai run
    ((2, 0), {"WORLD_SIZE": "4", "RANK": "3"}, Shard(0, 2)),             # the flags win
    ((1, None), {}, Shard(0, 1)),
])
def test_shard_comes_from_flags_else_the_launcher(flags, env, expected):
    assert Shard.from_launcher(*flags, environ=env) == expected


@pytest.mark.parametrize("flags, message", [
    ((2, None), "give both --num_shards and --shard_index"),
    ((2, 2), r"--shard_index 2: must be in 0..1 \(--num_shards 2\)"),
])
def test_bad_shard_flags_are_one_line_errors(flags, message):
    with pytest.raises(UserInputError, match=message):
        Shard.from_launcher(*flags, environ={})


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torchrun_spreads_the_shards_over_its_processes(runs, mistral_dir, tmp_path):
    """What ``colossalai run --hostfile H prepare_pretrain_dataset.py`` does on each node: WORLD_SIZE/RANK pick
    the shard. Two processes give the same shards as preparing them one by one."""
    proc = subprocess.run(
        torchrun_command(["--data_input_dirs", str(runs["inputs"]), "--tokenizer_dir", str(mistral_dir),
                          "--data_output_dirs", str(tmp_path / "out"), "--max_length", "256",
                          "--num_spliced_dataset_bins", str(BINS), "--seed", "3"],
                         entry=REPO / "prepare_pretrain_dataset.py"),
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for shard in runs["two"]:
        mine = tmp_path / "out" / shard.arrow_dir.parent.name
        for k in range(BINS):
            a, b = load_part(mine / "arrow" / f"part-0000{k}"), load_part(shard.arrow_dir / f"part-0000{k}")
            assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    assert sorted(os.listdir(tmp_path / "out")) == ["shard-00000-of-00002", "shard-00001-of-00002"]


def _same_size_slices(path: Path, first: int) -> tuple[bytes, bytes]:
    """The first ``first`` lines of the real ``path`` and a later stretch of other lines of exactly as many bytes."""
    lines = path.read_bytes().splitlines(keepends=True)
    target, ends, total = sum(map(len, lines[:first])), {0: first}, 0
    for j in range(first, len(lines)):
        total += len(lines[j])
        if total - target in ends:
            return b"".join(lines[:first]), b"".join(lines[ends[total - target]:j + 1])
        ends[total] = j + 1
    raise AssertionError(f"{path}: no stretch of {target} bytes")


def test_shards_of_swapped_input_folders_are_refused(data_dir, mistral_dir, tmp_path):
    """Two --data_input_dirs entries holding files of the same names and sizes (a/reviews.jsonl, b/reviews.jsonl),
    given as a,b to shard 0 and b,a to shard 1: the names-and-sizes fingerprint was the same, so training read
    the shards together, every document of one half twice and the other half not at all."""
    first, second = _same_size_slices(data_dir / "pretrain" / "zh_reviews.jsonl", 200)
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, data in ((a, first), (b, second)):
        folder.mkdir()
        (folder / "reviews.jsonl").write_bytes(data)
    out = tmp_path / "out"

    def prepare(index, order):
        shard = Shard(index, 2)
        prepare_pretrain(PretrainPrepConfig(input_dirs=order, tokenizer_dir=mistral_dir, max_length=256, num_bins=2,
                                            output=OutputLayout.under(out, shard), seed=3, shard=shard, overwrite=True))

    prepare(0, [a, b])
    prepare(1, [b, a])
    expected = (r"shard-00001-of-00002/manifest.json: inputs: 2 files, ([\d,]+) bytes, but shard-00000-of-00002 "
                r"read 2 files, \1 bytes \(the same names and sizes, other contents: --data_input_dirs folders "
                r"swapped")
    with pytest.raises(UserInputError, match=expected):
        resolve_parts(out)
    copy = tmp_path / "copy"  # the same files elsewhere (another machine's copy): still one set of inputs
    shutil.copytree(tmp_path / "a", copy / "a")
    shutil.copytree(tmp_path / "b", copy / "b")
    prepare(1, [copy / "a", copy / "b"])
    assert len(resolve_parts(out)) == 4
