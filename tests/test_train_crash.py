"""Crash safety of training under torchrun (2 gloo ranks, CPU, tiny LLaMA, real prepared data).

Specification:
- a run killed with SIGKILL (the launcher *and* every rank, checked gone) at any moment - start-up, a step, the
  middle of a checkpoint save - resumes with ``--load_checkpoint latest`` to a ``losses.jsonl`` equal to the
  uninterrupted run's bit for bit; with NEFTune on, under ddp and zero2, with and without recomputation;
- the ranks of a run whose launcher alone was killed stop at once (they never go on writing checkpoints);
- a SIGTERM to the launcher (a scheduler stopping the job) or to one rank alone stops every rank at the same step,
  with a checkpoint of that step, exit code 143, and a resume equal to the uninterrupted run bit for bit; a rank
  whose peer is dead (frozen) leaves on SIGTERM as soon as the peer's heartbeat is silent, not after the timeout;
- a run whose loss or gradient norm turns nan stops at that step with one line naming the newest checkpoint, and
  nothing nan is ever recorded or saved;
- a save that runs out of disk space stops with one line (what a checkpoint takes, what is free), after a warning
  at the checkpoint before it; with space freed, the run resumes to the uninterrupted run's losses;
- one run per ``--save_dir``: a second run is refused with one line naming the holder, printed once, before the
  launcher's own report; the lock of a dead run is taken over with a warning;
- a finished run is never restarted over without ``--overwrite``;
- a damaged checkpoint file is named in a one-line error, with the older complete checkpoint to use instead;
- a checkpoint resumes on another number of ranks, or another layout, at the same sample; one that disagrees with
  the run on LoRA, or holds weights of another model than --pretrained, is named in a one-line error.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from colossal_llama.training.checkpoint import (TMP_PREFIX, LoadTarget, check_lora_matches, check_same_model,
                                                complete_checkpoints, latest_checkpoint, verify_checkpoint)
from colossal_llama.training.disk_space import free_bytes, tree_bytes
from colossal_llama.training.metrics import read_loss_log
from colossal_llama.training.optim import warmup_cosine_factor
from colossal_llama.utils.errors import UserInputError
from tests.support.launch import (alive, free_port, kill_launcher_and_ranks, kill_processes, rank_processes,
                                  run_training, start_training, tail, wait_for_lines)
from tests.support.train_runs import (DP1_BATCH, DP2_BATCH, LAYOUTS, LORA_RANK, MAX_STEPS, SAVE_INTERVAL,
                                     assert_bitwise_equal, assert_resumed, train_args, train_ok)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

LATEST = ["--load_checkpoint", "latest"]


def _loss_lines(save_dir: Path) -> int:
    path = save_dir / "losses.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.parametrize("layout", ["3d_tp2", "pp2"])
def test_kill9_at_random_step_resumes_bitwise(reference_runs, tmp_path, layout):
    """3d tp2: model and optimizer shards per tp rank. pp2: per pipeline stage. (ddp with NEFTune is killed at
    random moments ten times below.)"""
    kill_after = random.Random().randint(SAVE_INTERVAL + 1, MAX_STEPS - 1)
    save_dir = tmp_path / "ckpt"
    args = reference_runs.args(layout, save_dir)
    proc = start_training(args, tmp_path / "killed.log")
    seen = wait_for_lines(save_dir / "losses.jsonl", kill_after, proc)
    assert proc.poll() is None, f"finished before the kill at step {kill_after}:\n{tail(tmp_path / 'killed.log')}"
    kill_launcher_and_ranks(proc)
    assert seen < MAX_STEPS and not (save_dir / "modeling").exists()
    newest = latest_checkpoint(save_dir)
    assert newest is not None, f"killed after step {seen} with no complete checkpoint"
    log = train_ok(tmp_path, "resumed", args + LATEST).read_text()
    # the newest checkpoint, not an older one (training is deterministic: an older start would match too)
    assert_resumed(log, newest)
    assert_bitwise_equal(reference_runs[layout], save_dir)


def test_kill9_during_checkpoint_save_leaves_no_complete_checkpoint(reference_runs, tmp_path):
    """zero2 (sharded optimizer states): SIGKILL inside the save of step 6 at its last moment, when every shard and
    running_states.json are written but the dir is not yet renamed into place."""
    crash_step = 2 * SAVE_INTERVAL
    save_dir = tmp_path / "ckpt"
    args = reference_runs.args("zero2", save_dir)
    proc = run_training(args, tmp_path / "killed.log", env={"CL_TEST_KILL_DURING_SAVE_STEP": str(crash_step)})
    assert proc.returncode != 0
    assert "Signal 9 (SIGKILL) received" in (tmp_path / "killed.log").read_text()  # the injected kill
    half_written = save_dir / f".tmp-epoch-0_step-{crash_step}"
    assert (half_written / "modeling").is_dir() and (half_written / "running_states.json").is_file()
    complete = reference_runs["zero2"] / f"epoch-0_step-{crash_step}" / "optimizer"
    assert sorted(p.name for p in (half_written / "optimizer").iterdir()) == sorted(p.name for p in complete.iterdir())
    assert not (save_dir / f"epoch-0_step-{crash_step}").exists()
    assert latest_checkpoint(save_dir).name == f"epoch-0_step-{SAVE_INTERVAL}"
    log = train_ok(tmp_path, "resumed", args + LATEST).read_text()
    assert f"resumed from {save_dir / f'epoch-0_step-{SAVE_INTERVAL}'}" in log
    assert f"removed 1 half-written folders of an interrupted run: {half_written.name}" in log
    assert not half_written.exists()
    assert_bitwise_equal(reference_runs["zero2"], save_dir)


@pytest.mark.parametrize("layout", ["ddp_neft", "ddp_neft_recompute", "zero2_neft", "zero2_neft_recompute",
                                    "lora_ddp", "zero2_bf16", "3d_dp2_bf16"])
def test_resume_from_a_copied_checkpoint_is_bitwise(reference_runs, tmp_path, layout):
    """NEFTune's deterministic repro: a fresh save dir holding only checkpoint 3 (and the first 3 loss records)
    of a finished run resumes to the finished run's steps 4..8 exactly. LoRA: the checkpoint holds only the
    adapters and embeddings; the frozen base comes from --pretrained. bf16 under ZeRO: the checkpoint holds the
    optimizer's fp32 master weights besides the bf16 model (rebuilt from bf16, step 4 differed already)."""
    reference = reference_runs[layout]
    save_dir = tmp_path / "ckpt"
    _copy_checkpoint_3(reference, save_dir)
    log = train_ok(tmp_path, "resumed", reference_runs.args(layout, save_dir, *LATEST)).read_text()
    assert_resumed(log, save_dir / f"epoch-0_step-{SAVE_INTERVAL}")  # not a fresh run that happens to match
    assert_bitwise_equal(reference, save_dir)
    checkpoint = save_dir / f"epoch-0_step-{SAVE_INTERVAL}"
    masters = sorted(p.name for p in (checkpoint / "optimizer" / "master-weights").glob("*"))
    assert masters == {"zero2_bf16": ["index.json", "rank-00000.pt", "rank-00001.pt"],
                       "3d_dp2_bf16": ["tp-000_pp-000.pt"]}.get(layout, []), masters


def _copy_checkpoint_3(reference: Path, save_dir: Path) -> None:
    """A fresh save dir holding only checkpoint 3 of a finished run and its first 3 loss records."""
    save_dir.mkdir()
    shutil.copytree(reference / f"epoch-0_step-{SAVE_INTERVAL}", save_dir / f"epoch-0_step-{SAVE_INTERVAL}")
    head = (reference / "losses.jsonl").read_text().splitlines(keepends=True)[:SAVE_INTERVAL]
    (save_dir / "losses.jsonl").write_text("".join(head))


@pytest.mark.parametrize("saved, resumed, nproc", [("ddp", "ddp", 1), ("zero2", "zero2", 1),
                                                   ("3d_tp2", "zero2", 2), ("zero2_bf16", "zero2_bf16", 1),
                                                   ("3d_dp2_bf16", "3d_dp2_bf16", 1)])
