"""Training under torchrun with 2 gloo ranks on CPU: a tiny LLaMA on real prepared data.

Specification:
- the loss goes down; the final model is a HF folder that ``from_pretrained`` loads;
- ddp, zero2, zero2_cpu (optimizer states offloaded) and 3d (tp=2) give the same per-step losses for the same
  global batch;
- a run killed with SIGKILL at a random step, or in the middle of writing a checkpoint, resumes from the newest
  complete checkpoint and its loss curve equals the uninterrupted run's bit for bit;
- a ``modeling/`` folder given to ``--load_checkpoint`` starts a new stage from those weights.
"""
from __future__ import annotations

import json
import random

import pytest

from colossal_llama.training.checkpoint import latest_checkpoint
from colossal_llama.training.metrics import read_loss_log
from tests.support.launch import kill_group, run_training, start_training, tail, wait_for_lines

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

MAX_STEPS = 8
SAVE_INTERVAL = 3
# Same global batch (4 sequences per step) for every layout: ddp/zero2 = 2 ranks x 1 x 2 micro-batches,
# 3d tp=2 = 1 dp rank x 1 x 4 micro-batches.
DP2_BATCH = ["--batch_size", "1", "--accumulation_steps", "2"]
DP1_BATCH = ["--batch_size", "1", "--accumulation_steps", "4"]
NEFT_AND_RECOMPUTE = ["--use_neft", "--use_grad_checkpoint"]
TP2 = ["--plugin", "3d", "--tp", "2", "--zero_stage", "0", *DP1_BATCH]
# fp32 on CPU: layouts differ only in summation order (all-reduce vs local sums, tp partial matmuls), which moves
# a ~10.8 loss by a few float32 ulps per step (measured: < 1e-7 relative over 8 steps). 1e-5 leaves room for
# that drift to grow through 8 optimizer steps, yet is 100x below the change one step of training makes.
LAYOUT_RTOL = 1e-5


def train_args(model, data, save_dir, *extra):
    return ["--pretrained", str(model), "--dataset", str(data / "arrow"), "--save_dir", str(save_dir),
            "--max_length", "128", "--max_steps", str(MAX_STEPS), "--save_interval", str(SAVE_INTERVAL),
            "--lr", "2e-3", "--warmup_steps", "2", "--log_interval", "4", "--mixed_precision", "fp32", *extra]


def train_ok(tmp_path, name, args, **kwargs):
    log = tmp_path / f"{name}.log"
    proc = run_training(args, log, **kwargs)
    assert proc.returncode == 0, f"{name} failed (rc {proc.returncode}):\n{tail(log)}"
    return log


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, prepared_pretrain):
    """Uninterrupted reference runs, shared by the tests below."""
    root = tmp_path_factory.mktemp("train-runs")
    out = {}
    for name, plugin_args in (("ddp", ["--plugin", "ddp", *DP2_BATCH, "--tensorboard_dir", str(root / "tb")]),
                              ("zero2", ["--plugin", "zero2", *DP2_BATCH]),
                              ("zero2_cpu", ["--plugin", "zero2_cpu", *DP2_BATCH]),
                              ("3d_tp2", TP2),
                              ("ddp_neft", ["--plugin", "ddp", *NEFT_AND_RECOMPUTE, *DP2_BATCH])):
        config_file = root / f"{name}.config.json"
        train_ok(root, name, train_args(tiny_llama, prepared_pretrain, root / name, *plugin_args,
                                        "--config_file", str(config_file)))
        out[name] = root / name
    return out


def losses(save_dir):
    return [r["loss"] for r in read_loss_log(save_dir / "losses.jsonl")]


def test_loss_goes_down_and_final_model_loads(runs):
    from transformers import AutoModelForCausalLM

    curve = losses(runs["ddp"])
    assert len(curve) == MAX_STEPS
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.05, curve
    model = AutoModelForCausalLM.from_pretrained(runs["ddp"] / "modeling")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert (runs["ddp"] / "modeling" / "tokenizer.json").is_file()
    resolved = json.loads((runs["ddp"].parent / "ddp.config.json").read_text())
    assert resolved["warmup_steps"] == 2 and resolved["mixed_precision"] == "fp32"
    assert resolved["extra"]["global_batch"] == 4 and resolved["extra"]["dp_size"] == 2
    assert latest_checkpoint(runs["ddp"]).name == f"epoch-0_step-{MAX_STEPS}"
    assert list((runs["ddp"].parent / "tb").glob("events.out.tfevents.*"))


