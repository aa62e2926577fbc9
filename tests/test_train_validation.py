"""Validation per category and replay mixtures, under torchrun with 2 gloo ranks (tiny LLaMA, real held-out data).

Specification:
- with a held-out split (``--holdout_fraction`` at preparation) training validates on it by default: loss and
  bits/char per category and overall, before the first step, every ``--eval_interval`` steps and after the last
  (whether or not an interval ends there), to the log, ``eval.jsonl`` and TensorBoard; bits/char divides by the
  characters of the scored text; the training losses are bit-for-bit those of a run without it;
- the validation of the same weights gives the same scores under ddp, 3d tp 2 and pipeline 2 (zero2 runs the
  forward ddp runs);
- ``--category_weights`` sets the realised mix of an epoch's sequences (within 2 %), the tokens seen per
  category are logged and survive a resume, and resume stays exact.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest

from colossal_llama.training.metrics import read_loss_log
from tests.support.train_runs import DP2_BATCH, PP2, TP2, assert_bitwise_equal, assert_resumed, train_args, train_ok

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

EVAL = ["--eval_interval", "2", "--eval_batches", "8"]
CATEGORIES = {"novel", "review", "all"}


@pytest.fixture(scope="module")
def validated(tmp_path_factory, tiny_llama, prepared_with_heldout):
    """Two ddp runs on the same data: with validation (every 2 steps) and without (--eval_batches 0)."""
    root = tmp_path_factory.mktemp("validated")
    runs = {}
    for name, extra in (("with", [*EVAL, "--tensorboard_dir", str(root / "tb")]), ("without", ["--eval_batches", "0"])):
        log = train_ok(root, name, train_args(tiny_llama, prepared_with_heldout, root / name, "--plugin", "ddp",
                                              *DP2_BATCH, *extra)).read_text()
        runs[name] = (root / name, log)
    runs["tb"], runs["inputs"] = root / "tb", (tiny_llama, prepared_with_heldout)
    return runs


def _planned(model, data, split: str) -> dict:
    """Per category, ``(loss tokens, characters)`` of the batches validation plans (EVAL's 8 batches of DP2_BATCH's
    1 row) over ``split`` of ``data``, counted here as a user would: loss tokens shifted (a row's first label
    predicts nothing), characters those of the text its loss-bearing labels spell, special tokens dropped."""
    from colossal_llama.tokenizer.loading import load_tokenizer
    from colossal_llama.utils.labels import IGNORE_INDEX
    from colossal_llama.training.data import load_training_data
    from colossal_llama.training.validation import batch_plan

    tokenizer = load_tokenizer(model)
    special = set(tokenizer.all_special_ids)
    rows = load_training_data([str(data)], tokenizer, 10**6, 128, "-", split=split)
    plan = batch_plan([rows.categories[c] for c in rows.row_category], 1, 8)
    counts = {}
    for category, batch in plan:
        for r in batch:
            scored = [int(t) for t in rows.dataset[int(r)]["labels"][1:] if t != IGNORE_INDEX]
            text = tokenizer.decode([t for t in scored if t not in special])
            tokens, characters = counts.get(category, (0, 0))
            counts[category] = (tokens + len(scored), characters + len(text))
    return counts


def test_validation_reports_each_category_and_leaves_training_untouched(validated):
    (with_eval, log), (without, _) = validated["with"], validated["without"]
    assert read_loss_log(with_eval / "losses.jsonl") == read_loss_log(without / "losses.jsonl")  # bit for bit
    assert not (without / "eval.jsonl").read_text().strip()
    records = [json.loads(line) for line in (with_eval / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4, 6, 8]
    for record in records:
        assert set(record["scores"]) == CATEGORIES
        for score in record["scores"].values():
            assert score["bpc"] == pytest.approx(score["loss"] * score["tokens"] / math.log(2) / score["characters"])
        parts = [record["scores"][c] for c in ("novel", "review")]
        assert record["scores"]["all"]["tokens"] == sum(p["tokens"] for p in parts)
    first, last = records[0]["scores"]["all"], records[-1]["scores"]["all"]
    assert last["loss"] < first["loss"] - 0.05 and last["characters"] == first["characters"]  # same batches
    held_out, trained = (_planned(*validated["inputs"], split) for split in ("eval", "train"))
    assert set(held_out) == {"novel", "review"} and held_out != trained  # the held-out rows, not the training rows
    expected = {**held_out, "all": tuple(map(sum, zip(*held_out.values())))}
    for record in records:  # bits/char's denominator: the characters of the scored text, each category's own
        assert {c: (s["tokens"], s["characters"]) for c, s in record["scores"].items()} == expected
    assert "validation after step 8:" in log and "  novel " in log and "bits/char" in log
    from colossal_llama.utils.plot_losses import read_scalars

    series = read_scalars(validated["tb"])
    assert [s for s, _ in series["eval/bpc/review"]] == [0, 2, 4, 6, 8]


def test_a_validation_a_stop_skipped_is_the_resumed_runs_first_work(validated, tmp_path, tiny_llama,
                                                                    prepared_with_heldout):
    """A stop agreed in a step whose validation is due saves at once (a scheduler's grace period is short) and
    skips it; the checkpoint says so and the resumed run validates that step before training on: the eval curve
    has no hole (step 4 was missing), and the score is the uninterrupted run's."""
    from tests.support.launch import run_training, tail

    args = train_args(tiny_llama, prepared_with_heldout, tmp_path / "run", "--plugin", "ddp", *DP2_BATCH, *EVAL)
    args[args.index("--save_interval") + 1] = "5"  # no checkpoint at step 3: the vote is counted in step 4
    stopped = run_training(args, tmp_path / "stopped.log", env={"CL_TEST_SIGNAL_AFTER_STEP": "3"})
    assert stopped.returncode != 0 and "stopped by SIGTERM after step 4 of 8" in (tmp_path / "stopped.log").read_text()
    states = json.loads((tmp_path / "run" / "epoch-0_step-4" / "running_states.json").read_text())
    assert states["validation_due"] is True

    def eval_steps():
        return [json.loads(line)["step"] for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]

    assert eval_steps() == [0, 2]  # the stop came first
    log = train_ok(tmp_path, "resumed", args + ["--load_checkpoint", "latest"]).read_text()
    assert_resumed(log, tmp_path / "run" / "epoch-0_step-4")
    assert eval_steps() == [0, 2, 4, 6, 8], tail(tmp_path / "resumed.log")
    reference = [json.loads(line) for line in (validated["with"][0] / "eval.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert resumed == reference
    assert_bitwise_equal(validated["with"][0], tmp_path / "run")


def _step0_scores(tmp_path, name, tiny_llama, data, layout):
    """The step-0 scores of a 3-step run validating every 2 steps: it validates before the first step, at step 2
    and after the last, step 3, which is no multiple of --eval_interval."""
    args = train_args(tiny_llama, data, tmp_path / name, *layout, *EVAL)
    args[args.index("--max_steps") + 1] = "3"
    train_ok(tmp_path, name, args)
    records = [json.loads(line) for line in (tmp_path / name / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 3]
    return records[0]["scores"]


@pytest.mark.parametrize("layout", [TP2, PP2], ids=["3d_tp2", "pp2"])
def test_validation_gives_the_same_scores_under_every_plugin(validated, tmp_path, tiny_llama, prepared_with_heldout,
                                                              layout):
    """Step 0 (before any update): the same weights, the same held-out batches, one table from every layout.
    Validation batches have --batch_size rows (a pipeline needs its training batch size), so pp 2 is compared
    with ddp at that batch size."""
    if layout is PP2:
        reference = _step0_scores(tmp_path, "ddp", tiny_llama, prepared_with_heldout,
                                  ["--plugin", "ddp", "--batch_size", "4"])
    else:
        reference = json.loads((validated["with"][0] / "eval.jsonl").read_text().splitlines()[0])["scores"]
    got = _step0_scores(tmp_path, "run", tiny_llama, prepared_with_heldout, layout)
    for name in CATEGORIES:
        assert got[name]["tokens"] == reference[name]["tokens"]
        assert got[name]["loss"] == pytest.approx(reference[name]["loss"], rel=1e-5), name


def test_category_weights_set_the_mix_and_resume_exactly(tmp_path, tiny_llama, prepared_with_heldout):
    import numpy as np

    from colossal_llama.tokenizer.loading import load_tokenizer
    from colossal_llama.training.data import load_training_data
    from colossal_llama.training.mixture import Mixture, parse_category_weights

    weights = "novel=3,review=1"
    mix = ["--category_weights", weights, "--eval_batches", "0", "--tensorboard_dir", str(tmp_path / "tb")]
    args = train_args(tiny_llama, prepared_with_heldout, tmp_path / "full", "--plugin", "ddp", *DP2_BATCH, *mix)
    log = train_ok(tmp_path, "full", args).read_text()
    assert "replay mixture (share of every epoch's sequences)" in log and "novel: 75.0%" in log
    assert "tokens so far: novel" in log
    states = json.loads((tmp_path / "full" / "epoch-0_step-8" / "running_states.json").read_text())
    seen = states["category_tokens"]
    assert set(seen) == {"novel", "review"} and seen["novel"] > 2 * seen["review"]

    # over a whole epoch the sampler's draws match the weights within 2 %
    data = load_training_data([str(prepared_with_heldout)], load_tokenizer(tiny_llama), 10**6, 128, "-")
    mixture = Mixture.build(data.bucket_groups(), {}, parse_category_weights(weights))
    order = mixture.epoch_order(seed=42, epoch=0, shuffle_buckets=False)
    novel = np.isin(order, np.flatnonzero(data.row_category == data.categories.index("novel"))).mean()
    assert abs(novel - 0.75) < 0.02
    natural = (data.row_category == data.categories.index("novel")).mean()
    assert abs(natural - 0.75) > 0.2  # the weights, not the sizes, made it

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "epoch-0_step-3", resumed / "epoch-0_step-3")
    (resumed / "losses.jsonl").write_text("".join((tmp_path / "full" / "losses.jsonl").read_text()
                                                  .splitlines(keepends=True)[:3]))
    # a mark in the checkpoint's running totals: a resume carries it on, a fresh start would not
    states_file = resumed / "epoch-0_step-3" / "running_states.json"
    marked = json.loads(states_file.read_text())
    marked["category_tokens"]["review"] += 1_000_000
    states_file.write_text(json.dumps(marked))
    resume_args = train_args(tiny_llama, prepared_with_heldout, resumed, "--plugin", "ddp", *DP2_BATCH,
                             "--category_weights", weights, "--eval_batches", "0", "--load_checkpoint", "latest")
    assert_resumed(train_ok(tmp_path, "resumed", resume_args).read_text(), resumed / "epoch-0_step-3")
    assert_bitwise_equal(tmp_path / "full", resumed)
    final = json.loads((resumed / "epoch-0_step-8" / "running_states.json").read_text())
    assert final["category_tokens"] == {**seen, "review": seen["review"] + 1_000_000}  # carried across the resume