def test_a_checkpoint_resumes_on_other_ranks_at_the_same_sample(reference_runs, tmp_path, saved, resumed, nproc):
    """A node lost, the job resumed on fewer GPUs: checkpoint 3 of a 2-rank run (zero2: optimizer states sharded
    over the 2 ranks) resumed by 1 rank with the same global batch (1 x 4 micro-batches instead of 2 x 2) goes on
    from the next sample with the whole optimizer state: steps 4..8 as the 2-rank run's, up to the order of float
    sums (each step's gradient is summed in another order), never a restarted epoch or a lost half of Adam. The
    layout may change too: a tensor-parallel checkpoint (model and optimizer states split by columns and rows)
    resumes under ZeRO over 2 data-parallel ranks. bf16: the optimizer's fp32 master weights go on too: under
    ZeRO the one rank cuts its slice (the whole) out of the 2 ranks' slices; without ZeRO (3d zero 0) it reads the
    replicas' one file. Rebuilt from the bf16 weights instead, the losses differ 9x more (measured below). And
    back: the node returns, the 1-rank run's checkpoint 6 resumed on 2 ranks cuts 2 slices out of the whole."""
    reference = reference_runs[saved]
    save_dir = tmp_path / "ckpt"
    _copy_checkpoint_3(reference, save_dir)
    batch = DP1_BATCH if nproc == 1 else []  # the same global batch of 4: the later flags win
    args = [*train_args(reference_runs.model, reference_runs.data, save_dir, *LAYOUTS[resumed], *LATEST), *batch]
    log = train_ok(tmp_path, "resumed", args, nproc=nproc).read_text()
    if nproc == 1:
        assert "saved with 2 ranks, running 1: RNG streams restart from the seed (data position is exact)" in log
    assert "epoch order is not the checkpoint's" not in log
    assert f"resumed from {save_dir / 'epoch-0_step-3'}: epoch 0, step 3, sample offset 12" in log
    ref, got = read_loss_log(reference / "losses.jsonl"), read_loss_log(save_dir / "losses.jsonl")
    assert [r["step"] for r in got] == list(range(1, MAX_STEPS + 1))
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]  # the same sequences, step by step
    bf16 = "bf16" in saved
    if bf16:
        how = ("re-cut from the 2-rank run's slices, 2 of its 2 files opened on rank 0" if saved == "zero2_bf16"
               else "saved with 2 ranks")
        assert f"the fp32 master weights are {how} (this run has 1)" in log
        assert "rebuilt from the saved weights" not in log
    # measured: <= 5.3e-8 in fp32; bf16 zero2 7.2e-6 (6.6e-5 with the masters rebuilt from the bf16 weights)
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=2e-5 if bf16 else 1e-6)
    if saved == "zero2_bf16":  # and back: the node returns, the 1-rank checkpoint 6 resumed on 2 ranks
        again = tmp_path / "again"
        again.mkdir()
        shutil.copytree(save_dir / "epoch-0_step-6", again / "epoch-0_step-6")
        (again / "losses.jsonl").write_text("".join((save_dir / "losses.jsonl").read_text().splitlines(True)[:6]))
        log = train_ok(tmp_path, "back", reference_runs.args(saved, again, *LATEST)).read_text()
        assert ("the fp32 master weights are re-cut from the 1-rank run's slices, 1 of its 1 files opened on rank 0 "
                "(this run has 2)") in log
        back = read_loss_log(again / "losses.jsonl")
        assert [r["loss"] for r in back] == pytest.approx([r["loss"] for r in got], rel=2e-5)


def test_master_weights_of_another_split_are_rebuilt_and_said(reference_runs, tmp_path):
    """A bf16 ZeRO checkpoint (each of 2 ranks a slice of the fp32 masters) resumed under 3d without ZeRO (every
    replica the whole masters of its part): the optimizers differ, nothing is cut across them; the masters are
    rebuilt from the bf16 weights, the log says so and why, and the run goes on in bf16's precision."""
    save_dir = tmp_path / "ckpt"
    _copy_checkpoint_3(reference_runs["zero2_bf16"], save_dir)
    log = train_ok(tmp_path, "resumed", reference_runs.args("3d_dp2_bf16", save_dir, *LATEST)).read_text()
    assert ("its master weights are of layout {'world_size': 2, 'tp_size': 1, 'pp_size': 1, 'sequence_parallelism': "
            "None, 'sp_size': 1, 'optimizer': 'LowLevelZeroOptimizer'}") in log
    assert "the fp32 master weights are rebuilt from the saved weights" in log
    ref, got = read_loss_log(reference_runs["zero2_bf16"] / "losses.jsonl"), read_loss_log(save_dir / "losses.jsonl")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-3)


def test_epochs_end_in_checkpoints_named_after_them_and_a_resume_crosses_their_boundary(reference_runs, tmp_path,
                                                                                        data_dir, smollm2_dir):
    """Three epochs of 2 steps (11 sequences, global batch 4: 3 left over each epoch, said), a checkpoint every 2
    steps, each at an epoch's end. Each is named after the epoch its last step ended: epoch-0_step-2,
    epoch-1_step-4, epoch-2_step-6 (named after the next epoch, a 3-epoch run ended with epoch-3); losses.jsonl
    records epochs 0, 0, 1, 1, 2, 2. Resumed from the end of epoch 0, the run starts
    epoch 1 at its first sample and trains the uninterrupted run's steps bit for bit."""
    from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig
    from colossal_llama.dataset.pipeline import prepare_pretrain
    from tests.support.prepared_data import write_input_slice

    inputs = write_input_slice(data_dir, tmp_path / "in", {"en_novel_botchan.jsonl": 6})
    data = tmp_path / "data"
    prepare_pretrain(PretrainPrepConfig(input_dirs=[inputs], tokenizer_dir=smollm2_dir, output=OutputLayout.under(data),
                                        max_length=128, num_bins=1, seed=7))
    flags = ["--plugin", "ddp", *DP2_BATCH, "--num_epochs", "3", "--save_interval", "2", "--max_steps", "6"]
    whole = tmp_path / "whole"
    log = train_ok(tmp_path, "whole", train_args(reference_runs.model, data, whole, *flags)).read_text()
    assert "11 sequences in 1 buckets, global batch 4 -> 2 steps/epoch, 6 steps total; 3 sequences/epoch skipped" in log
    assert [c.name for c in complete_checkpoints(whole)] == ["epoch-0_step-2", "epoch-1_step-4", "epoch-2_step-6"]
    records = read_loss_log(whole / "losses.jsonl")
    assert [(r["step"], r["epoch"]) for r in records] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 2)]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "epoch-0_step-2", resumed / "epoch-0_step-2")
    (resumed / "losses.jsonl").write_text("".join((whole / "losses.jsonl").read_text().splitlines(True)[:2]))
    log = train_ok(tmp_path, "resumed", train_args(reference_runs.model, data, resumed, *flags, *LATEST)).read_text()
    assert f"resumed from {resumed / 'epoch-0_step-2'}: epoch 1, step 2, sample offset 0" in log
    assert read_loss_log(resumed / "losses.jsonl") == records


def test_a_resume_in_another_epoch_order_says_so(reference_runs, tmp_path):
    """The sample offset counts sequences of the checkpoint's epoch order; resumed with another seed (or other
    data, or other mixture weights) it would silently repeat some sequences and skip others: the run says what
    changed and what it means, and records the new order's inputs in its next checkpoint."""
    save_dir = tmp_path / "ckpt"
    _copy_checkpoint_3(reference_runs["ddp"], save_dir)
    saved = json.loads((save_dir / "epoch-0_step-3" / "running_states.json").read_text())["data_order"]
    assert saved["seed"] == 42 and sum(saved["bucket_sizes"]) > 1000 and saved["mixture"] is None
    log = train_ok(tmp_path, "resumed", reference_runs.args("ddp", save_dir, *LATEST, "--seed", "7")).read_text()
    assert ("the epoch order is not the checkpoint's (seed 42 -> 7): its 12 sequences of epoch 0 are counted in "
            "the new order, so some may come again and others not at all this epoch") in log
    assert json.loads((save_dir / "epoch-0_step-6" / "running_states.json").read_text())["data_order"] == \
        {**saved, "seed": 7}