def test_zero2_zero2_cpu_and_3d_tp2_match_ddp(runs):
    ddp = losses(runs["ddp"])
    for name in ("zero2", "zero2_cpu", "3d_tp2"):
        curve = losses(runs[name])
        assert len(curve) == len(ddp), name
        for step, (a, b) in enumerate(zip(ddp, curve), start=1):
            assert abs(a - b) <= LAYOUT_RTOL * abs(a), f"{name} step {step}: ddp {a!r} vs {b!r}"


def _assert_bitwise_equal(reference, resumed):
    ref, got = read_loss_log(reference / "losses.jsonl"), read_loss_log(resumed / "losses.jsonl")
    assert [r["step"] for r in got] == list(range(1, MAX_STEPS + 1))
    assert got == ref  # every float compared exactly (json keeps repr precision)


@pytest.mark.parametrize("reference, layout", [
    ("ddp_neft", ["--plugin", "ddp", *NEFT_AND_RECOMPUTE, *DP2_BATCH]),
    ("3d_tp2", TP2),
], ids=["ddp-neftune-recompute", "3d-tp2"])
def test_kill9_at_random_step_resumes_bitwise(runs, tmp_path, tiny_llama, prepared_pretrain,
                                              reference, layout):
    """ddp: NEFTune is on, so the resumed run must also restore each rank's torch RNG to match (and activation
    recomputation is on, so --use_grad_checkpoint is exercised). 3d tp2: model and optimizer shards per tp rank."""
    kill_after = random.Random().randint(SAVE_INTERVAL + 1, MAX_STEPS - 1)
    save_dir = tmp_path / "ckpt"
    args = train_args(tiny_llama, prepared_pretrain, save_dir, *layout)
    proc = start_training(args, tmp_path / "killed.log")
    seen = wait_for_lines(save_dir / "losses.jsonl", kill_after, proc)
    assert proc.poll() is None, f"finished before the kill at step {kill_after}:\n{tail(tmp_path / 'killed.log')}"
    kill_group(proc)
    assert seen < MAX_STEPS and not (save_dir / "modeling").exists()
    train_ok(tmp_path, "resumed", args + ["--load_checkpoint", "latest"])
    assert "resumed from" in (tmp_path / "resumed.log").read_text()
    _assert_bitwise_equal(runs[reference], save_dir)


def test_kill9_during_checkpoint_save_leaves_no_complete_checkpoint(runs, tmp_path, tiny_llama,
                                                                     prepared_pretrain):
    """zero2 (sharded optimizer states): SIGKILL inside the save of step 6 at its last moment, when every shard and
    running_states.json are written but the dir is not yet renamed into place."""
    crash_step = 2 * SAVE_INTERVAL
    save_dir = tmp_path / "ckpt"
    args = train_args(tiny_llama, prepared_pretrain, save_dir, "--plugin", "zero2", *DP2_BATCH)
    proc = run_training(args, tmp_path / "killed.log", env={"CL_TEST_KILL_DURING_SAVE_STEP": str(crash_step)})
    assert proc.returncode != 0
    half_written = save_dir / f".tmp-epoch-0_step-{crash_step}"
    assert (half_written / "modeling").is_dir() and (half_written / "optimizer").is_dir()
    assert not (save_dir / f"epoch-0_step-{crash_step}").exists()
    assert latest_checkpoint(save_dir).name == f"epoch-0_step-{SAVE_INTERVAL}"
    train_ok(tmp_path, "resumed", args + ["--load_checkpoint", "latest"])
    assert f"resumed from {save_dir / f'epoch-0_step-{SAVE_INTERVAL}'}" in (tmp_path / "resumed.log").read_text()
    assert not half_written.exists()  # the leftover was cleared by the re-done save
    _assert_bitwise_equal(runs["zero2"], save_dir)


def test_modeling_folder_starts_next_stage_from_trained_weights(runs, tmp_path, tiny_llama,
                                                                prepared_pretrain):
    stage1 = runs["ddp"] / "modeling"
    args = train_args(tiny_llama, prepared_pretrain, tmp_path / "stage2", "--plugin", "ddp", *DP2_BATCH,
                      "--load_checkpoint", str(stage1))
    args[args.index("--max_steps") + 1] = "1"
    train_ok(tmp_path, "stage2", args)
    log = (tmp_path / "stage2.log").read_text()
    assert f"loaded weights from {stage1}" in log
    stage2_first = losses(tmp_path / "stage2")[0]
    # Same first batch as stage 1's step 1, but from trained weights: the loss starts where stage 1 ended.
    assert stage2_first < losses(runs["ddp"])[0] - 0.05
