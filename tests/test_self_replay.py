"""Self-replay on the real SmolLM2-135M (CPU): texts sampled from the base model become pre-training rows.

Specification:
- ``num_texts`` samples from the start token, cut at EOS, written as ``{source: "", target, category}`` rows that
  data preparation takes whole (tokens in == tokens out); the summary counts texts, tokens and characters;
- samples with no text are skipped and counted, never written;
- the same seed gives the same file, another seed another file;
- an existing output is refused without ``--overwrite`` and stays as it was; with it, it is replaced;
- a start token the tokenizer lacks is a one-line error;
- split over N shards (torchrun ranks, or --num_shards/--shard_index) batch k is drawn by shard k % N: the N shard
  files together hold exactly the texts of a 1-shard run; a folder never mixes runs of different shard counts.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from colossal_llama.dataset.config import Shard
from colossal_llama.inference import self_replay
from colossal_llama.inference.generation import cut_at_stop
from colossal_llama.inference.self_replay import (OUTPUT_FILE, ReplayConfig, main, shard_batches,
                                                  write_self_replay)
from colossal_llama.utils.errors import UserInputError
from tests.support.launch import REPO, torchrun_command, wait_for_lines, worker_env

START = "<|endoftext|>"  # SmolLM2's document separator (its Instruct tokenizer's BOS is <|im_start|>)


def _config(model: Path, out: Path, **kw) -> ReplayConfig:
    settings = dict(num_texts=5, max_new_tokens=12, batch_size=2, start_token=START, device="cpu", seed=3)
    return ReplayConfig(model, out, **{**settings, **kw})


def _rows(out: Path, name: str = OUTPUT_FILE) -> list:
    return [json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines()]


def _shard_file(index: int, count: int) -> str:
    return f"self_replay.shard-{index:05d}-of-{count:05d}.jsonl"


@pytest.fixture(scope="module")
def sampled(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("replay") / "out"
    return out, write_self_replay(_config(smollm2_dir, out))


def test_samples_become_rows_that_data_preparation_takes_whole(sampled, smollm2_dir, tmp_path):
    from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig
    from colossal_llama.dataset.pipeline import prepare_pretrain

    out, summary = sampled
    rows = _rows(out)
    assert summary.texts == len(rows) and summary.texts + summary.empty == 5 and summary.texts >= 3
    assert all(set(r) == {"source", "target", "category"} and r["source"] == "" and r["target"].strip()
               and r["category"] == "self_replay" for r in rows)
    assert summary.characters == sum(len(r["target"]) for r in rows)
    assert 0 < summary.tokens <= 12 * summary.texts
    assert len({r["target"] for r in rows}) == len(rows)  # samples, not one greedy text five times
    prep = prepare_pretrain(PretrainPrepConfig(input_dirs=[out], tokenizer_dir=smollm2_dir,
                                               output=OutputLayout.under(tmp_path / "data"), max_length=64,
                                               num_bins=1))
    assert prep.counts.documents_in == len(rows) and prep.counts.tokens_in == prep.counts.tokens_out


def test_the_seed_alone_decides_the_samples(sampled, smollm2_dir, tmp_path):
    out, _ = sampled
    write_self_replay(_config(smollm2_dir, tmp_path / "again"))
    write_self_replay(_config(smollm2_dir, tmp_path / "other", seed=4))
    first = (out / OUTPUT_FILE).read_bytes()
    assert (tmp_path / "again" / OUTPUT_FILE).read_bytes() == first
    assert (tmp_path / "other" / OUTPUT_FILE).read_bytes() != first


def test_samples_without_text_are_counted_not_written(smollm2_dir, tmp_path, monkeypatch):
    from colossal_llama.tokenizer.loading import load_tokenizer

    eos = load_tokenizer(smollm2_dir).eos_token_id
    assert cut_at_stop([5, 6, eos, 7], [eos]) == [5, 6] and cut_at_stop([eos, 5], [eos]) == []
    batches = {0: [[], [28, 3853]], 1: [[]]}  # batch k -> its samples' ids
    monkeypatch.setattr(self_replay, "sample_batch", lambda model, tok, cfg, start, k, rows: batches[k])
    summary = write_self_replay(_config(smollm2_dir, tmp_path / "out", num_texts=3))
    assert (summary.texts, summary.empty, summary.tokens) == (1, 2, 2)
    assert len(_rows(tmp_path / "out")) == 1


def test_an_existing_output_is_kept_unless_overwrite(sampled, smollm2_dir, tmp_path, capsys):
    out, _ = sampled
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("earlier work")
    with pytest.raises(UserInputError, match="already exists"):
        write_self_replay(_config(smollm2_dir, target))
    assert [p.name for p in target.iterdir()] == ["mine.txt"]
    assert main(["--model_path", str(smollm2_dir), "--output_dir", str(target), "--num_texts", "5", "--batch_size",
                 "2", "--max_new_tokens", "12", "--start_token", START, "--device", "cpu", "--seed", "3",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_FILE]
    assert (target / OUTPUT_FILE).read_bytes() == (out / OUTPUT_FILE).read_bytes()  # the CLI = the library
    assert "self-replay: " in capsys.readouterr().out
    assert not list(tmp_path.glob(".out.*"))  # no temporary sibling left


def test_a_start_token_the_tokenizer_lacks_is_refused(smollm2_dir, tmp_path):
    with pytest.raises(UserInputError, match=r"--start_token '<\|no such\|>': not a token of this tokenizer"):
        write_self_replay(_config(smollm2_dir, tmp_path / "out", start_token="<|no such|>"))
    assert not (tmp_path / "out").exists()


def test_every_batch_belongs_to_exactly_one_shard():
    assert shard_batches(5, 2, Shard()) == [(0, 2), (1, 2), (2, 1)]
    assert shard_batches(5, 2, Shard(0, 2)) == [(0, 2), (2, 1)] and shard_batches(5, 2, Shard(1, 2)) == [(1, 2)]
    assert shard_batches(5, 2, Shard(3, 4)) == []  # more shards than batches: an empty file, not an error
    for texts, size, count in ((1000, 64, 3), (7, 7, 2), (130, 8, 5)):
        drawn = sorted(b for i in range(count) for b in shard_batches(texts, size, Shard(i, count)))
        assert drawn == shard_batches(texts, size, Shard()) and sum(rows for _, rows in drawn) == texts


def test_shards_together_hold_exactly_the_texts_of_one_run(sampled, smollm2_dir, tmp_path):
    out, whole = sampled
    parts = [write_self_replay(_config(smollm2_dir, tmp_path / "sharded", shard=Shard(i, 2))) for i in range(2)]
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [_shard_file(0, 2), _shard_file(1, 2)]
    rows = [r for i in range(2) for r in _rows(tmp_path / "sharded", _shard_file(i, 2))]
    assert sorted(r["target"] for r in rows) == sorted(r["target"] for r in _rows(out))
    assert (sum(p.texts for p in parts), sum(p.tokens for p in parts)) == (whole.texts, whole.tokens)
    assert [p.output.name for p in parts] == [_shard_file(0, 2), _shard_file(1, 2)]


def test_a_folder_never_mixes_shard_counts_and_keeps_a_finished_shard(sampled, smollm2_dir, tmp_path):
    out, _ = sampled
    with pytest.raises(UserInputError, match=re.escape(
            f"{out}: holds the output of a 1-shard run; a 2-shard run cannot write its shards beside it (remove it "
            "or choose another --output_dir)")):
        write_self_replay(_config(smollm2_dir, out, shard=Shard(0, 2), overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_FILE]
    shards = tmp_path / "sharded"
    shards.mkdir()
    (shards / _shard_file(1, 2)).write_text("earlier work\n")
    with pytest.raises(UserInputError, match="already exists"):
        write_self_replay(_config(smollm2_dir, shards, shard=Shard(1, 2)))
    with pytest.raises(UserInputError, match=re.escape(
            f"{shards / _shard_file(1, 2)}: a shard of a 2-shard run; this run writes 3 shard(s) (remove it or choose "
            "another --output_dir)")):
        write_self_replay(_config(smollm2_dir, shards, shard=Shard(0, 3)))
    assert [p.name for p in shards.iterdir()] == [_shard_file(1, 2)]
    assert (shards / _shard_file(1, 2)).read_text() == "earlier work\n"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torchrun_ranks_draw_the_shards_and_prepare_reads_them_whole(smollm2_dir, tmp_path):
    """What ``torchrun --nproc_per_node 8 -m colossal_llama.inference.self_replay`` does on a GPU node, on CPU:
    WORLD_SIZE/RANK pick the shard; the union equals one process's output, and data preparation takes it all."""
    args = ["--model_path", str(smollm2_dir), "--num_texts", "5", "--batch_size", "2", "--max_new_tokens", "12",
            "--start_token", START, "--device", "cpu", "--seed", "3"]
    entry = REPO / "colossal_llama" / "inference" / "self_replay.py"
    ranks = subprocess.run(torchrun_command([*args, "--output_dir", str(tmp_path / "ranks")], entry=entry),
                           capture_output=True, text=True, cwd=REPO, env=worker_env(), timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    one = subprocess.run([sys.executable, str(entry), *args, "--output_dir", str(tmp_path / "one")],
                         capture_output=True, text=True, cwd=REPO, env=worker_env(), timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir()) == [_shard_file(0, 2), _shard_file(1, 2)]
    rows = [r for i in range(2) for r in _rows(tmp_path / "ranks", _shard_file(i, 2))]
    assert rows and sorted(map(json.dumps, rows)) == sorted(map(json.dumps, _rows(tmp_path / "one")))

    from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig
    from colossal_llama.dataset.pipeline import prepare_pretrain

    prep = prepare_pretrain(PretrainPrepConfig(input_dirs=[tmp_path / "ranks"], tokenizer_dir=smollm2_dir,
                                               output=OutputLayout.under(tmp_path / "data"), max_length=64,
                                               num_bins=1))
    assert prep.counts.documents_in == len(rows) and prep.counts.tokens_in == prep.counts.tokens_out


@pytest.mark.slow
def test_a_killed_run_goes_on_where_it_stopped_and_writes_the_uninterrupted_file(smollm2_dir, tmp_path):
    """kill -9 after a few batches, a row cut short at the end of the partial file: the same command finishes the
    run and writes the file an uninterrupted run writes, byte for byte; other settings are refused."""
    entry = REPO / "colossal_llama" / "inference" / "self_replay.py"
    args = [sys.executable, str(entry), "--model_path", str(smollm2_dir), "--num_texts", "16", "--batch_size", "2",
            "--max_new_tokens", "12", "--start_token", START, "--device", "cpu", "--seed", "3"]

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args, "--output_dir", str(out), *extra], capture_output=True, text=True, cwd=REPO,
                              env=worker_env(), timeout=300)

    whole = run(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "killed"
    work = tmp_path / ".killed.replay-partial"
    progress, partial = work / f".{OUTPUT_FILE}.progress", work / OUTPUT_FILE
    proc = subprocess.Popen([*args, "--output_dir", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO, env=worker_env())
    wait_for_lines(progress, 3, proc, timeout=240)  # the settings and 2 batches recorded
    proc.kill()
    assert proc.wait(timeout=60) == -9  # killed, not finished
    recorded = len(progress.read_text().splitlines()) - 1
    assert 2 <= recorded < 8 and not out.exists()
    with open(partial, "a", encoding="utf-8") as fh:
        fh.write('{"source": "", "target": "a row cut sh')  # written after the last record: cut off on resume

    other = run(out, "--seed", "4")
    assert other.returncode != 0 and f"{progress}:1: settings: seed differ" in other.stderr
    again = run(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(rf"resuming .*: {recorded} of 8 batches", again.stderr)
    assert (out / OUTPUT_FILE).read_bytes() == (tmp_path / "whole" / OUTPUT_FILE).read_bytes()
    assert not work.exists()


def test_the_models_own_generation_config_does_not_bend_the_samples(smollm2_dir, tmp_path):
    """Self-replay samples the model's own distribution: a generation_config.json with a repetition penalty, a
    no-repeat rule and a minimum length (as fine-tuned models often ship) changes nothing."""
    from colossal_llama.inference.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(smollm2_dir, device="cpu")
    cfg = _config(smollm2_dir, tmp_path / "out", max_new_tokens=24)
    start = self_replay.start_token_id(tokenizer, START)
    plain = self_replay.sample_batch(model, tokenizer, cfg, start, 0, 2)
    model.generation_config.update(repetition_penalty=3.0, no_repeat_ngram_size=1, min_new_tokens=24)
    assert self_replay.sample_batch(model, tokenizer, cfg, start, 0, 2) == plain