def test_a_resume_with_another_lr_follows_it_from_the_next_step_and_says_so(reference_runs, tmp_path):
    """A checkpoint holds the lr schedule and weight decay it was made with, and loading it used to put them back
    silently: a resume with --lr 4e-3 trained on at the checkpoint's 2e-3. Now the flags hold from the next step
    (zero2: the optimizer colossalai wraps is the one the schedule sets): step 4 starts from the checkpoint's
    weights (its loss is the uninterrupted run's) and trains at 4e-3 x the schedule's factor, so step 5 differs."""
    save_dir = tmp_path / "ckpt"
    reference = reference_runs["zero2"]
    _copy_checkpoint_3(reference, save_dir)
    log = train_ok(tmp_path, "resumed", reference_runs.args("zero2", save_dir, *LATEST, "--lr", "4e-3")).read_text()
    expected_lr = 4e-3 * warmup_cosine_factor(SAVE_INTERVAL, 2, MAX_STEPS)
    assert (f"the optimizer settings are not the checkpoint's (lr 0.002 -> 0.004): this run's hold from step "
            f"{SAVE_INTERVAL + 1} on (the next step's lr {expected_lr:.4g}; {expected_lr / 2:.4g} with the "
            "checkpoint's)") in log
    ref, got = read_loss_log(reference / "losses.jsonl"), read_loss_log(save_dir / "losses.jsonl")
    step4, step5 = SAVE_INTERVAL, SAVE_INTERVAL + 1  # 0-based indices of steps 4 and 5
    assert got[step4]["loss"] == ref[step4]["loss"] and got[step4]["lr"] == pytest.approx(expected_lr, rel=1e-12)
    assert got[step5]["loss"] != ref[step5]["loss"]


# ---------------------------------------------------------------------------------------------- random kills
def _wait_for_moment(proc, save_dir: Path, moment: str, rng: random.Random, started: float,
                     log_inode: int | None) -> bool:
    """Block until the chosen moment of this incarnation; False if the run ended first.

    startup: the ranks exist, plus 0-4 s (import, model build, checkpoint restore);
    step: this incarnation has logged a step beyond its checkpoint (at most step MAX_STEPS - 2: with the 0-0.8 s
          that follow, a later target let a fast machine finish the run before the kill), plus 0-0.8 s;
    save: a checkpoint (or final model) folder is being written by this incarnation.
    """
    deadline = time.monotonic() + 600
    latest = latest_checkpoint(save_dir)
    resume_step = int(latest.name.rsplit("-", 1)[1]) if latest else 0
    target = min(resume_step + rng.randint(1, 3), MAX_STEPS - 2)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if moment == "startup" and len(rank_processes(proc)) == 2:
            time.sleep(rng.uniform(0, 4))
            return True
        log = save_dir / "losses.jsonl"
        if moment == "step" and log.is_file() and log.stat().st_ino != log_inode and _loss_lines(save_dir) >= target:
            time.sleep(rng.uniform(0, 0.8))
            return True
        # a checkpoint being written (.tmp-epoch-*), not an old one being deleted (.tmp-deleting-*)
        if moment == "save" and any(p.stat().st_mtime >= started for p in save_dir.glob(TMP_PREFIX + "epoch-*")):
            return True
        time.sleep(0.01)
    raise TimeoutError(f"{moment} never came")


@pytest.mark.timeout(2400)
def test_ten_kills_at_random_moments_resume_bitwise(reference_runs, tmp_path):
    """NEFTune on, ddp, checkpoints every 2 steps of which only the newest 2 are kept (rotation deletes under
    the kills too); kill -9 of launcher and ranks at start-up, mid-step and mid-save, in turn, at least 10 times;
    then one last resume to the end."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    save_dir = tmp_path / "ckpt"
    args = reference_runs.args("ddp_neft", save_dir, *LATEST, "--keep_last_k", "2")
    args[args.index("--save_interval") + 1] = "2"
    kills: list[tuple[str, int]] = []
    for incarnation in range(16):
        if len(kills) >= 10:
            break
        moment = ("startup", "step", "save")[incarnation % 3]
        log = save_dir / "losses.jsonl"
        inode = log.stat().st_ino if log.is_file() else None
        started = time.time()
        proc = start_training(args, tmp_path / f"run{incarnation}.log")
        if not _wait_for_moment(proc, save_dir, moment, rng, started, inode):
            assert proc.returncode == 0, f"seed {seed}: incarnation {incarnation} failed:\n" \
                                         f"{tail(tmp_path / f'run{incarnation}.log')}"
            continue
        if not rank_processes(proc):  # the run ended on its own between the moment and the kill: no fault here
            assert proc.wait(timeout=60) == 0, f"seed {seed}: incarnation {incarnation} failed:\n" \
                                               f"{tail(tmp_path / f'run{incarnation}.log')}"
            continue
        kill_launcher_and_ranks(proc)
        kills.append((moment, _loss_lines(save_dir)))
    assert len(kills) >= 10, f"seed {seed}: only {len(kills)} kills: {kills}"
    assert {moment for moment, _ in kills} == {"startup", "step", "save"}, f"seed {seed}: {kills}"
    newest = latest_checkpoint(save_dir)
    final = train_ok(tmp_path, "final", args).read_text()
    if newest is not None:  # the last run goes on from the kills' newest checkpoint
        assert_resumed(final, newest)
    assert_bitwise_equal(reference_runs["ddp_neft"], save_dir)
    assert [c.name for c in complete_checkpoints(save_dir)] == ["epoch-0_step-6", f"epoch-0_step-{MAX_STEPS}"]
    assert not list(save_dir.glob(TMP_PREFIX + "*"))


# ---------------------------------------------------------------------------------------------- stop on a signal
def _rank_pid(proc, rank: int) -> int:
    found = [p.pid for p in rank_processes(proc) if p.environ().get("RANK") == str(rank)]
    assert len(found) == 1, f"rank {rank} of torchrun {proc.pid}: {found}"
    return found[0]


@pytest.mark.parametrize("target, sig, after_step", [("launcher", signal.SIGTERM, SAVE_INTERVAL),
                                                     ("rank 1", signal.SIGTERM, SAVE_INTERVAL + 1),
                                                     ("launcher", signal.SIGUSR1, SAVE_INTERVAL + 1)])
def test_a_signal_stops_every_rank_at_one_step_with_a_checkpoint_to_resume(reference_runs, tmp_path, target, sig,
                                                                            after_step):
    """What a scheduler does before it kills a job (preemption, scancel, an eviction): SIGTERM to torchrun, which
    forwards it to every rank, here while step 3's checkpoint is being saved; or SIGTERM to rank 1 alone (one node
    of many preempted) during step 5, which rank 0 learns from that step's all-reduce; or SIGUSR1 (SLURM's warning
    before a time limit), which torchrun forwards when PET_SIGNALS_TO_HANDLE names it, as
    train.example.sh does. Every rank stops at the same step, after a checkpoint of it (saved once), and exits with
    128 + the signal; the resumed run equals the uninterrupted one bit for bit. Each rank waits 2 s after logging a
    step (the signal lands in that wait)."""
    save_dir = tmp_path / "ckpt"
    # a rank silent for 1.5 s would be taken for dead: the 2 s waits, the saves and the steps all beat through it
    args = reference_runs.args("ddp", save_dir, "--rank_silence_s", "1.5")
    env = {"CL_TEST_SLOW_STEP_S": "2", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120",
           "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}
    proc = start_training(args, tmp_path / "stopped.log", env=env)
    try:
        assert wait_for_lines(save_dir / "losses.jsonl", after_step, proc) == after_step and proc.poll() is None
        os.kill(proc.pid if target == "launcher" else _rank_pid(proc, 1), sig)
        code = proc.wait(timeout=120)
    except BaseException:
        kill_launcher_and_ranks(proc)
        raise
    log = (tmp_path / "stopped.log").read_text(errors="replace")
    stop_step = after_step if after_step == SAVE_INTERVAL else after_step + 1
    assert code != 0 and _loss_lines(save_dir) == stop_step < MAX_STEPS, tail(tmp_path / "stopped.log")
    assert not (save_dir / "modeling").exists()  # the run did not finish: the signal stopped it
    assert f"received {sig.name}" in log and ("[rank 0] received" in log) == (target == "launcher")
    for rank in (0, 1):
        assert re.search(rf"\[rank {rank}\] .*stopped by {sig.name} after step {stop_step} of {MAX_STEPS}, [\d.]+ s "
                         rf"after the signal, exit code {128 + sig}: resume with --load_checkpoint latest", log), \
            tail(tmp_path / "stopped.log")
    if target == "rank 1":  # torchrun reports the ranks' own exit codes
        assert f"exitcode  : {128 + sig}" in log, tail(tmp_path / "stopped.log")
    assert [c.name for c in complete_checkpoints(save_dir)] == sorted(
        {f"epoch-0_step-{SAVE_INTERVAL}", f"epoch-0_step-{stop_step}"})
    assert log.count(f"saved checkpoint {save_dir / f'epoch-0_step-{stop_step}'}") == 1
    resumed = train_ok(tmp_path, "resumed", args + LATEST).read_text()
    assert f"resumed from {save_dir / f'epoch-0_step-{stop_step}'}" in resumed
    assert_bitwise_equal(reference_runs["ddp"], save_dir)


def test_a_signal_in_the_middle_of_a_step_stops_every_rank_after_that_step(reference_runs, tmp_path):
    """A signal that lands while a step computes (rank 1, step 4 of 8, no checkpoint due) is in that step's own
    all-reduce: every rank stops after step 4 with its checkpoint, exit 143, and the resume goes on bit for bit.
    The vote used to be read when the step began, so one more whole step trained first: a grace period of a step
    plus a save (what the README asks for) was not enough."""
    save_dir = tmp_path / "ckpt"
    args = reference_runs.args("ddp", save_dir)
    stopped = run_training(args, tmp_path / "stopped.log", env={"CL_TEST_SIGNAL_IN_STEP": "4"})
    log = (tmp_path / "stopped.log").read_text(errors="replace")
    assert stopped.returncode != 0 and "[rank 1] " in log and "received SIGTERM" in log, tail(tmp_path / "stopped.log")
    assert f"stopped by SIGTERM after step 4 of {MAX_STEPS}" in log, tail(tmp_path / "stopped.log")
    assert _loss_lines(save_dir) == 4
    assert [c.name for c in complete_checkpoints(save_dir)] == [f"epoch-0_step-{SAVE_INTERVAL}", "epoch-0_step-4"]
    train_ok(tmp_path, "resumed", args + LATEST)
    assert_bitwise_equal(reference_runs["ddp"], save_dir)


def test_a_stopped_job_that_torchrun_restarts_does_not_start_again(reference_runs, tmp_path):
    """The scheduler's SIGTERM reaches one rank (one node of many); every rank stops at the step with a checkpoint
    and exits 143, which a torchrun that never got the signal takes for a failure: with --max_restarts it started
    the ranks again, and they trained on to the end here (on another node, whose peers had left, they waited in
    the rendezvous until the timeout, every restart). The stop is recorded in torchrun's store; a restarted rank
    that finds it leaves at once with the stop's exit code."""
    save_dir = tmp_path / "ckpt"
    args = reference_runs.args("ddp", save_dir, *LATEST)
    proc = start_training(args, tmp_path / "stopped.log", env={"CL_TEST_SLOW_STEP_S": "2"},
                          launcher_args=["--max_restarts", "1"])
    try:
        assert wait_for_lines(save_dir / "losses.jsonl", 4, proc) == 4 and proc.poll() is None
        os.kill(_rank_pid(proc, 1), signal.SIGTERM)
        code = proc.wait(timeout=120)
    except BaseException:
        kill_launcher_and_ranks(proc)
        raise
    log = (tmp_path / "stopped.log").read_text(errors="replace")
    assert "[rank 1] received SIGTERM" in log, tail(tmp_path / "stopped.log")  # the fault: one rank signalled
    assert re.search(r"\[rank 0\] .*stopped by SIGTERM after step 5 of 8", log), tail(tmp_path / "stopped.log")
    # torchrun restarted them once (--max_restarts 1) and they left: the first to leave ends the attempt (torchrun
    # then stops the other, which may not have said so yet: seen in CI), and nothing trained again (below)
    left = [rank for rank in (0, 1)
            if f"[rank {rank}] this job stopped on SIGTERM (its checkpoint is saved): torchrun restarted it" in log]
    assert left, tail(tmp_path / "stopped.log")
    assert code != 0 and _loss_lines(save_dir) == 5 and not (save_dir / "modeling").exists()
    assert [c.name for c in complete_checkpoints(save_dir)] == [f"epoch-0_step-{SAVE_INTERVAL}", "epoch-0_step-5"]


def test_checkpoints_published_late_hold_their_own_position_and_a_stop_publishes_its_own(reference_runs, tmp_path):
    """--async_save publishes a checkpoint at the next save (its optimizer files written in the background
    meanwhile); here the same deferral with plain writes (colossalai's background writer needs CUDA). Each
    checkpoint's running_states.json must hold its own step (it held the next save's: the loop goes on changing
    the state after a save), and the checkpoint of a stop must be published before the run leaves (it stayed a
    .tmp- folder, deleted by the next run). SIGTERM to torchrun after step 4 stops both ranks at step 5; the resumed
    run, whose rank 1 sees a stale listing of the save dir, equals the uninterrupted one bit for bit."""
    save_dir = tmp_path / "ckpt"
    args = reference_runs.args("ddp", save_dir, "--rank_silence_s", "1.5")
    env = {"CL_TEST_PUBLISH_LATE": "1", "CL_TEST_SLOW_STEP_S": "2", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
    proc = start_training(args, tmp_path / "stopped.log", env=env)
    try:
        assert wait_for_lines(save_dir / "losses.jsonl", SAVE_INTERVAL + 1, proc) == SAVE_INTERVAL + 1
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    except BaseException:
        kill_launcher_and_ranks(proc)
        raise
    stop_step = SAVE_INTERVAL + 2
    assert code != 0 and _loss_lines(save_dir) == stop_step, tail(tmp_path / "stopped.log")
    published = {c.name: json.loads((c / "running_states.json").read_text()) for c in complete_checkpoints(save_dir)}
    assert sorted(published) == [f"epoch-0_step-{SAVE_INTERVAL}", f"epoch-0_step-{stop_step}"], \
        tail(tmp_path / "stopped.log")
    reference = reference_runs["ddp"] / f"epoch-0_step-{SAVE_INTERVAL}" / "running_states.json"
    assert published[f"epoch-0_step-{SAVE_INTERVAL}"] == json.loads(reference.read_text())  # published at step 5
    assert published[f"epoch-0_step-{stop_step}"]["step"] == stop_step
    # rank 1 lists the save dir as it was before step 5's checkpoint (another machine's stale view): rank 0's
    # "latest" is every rank's
    resumed = train_ok(tmp_path, "resumed", args + LATEST, env={"CL_TEST_STALE_LISTING": "1"}).read_text()
    assert f"resumed from {save_dir / f'epoch-0_step-{stop_step}'}" in resumed
    assert_bitwise_equal(reference_runs["ddp"], save_dir)


def test_a_stop_with_a_dead_rank_leaves_at_once_instead_of_waiting_out_the_timeout(reference_runs, tmp_path):
    """When a rank dies, torchrun stops the others with SIGTERM, but under NCCL they sit in a collective the dead
    rank never joins, until the timeout (10 minutes by default). Here rank 1 freezes after step 5 (SIGSTOP: its
    heartbeat stops too; gloo would fail at once on a dead peer, so a frozen one stands in for NCCL's hang) and
    rank 0, waiting for it in step 6 with a 5-minute collective timeout, gets the SIGTERM torchrun would send. It
    leaves with exit code 143 and one line naming rank 1 once rank 1 was silent for 6 s; a resume from checkpoint 3
    equals the uninterrupted run."""
    save_dir = tmp_path / "ckpt"
    args = reference_runs.args("ddp", save_dir, "--dist_timeout_minutes", "5", "--rank_silence_s", "6")
    env = {"CL_TEST_FREEZE_AT_STEP": str(SAVE_INTERVAL + 2), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"}
    proc = start_training(args, tmp_path / "frozen.log", env=env)
    ranks = rank_processes(proc)
    try:
        wait_for_lines(save_dir / "losses.jsonl", SAVE_INTERVAL + 2, proc)
        ranks = rank_processes(proc)
        rank0, rank1 = (psutil.Process(_rank_pid(proc, r)) for r in (0, 1))
        frozen = _wait_until_stopped(rank1)
        time.sleep(1.0)
        assert rank1.status() == psutil.STATUS_STOPPED and rank0.is_running()  # the fault: rank 0 waits for rank 1
        assert _loss_lines(save_dir) == SAVE_INTERVAL + 2
        rank0.send_signal(signal.SIGTERM)
        gone, _ = psutil.wait_procs([rank0], timeout=60)
        waited = time.monotonic() - frozen
        code = proc.wait(timeout=60)  # torchrun kills the frozen rank after its 5 s shutdown timeout
    finally:  # on a failure: torchrun, and the frozen rank (SIGKILL ends a stopped process too)
        kill_processes([*ranks, *([psutil.Process(proc.pid)] if proc.poll() is None else [])])
        proc.wait(timeout=60)
    assert gone, f"rank 0 still waits {waited:.0f} s after rank 1 froze:\n{tail(tmp_path / 'frozen.log')}"
    assert 6 - 1.5 <= waited < 25, waited  # the silence (less a beat and the polling), not the 5-minute timeout
    log = (tmp_path / "frozen.log").read_text(errors="replace")
    assert code != 0 and "exitcode  : 143" in log, tail(tmp_path / "frozen.log")  # rank 0's, as torchrun saw it
    assert ("[rank 0] error: stopped by SIGTERM: rank 1 gave no sign of life for 6 s (dead, or its machine hangs), "
            "so the step in flight can never finish: leaving without a checkpoint of it, exit code 143; resume with "
            "--load_checkpoint latest") in log, tail(tmp_path / "frozen.log")
    assert latest_checkpoint(save_dir).name == f"epoch-0_step-{SAVE_INTERVAL}"
    resumed = train_ok(tmp_path, "resumed", args + LATEST).read_text()
    assert_resumed(resumed, save_dir / f"epoch-0_step-{SAVE_INTERVAL}")
    assert_bitwise_equal(reference_runs["ddp"], save_dir)


def test_a_rank_that_hangs_makes_the_others_leave_and_torchrun_restarts_the_run(reference_runs, tmp_path):
    """The peer of another machine died (its torchrun stops nobody here) or a machine hangs: no signal comes, and
    under NCCL the others would wait out the collective timeout before torchrun could restart them. Here rank 1
    freezes after step 5 in torchrun's first incarnation; rank 0, which waits for it in step 6 with a 5-minute
    timeout, leaves with exit code 75 once rank 1 was silent for 3 s, and torchrun --max_restarts 1 starts both
    again: they resume from checkpoint 3 to the uninterrupted run's losses."""
    save_dir = tmp_path / "ckpt"
    args = reference_runs.args("ddp", save_dir, "--dist_timeout_minutes", "5", "--rank_silence_s", "3", *LATEST)
    env = {"CL_TEST_FREEZE_AT_STEP": str(SAVE_INTERVAL + 2), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"}
    started = time.monotonic()
    proc = run_training(args, tmp_path / "restarted.log", env=env, launcher_args=["--max_restarts", "1"])
    took = time.monotonic() - started
    log = (tmp_path / "restarted.log").read_text(errors="replace")
    assert proc.returncode == 0, tail(tmp_path / "restarted.log")
    assert ("[rank 0] error: rank 1 gave no sign of life for 3 s (dead, or its machine hangs), so the next "
            "collective can never finish: every rank leaves now instead of waiting out the collective timeout, exit "
            "code 75; torchrun --max_restarts restarts the run (from its newest checkpoint with --load_checkpoint "
            "latest), else resume with --load_checkpoint latest") in log, tail(tmp_path / "restarted.log")
    assert log.count("gave no sign of life") == 1  # one line, from the rank that found it
    assert "dropped 2 records after step 3 (steps redone after resume)" in log  # steps 4 and 5 ran before it
    assert log.index(f"saved checkpoint {save_dir / f'epoch-0_step-{SAVE_INTERVAL}'}") < log.index(
        f"resumed from {save_dir / f'epoch-0_step-{SAVE_INTERVAL}'}")
    assert took < 240, took  # not the 5-minute collective timeout
    assert_bitwise_equal(reference_runs["ddp"], save_dir)


def _wait_until_stopped(rank: psutil.Process, timeout: float = 60) -> float:
    """When ``rank`` was first seen stopped (SIGSTOP), polled every 0.1 s (time.monotonic)."""
    deadline = time.monotonic() + timeout
    while rank.status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
        time.sleep(0.1)
    return time.monotonic()


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_torchrun_restarts_a_crashed_run_from_its_newest_checkpoint(reference_runs, tmp_path, rendezvous):
    """Automatic recovery: torchrun --max_restarts 1 and --load_checkpoint latest from the first start. Rank 1 is
    killed (SIGKILL) after step 5; torchrun stops rank 0, starts both again with the same command, and they resume
    from checkpoint 3 to the end: exit code 0 and the uninterrupted run's losses. Static rendezvous (a master
    address and port: what colossalai run uses) and c10d's. torchrun gives the new ranks the store of the dead
    ones: their process group keys now carry the restart count (without, the new ranks read the dead ones'
    addresses and fail to connect)."""
    save_dir = tmp_path / "ckpt"
    args = reference_runs.args("ddp", save_dir, *LATEST)
    launcher = ["--max_restarts", "1"]
    if rendezvous == "c10d":
        launcher += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}"]
    proc = run_training(args, tmp_path / "restarted.log", env={"CL_TEST_DIE_AT_STEP": str(SAVE_INTERVAL + 2)},
                        launcher_args=launcher)
    log = (tmp_path / "restarted.log").read_text(errors="replace")
    assert proc.returncode == 0, tail(tmp_path / "restarted.log")
    assert f"CL_TEST_DIE_AT_STEP: rank 1 SIGKILLs itself after step {SAVE_INTERVAL + 2}" in log  # the fault
    assert re.search(r"failed \(exitcode: (-9|1)\) local_rank", log), tail(tmp_path / "restarted.log")  # a rank died
    assert "dropped 2 records after step 3 (steps redone after resume)" in log  # steps 4 and 5 ran before it
    assert "no complete checkpoint in" in log  # the first incarnation started afresh
    assert log.index(f"saved checkpoint {save_dir / f'epoch-0_step-{SAVE_INTERVAL}'}") < log.index(
        f"resumed from {save_dir / f'epoch-0_step-{SAVE_INTERVAL}'}")
    assert_bitwise_equal(reference_runs["ddp"], save_dir)


def test_a_restart_goes_on_from_the_jobs_newest_checkpoint_not_the_one_its_command_names(reference_runs, tmp_path):
    """--load_checkpoint names checkpoint 3 of the save dir, --keep_last_k 1 deletes it once checkpoint 6 is saved,
    and rank 1 dies after step 7: the restart (the same command) resumes from checkpoint 6, the job's newest, and
    ends with the uninterrupted run's losses. It went back to checkpoint 3 (losing the steps since), and here, with
    checkpoint 3 deleted, failed ("directory does not exist")."""
    save_dir = tmp_path / "ckpt"
    _copy_checkpoint_3(reference_runs["ddp"], save_dir)
    named, newest = save_dir / f"epoch-0_step-{SAVE_INTERVAL}", save_dir / f"epoch-0_step-{2 * SAVE_INTERVAL}"
    args = reference_runs.args("ddp", save_dir, "--load_checkpoint", str(named), "--keep_last_k", "1")
    proc = run_training(args, tmp_path / "restarted.log", env={"CL_TEST_DIE_AT_STEP": str(2 * SAVE_INTERVAL + 1)},
                        launcher_args=["--max_restarts", "1"])
    log = (tmp_path / "restarted.log").read_text(errors="replace")
    assert proc.returncode == 0, tail(tmp_path / "restarted.log")
    assert f"torchrun restart: resuming from {newest}, this job's newest checkpoint since --load_checkpoint {named}" \
        in log
    assert log.index(f"resumed from {named}: ") < log.index(f"resumed from {newest}: ")
    assert_bitwise_equal(reference_runs["ddp"], save_dir)


# ---------------------------------------------------------------------------------------------- a diverged run
@pytest.mark.parametrize("layout, applied, late", [("ddp", False, False), ("zero2", True, False), ("ddp", False, True)])
def test_a_run_that_diverges_stops_before_anything_nan_is_saved(reference_runs, tmp_path, layout, applied, late):
    """--lr 1e4 without warm-up: the gradient norm turns nan a few steps in (step 4 here). Before, the run went on
    to the end with exit code 0, writing nan losses, nan checkpoints (rotation would have deleted the good ones)
    and a nan final model. ddp measures the norm before the optimizer step (which is then not taken); zero2 inside
    it, so that step is applied, but never saved. ``late``: checkpoints published at the next save, as with
    --async_save: the last good one is published before the run stops (it stayed a .tmp- folder)."""
    import torch
    from safetensors.torch import load_file

    save_dir = tmp_path / "ckpt"
    args = reference_runs.args(layout, save_dir)
    args[args.index("--lr") + 1], args[args.index("--warmup_steps") + 1] = "1e4", "0"
    proc = run_training(args, tmp_path / "diverged.log", env={"CL_TEST_PUBLISH_LATE": "1"} if late else None)
    log = (tmp_path / "diverged.log").read_text(errors="replace")
    errors = [line for line in log.splitlines() if line.startswith("error")]
    assert proc.returncode != 0 and len(errors) == 1, tail(tmp_path / "diverged.log")
    found = re.match(r"error: step (\d+): the (loss|gradient norm) is (nan|inf)", errors[0])
    assert found, errors[0]
    step = int(found.group(1))
    records = read_loss_log(save_dir / "losses.jsonl")
    assert len(records) == step - 1 and SAVE_INTERVAL < step <= MAX_STEPS  # the fault came, after a checkpoint
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    newest = latest_checkpoint(save_dir)
    assert newest.name == f"epoch-0_step-{SAVE_INTERVAL}" and not (save_dir / "modeling").exists()
    assert (f"The newest checkpoint is {newest}: resume from it (--load_checkpoint {newest}) with a lower --lr (now "
            "10000) or more --warmup_steps (now 0)") in errors[0]
    assert ("the optimizer had applied it" if applied else "before the optimizer applies it") in errors[0]
    saved = list(save_dir.rglob("*.safetensors"))
    assert saved and all(torch.isfinite(t).all() for f in saved for t in load_file(f).values())


# ---------------------------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_filesystem(tmp_path):
    """``mount(bytes)``: a tmpfs of that size at ``tmp_path/small_fs`` (mounted again to resize it), unmounted after
    the test. Mounting needs root (or CAP_SYS_ADMIN): skipped where that is refused."""
    point = tmp_path / "small_fs"
    point.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        options = f"size={size // 1024 + 1}k" + (",remount" if mounted else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(size)
        return point

    yield mount
    if mounted:
        subprocess.run(["umount", "--lazy", str(point)], check=True)


def test_a_full_disk_is_said_a_checkpoint_ahead_then_in_one_line_and_the_run_resumes(reference_runs, tmp_path,
                                                                                     small_filesystem):
    """--save_dir on a filesystem with room for 1.5 checkpoints: after checkpoint 3 the run warns that the next will
    not fit; checkpoint 6 runs out of space (torch.save and safetensors raise their own exceptions) and the run
    stops with one line; once the filesystem is made larger, --load_checkpoint latest goes on to the end and
    equals the uninterrupted run."""
    one_checkpoint = tree_bytes(reference_runs["ddp"] / f"epoch-0_step-{SAVE_INTERVAL}")
    save_dir = small_filesystem(int(1.5 * one_checkpoint)) / "ckpt"
    args = reference_runs.args("ddp", save_dir)
    proc = run_training(args, tmp_path / "full.log")
    log = (tmp_path / "full.log").read_text(errors="replace")
    full_step = 2 * SAVE_INTERVAL
    assert proc.returncode != 0 and (save_dir / f".tmp-epoch-0_step-{full_step}").is_dir(), tail(tmp_path / "full.log")
    assert free_bytes(save_dir) < 2**20  # the fault: the filesystem really is full
    warned = re.search(rf"--save_dir {save_dir}: the next checkpoint \(about [\d.]+ MiB\) will not fit in the "
                       r"[\d.]+ MiB free", log)
    assert warned, tail(tmp_path / "full.log")
    errors = [line for line in log.splitlines() if line.startswith("error")]
    # said a checkpoint ahead: when checkpoint 3 was measured (within its save), long before the save that failed
    assert log.index(f"checkpoint epoch-0_step-{SAVE_INTERVAL}: ") < warned.start() < log.index(
        f"saved checkpoint {save_dir / f'epoch-0_step-{SAVE_INTERVAL}'}")
    assert errors and warned.start() < log.index(errors[0])
    assert all("no space left while saving" in line for line in errors), errors  # the ranks that hit it, alike
    assert re.fullmatch(
        rf"error: --save_dir {save_dir}: no space left while saving epoch-0_step-{full_step} \(a checkpoint takes "
        r"about [\d.]+ MiB, measured; [\d.]+ (bytes|KiB) free now\): free space or set --keep_last_k, then resume "
        "with --load_checkpoint latest", errors[0]), errors
    assert latest_checkpoint(save_dir).name == f"epoch-0_step-{SAVE_INTERVAL}"
    estimate = float(re.search(r"checkpoints: about ([\d.]+) MiB each \(estimated from the parameters\)", log)[1])
    assert 0.85 < estimate * 2**20 / one_checkpoint < 1.0  # the weights and Adam's states; the tokenizer not counted

    small_filesystem(4 * one_checkpoint)  # space freed
    resumed = train_ok(tmp_path, "resumed", args + LATEST).read_text()
    assert f"resumed from {save_dir / f'epoch-0_step-{SAVE_INTERVAL}'}" in resumed
    assert_bitwise_equal(reference_runs["ddp"], save_dir)
    assert not list(save_dir.glob(TMP_PREFIX + "*"))


def test_old_checkpoints_are_deleted_in_the_background_while_training_goes_on(reference_runs, tmp_path):
    """Deleting a 70B run's checkpoint (a terabyte of files on a shared filesystem) can outlast what NCCL lets the
    other ranks wait in a collective (10 minutes). With every deletion slowed down by 8 s, the run saves its next
    checkpoint before the first deletion is done, and still ends with only the newest checkpoint, nothing left
    over (rank 0 waited for the deletions after the last collective)."""
    save_dir = tmp_path / "ckpt"
    args = reference_runs.args("ddp", save_dir, "--keep_last_k", "1", "--max_steps", "3")
    args[args.index("--save_interval") + 1] = "1"
    log = train_ok(tmp_path, "slow_delete", args, env={"CL_TEST_SLOW_DELETE_S": "8"}).read_text()
    lines = log.splitlines()

    def first(pattern: str) -> int:
        found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert found, f"no line matches {pattern!r}:\n{log[-3000:]}"
        return found[0]

    deleted_step1 = first(r"deleted \.tmp-deleting-\w+-epoch-0_step-1 in the background")
    assert first(r"saved checkpoint .*epoch-0_step-3") < deleted_step1  # nobody waited for the deletion
    assert first(r"--keep_last_k 1: deleting .*epoch-0_step-1") < first(r"saved checkpoint .*epoch-0_step-2")
    assert [c.name for c in complete_checkpoints(save_dir)] == ["epoch-0_step-3"]
    assert not list(save_dir.glob(TMP_PREFIX + "*")) and (save_dir / "modeling").is_dir()


def test_a_rank_left_waiting_fails_after_dist_timeout_minutes(reference_runs, tmp_path):
    """3d tp 2: rank 0 stops for good after step 2; rank 1 waits for it in a collective of the plugin's tensor-parallel
    group, a group colossalai makes itself. With --dist_timeout_minutes 0.1 it gives up after about 6 s and the
    launcher stops the job (gloo's default would be 30 minutes)."""
    save_dir = tmp_path / "ckpt"
    args = reference_runs.args("3d_tp2", save_dir, "--dist_timeout_minutes", "0.1")
    proc = start_training(args, tmp_path / "held.log", env={"CL_TEST_HOLD_AT_STEP": "2"})
    try:
        assert wait_for_lines(save_dir / "losses.jsonl", 2, proc) == 2 and proc.poll() is None  # rank 0 is held
        held_at = time.monotonic()
        code = proc.wait(timeout=120)
    except BaseException:
        kill_launcher_and_ranks(proc)
        raise
    waited = time.monotonic() - held_at
    log = (tmp_path / "held.log").read_text(errors="replace")
    assert code != 0 and re.search(r"[Tt]imed out", log), tail(tmp_path / "held.log")
    assert 5 < waited < 60, waited
    assert _loss_lines(save_dir) == 2 and not alive(rank_processes(proc))


# ---------------------------------------------------------------------------------------------- one run per save_dir
def test_second_run_is_refused_and_a_dead_launchers_ranks_stop(reference_runs, tmp_path):
    save_dir = tmp_path / "ckpt"
    args = reference_runs.args("ddp", save_dir)
    first = start_training(args, tmp_path / "first.log", env={"CL_TEST_HOLD_AT_STEP": str(SAVE_INTERVAL + 1)})
    wait_for_lines(save_dir / "losses.jsonl", SAVE_INTERVAL + 1, first)
    ranks = rank_processes(first)
    holder = json.loads((save_dir / ".lock").read_text())["pid"]
    assert len(ranks) == 2 and holder in {r.pid for r in ranks}

    second = run_training(args + LATEST, tmp_path / "second.log")
    text = (tmp_path / "second.log").read_text()
    assert second.returncode != 0 and first.poll() is None
    errors = [line for line in text.splitlines() if line.startswith("error")]
    assert len(errors) == 1, text[-3000:]  # printed once, by rank 0, not once per rank
    assert errors[0].startswith(f"error: --save_dir {save_dir}: another training run is using it: pid {holder} on host")
    assert text.splitlines()[0] == errors[0]  # the first line, before the launcher's own report

    os.kill(first.pid, signal.SIGKILL)  # the launcher alone, as when its ssh session drops
    first.wait(timeout=60)
    _gone, still = psutil.wait_procs(ranks, timeout=15)
    assert not alive(still), "ranks went on training after their launcher died"
    assert latest_checkpoint(save_dir).name == f"epoch-0_step-{SAVE_INTERVAL}"

    log = train_ok(tmp_path, "third", args + LATEST).read_text()
    assert f"took over the lock left by pid {holder} on host" in log
    assert_resumed(log, save_dir / f"epoch-0_step-{SAVE_INTERVAL}")
    assert_bitwise_equal(reference_runs["ddp"], save_dir)


def test_rerun_over_a_finished_run_is_refused_unless_overwrite(reference_runs, tmp_path):
    save_dir = tmp_path / "ckpt"
    shutil.copytree(reference_runs["ddp"], save_dir)
    before = {p: p.stat().st_mtime_ns for p in save_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    args = reference_runs.args("ddp", save_dir)
    args[args.index("--max_steps") + 1] = "1"
    refused = run_training(args, tmp_path / "refused.log", nproc=1)
    assert refused.returncode != 0
    errors = [line for line in (tmp_path / "refused.log").read_text().splitlines() if line.startswith("error")]
    assert errors == [f"error: --save_dir {save_dir}: holds an earlier run ({save_dir / 'epoch-0_step-8'}); "
                      "continue it with --load_checkpoint latest, or pass --overwrite to delete it and start afresh"]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing touched

    log = train_ok(tmp_path, "overwrite", args + ["--overwrite"], nproc=1).read_text()
    assert "--overwrite: removed the earlier run" in log
    assert [c.name for c in save_dir.glob("epoch-*")] == ["epoch-0_step-1"]
    assert [r["step"] for r in read_loss_log(save_dir / "losses.jsonl")] == [1]


def test_a_start_that_fails_after_taking_the_save_dir_leaves_no_lock_record(reference_runs, tmp_path):
    """A run that fails while it is built (here its --dataset is missing, found when the data is read) releases
    the save dir's lock and clears its record: the next run warned of a crashed run that held it."""
    save_dir = tmp_path / "ckpt"
    args = train_args(reference_runs.model, tmp_path / "missing", save_dir, *LAYOUTS["ddp"])
    proc = run_training(args, tmp_path / "failed.log", nproc=1)
    text = (tmp_path / "failed.log").read_text()
    assert proc.returncode != 0
    errors = [line for line in text.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and str(tmp_path / "missing") in errors[0], text[-3000:]
    assert (save_dir / ".lock").read_text() == ""  # released: no holder recorded


# ---------------------------------------------------------------------------------------------- damaged files
def _truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    assert path.stat().st_size == size // 2 < size  # the damage really happened


@pytest.mark.parametrize("layout, relative, kind", [
    ("ddp", "optimizer/optimizer.bin", "torch.save"),
    ("ddp", "modeling/model.safetensors", "safetensors"),
    ("ddp", "running_states.json", "JSON"),
    ("ddp", "lr_scheduler", "torch.save"),
    ("zero2", "optimizer/pytorch_optim-00001.bin", "torch.save"),
])
def test_damaged_checkpoint_file_is_named_with_the_older_checkpoint_to_use(reference_runs, tmp_path, layout,
                                                                            relative, kind):
    save_dir = tmp_path / "ckpt"
    shutil.copytree(reference_runs[layout], save_dir)
    newest, older = save_dir / f"epoch-0_step-{MAX_STEPS}", save_dir / f"epoch-0_step-{2 * SAVE_INTERVAL}"
    verify_checkpoint(newest)  # intact before the damage
    _truncate(newest / relative)
    with pytest.raises(UserInputError) as err:
        verify_checkpoint(newest)
    assert str(err.value).startswith(f"{newest / relative}: truncated or corrupt {kind} file (")
    assert str(err.value).endswith(f"checkpoint {newest} is damaged; the newest older complete checkpoint is "
                                   f"{older} (pass --load_checkpoint {older})")


@pytest.mark.parametrize("layout, relative, why", [
    ("zero2", "optimizer/pytorch_optim-00001.bin", "though pytorch_optim.bin.index.json names it"),
    ("ddp", "rng/rank-00001.pt", "the checkpoint was saved by 2 ranks"),
])
def test_a_file_missing_from_a_checkpoint_is_named_with_the_older_checkpoint_to_use(reference_runs, tmp_path, layout,
                                                                                     relative, why):
    """A copy that left a file out: an optimizer shard its index names (colossalai failed deep inside, or loaded
    without it), a rank's RNG state (the resume went on with a warning that the rank count had changed)."""
    save_dir = tmp_path / "ckpt"
    shutil.copytree(reference_runs[layout], save_dir)
    newest, older = save_dir / f"epoch-0_step-{MAX_STEPS}", save_dir / f"epoch-0_step-{2 * SAVE_INTERVAL}"
    (newest / relative).unlink()
    with pytest.raises(UserInputError) as err:
        verify_checkpoint(newest)
    assert str(err.value).startswith(f"{newest / relative}: missing") and why in str(err.value), str(err.value)
    assert str(err.value).endswith(f"the newest older complete checkpoint is {older} (pass --load_checkpoint {older})")


def test_training_from_a_damaged_latest_checkpoint_stops_with_one_line(reference_runs, tmp_path):
    save_dir = tmp_path / "ckpt"
    shutil.copytree(reference_runs["ddp"], save_dir)
    damaged = save_dir / f"epoch-0_step-{MAX_STEPS}" / "optimizer" / "optimizer.bin"
    _truncate(damaged)
    proc = run_training(reference_runs.args("ddp", save_dir, *LATEST), tmp_path / "run.log")
    text = (tmp_path / "run.log").read_text()
    assert proc.returncode != 0
    errors = [line for line in text.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {damaged}: truncated or corrupt torch.save file"), text
    assert text.splitlines()[0] == errors[0]  # checked before anything is built: the very first line


def test_a_checkpoint_and_a_run_that_disagree_on_lora_stop_with_one_line(reference_runs, tmp_path):
    """A LoRA run's checkpoint holds only adapters (of one rank), a full run's the whole model: resuming one with
    the other's flags is named before anything is built (it was a traceback, or "no model weights")."""
    full, adapters = reference_runs["ddp"] / "epoch-0_step-3", reference_runs["lora_ddp"] / "epoch-0_step-3"

    def check_resume_kind(checkpoint: Path, lora_rank: int) -> None:
        check_lora_matches(LoadTarget("resume", checkpoint), lora_rank)

    check_resume_kind(full, 0)
    check_resume_kind(adapters, LORA_RANK)
    check_lora_matches(LoadTarget("weights", full / "modeling"), 0)
    with pytest.raises(UserInputError, match=re.escape(f"--load_checkpoint {full / 'modeling'} with --lora_rank: give "
                                                       "that folder as --pretrained")):
        check_lora_matches(LoadTarget("weights", full / "modeling"), LORA_RANK)
    with pytest.raises(UserInputError, match=re.escape(f"a full run's checkpoint, and this run has --lora_rank 8: "
                                                       f"resume it without --lora_rank, or train LoRA on its weights as "
                                                       f"a new stage with --pretrained {full / 'modeling'}")):
        check_resume_kind(full, LORA_RANK)
    with pytest.raises(UserInputError, match=r"a LoRA run's checkpoint \(adapters of rank 8 only\): resume it with "
                                             r"--lora_rank 8 and the --pretrained it trained on$"):
        check_resume_kind(adapters, 0)
    with pytest.raises(UserInputError, match="its adapters have rank 8, this run --lora_rank 4: resume with "
                                             "--lora_rank 8$"):
        check_resume_kind(adapters, 4)
    save_dir = tmp_path / "ckpt"
    save_dir.mkdir()
    shutil.copytree(full, save_dir / full.name)
    proc = run_training(reference_runs.args("lora_ddp", save_dir, *LATEST), tmp_path / "run.log")
    text = (tmp_path / "run.log").read_text()
    assert proc.returncode != 0
    errors = [line for line in text.splitlines() if line.startswith("error")]
    assert errors == [f"error: --load_checkpoint {save_dir / full.name}: a full run's checkpoint, and this run has "
                      f"--lora_rank 8: resume it without --lora_rank, or train LoRA on its weights as a new stage "
                      f"with --pretrained {save_dir / full.name / 'modeling'}"], text[-3000:]
    assert text.splitlines()[0] == errors[0]  # checked before anything is built: the very first line


def test_a_checkpoint_of_another_stage_stops_with_one_line_and_a_finished_one_says_nothing_is_left(
        reference_runs, tmp_path, data_dir):
    """A pre-training checkpoint given to the SFT stage as --load_checkpoint resumed the pre-training run: a
    finished one trained nothing, exit 0, and saved its weights as an SFT model; an unfinished one went on with
    pre-training's steps and schedule. Named before the model is built, with the way on (its weights). And the
    other way round. A checkpoint of the same stage at its run's last step is resumed and says nothing is left."""
    from colossal_llama.dataset.chat_templates import CHAT_CONFIG_FILE
    from colossal_llama.dataset.config import OutputLayout, SFTPrepConfig
    from colossal_llama.dataset.pipeline import prepare_sft
    from colossal_llama.training.checkpoint import check_same_stage

    pretraining = reference_runs["ddp"] / f"epoch-0_step-{MAX_STEPS}"
    sft = tmp_path / "sft"
    prepare_sft(SFTPrepConfig(input_dirs=[data_dir / "sft"], tokenizer_dir=reference_runs.model,
                              chat_template="tokenizer", output=OutputLayout.under(sft), max_length=128, num_bins=1,
                              strict=False))
    save_dir = tmp_path / "ckpt"
    proc = run_training(train_args(reference_runs.model, sft, save_dir, *LAYOUTS["ddp"], "--load_checkpoint",
                                   str(pretraining)), tmp_path / "sft.log")
    text = (tmp_path / "sft.log").read_text()
    assert proc.returncode != 0
    errors = [line for line in text.splitlines() if line.startswith("error")]
    assert errors == [f"error: --load_checkpoint {pretraining}: a checkpoint of a pre-training run, and --dataset "
                      "holds SFT data: resuming would go on with that run's steps, schedule and optimizer; start the "
                      f"SFT stage from its weights with --load_checkpoint {pretraining / 'modeling'}"], text[-3000:]
    assert not (save_dir / "losses.jsonl").exists()
    check_same_stage(LoadTarget("resume", pretraining), "pretrain")
    check_same_stage(LoadTarget("weights", pretraining / "modeling"), "sft")  # a new stage: its weights only
    chat = tmp_path / "sft-checkpoint"
    shutil.copytree(pretraining, chat)
    (chat / "modeling" / CHAT_CONFIG_FILE).write_text('{"name": "tokenizer"}')
    with pytest.raises(UserInputError, match=re.escape("a checkpoint of an SFT run, and --dataset holds "
                                                       "pre-training data")):
        check_same_stage(LoadTarget("resume", chat), "pretrain")

    finished = tmp_path / "finished"
    shutil.copytree(reference_runs["ddp"], finished)
    log = train_ok(tmp_path, "finished", reference_runs.args("ddp", finished, *LATEST)).read_text()
    assert (f"the checkpoint is at step {MAX_STEPS} and this run has {MAX_STEPS} steps in all: nothing is left to "
            "train (the final model is its weights); raise --num_epochs or --max_steps to train on") in log


def test_weights_of_another_model_than_pretrained_stop_with_one_line(reference_runs, tmp_path):
    """Another size of the same family (LLaMA-2 7B and 13B share their tokenizer, so the data and tokenizer checks
    pass): named by the two config.json files before anything is built, for a checkpoint and for a modeling/
    folder of a new stage (it was torch's size-mismatch traceback from inside the load)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    other = tmp_path / "other-size"
    shutil.copytree(reference_runs.model, other)  # its tokenizer; the model is replaced by one of other shapes
    config = AutoConfig.from_pretrained(other)
    trained = config.intermediate_size
    config.intermediate_size = trained + 32
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    checkpoint = reference_runs["ddp"] / "epoch-0_step-3"
    check_same_model(checkpoint / "modeling", str(reference_runs.model))
    for target in (checkpoint, checkpoint / "modeling"):
        save_dir = tmp_path / f"ckpt-{target.name}"
        proc = run_training(train_args(other, reference_runs.data, save_dir, *LAYOUTS["ddp"], "--load_checkpoint",
                                       str(target)), tmp_path / f"{target.name}.log")
        text = (tmp_path / f"{target.name}.log").read_text()
        assert proc.returncode != 0
        errors = [line for line in text.splitlines() if line.startswith("error")]
        assert errors == [f"error: --load_checkpoint {checkpoint / 'modeling'}: its weights are of another model "
                          f"than --pretrained {other} (intermediate_size {trained} vs {trained + 32}): pass the "
                          "--pretrained they were trained from"], text[-3000:]
        assert text.splitlines()[0] == errors[0]  # checked before anything is built: the very first line
