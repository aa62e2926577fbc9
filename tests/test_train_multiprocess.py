"""Training under torchrun with 2 gloo ranks on CPU: a tiny LLaMA on real prepared data.

Specification:
- the loss goes down; the final model is a HF folder that ``from_pretrained`` loads;
- ddp, zero2, zero2_cpu (optimizer states offloaded) and 3d (tp=2) give the same per-step losses for the same
  global batch, and each really ran as itself: the plugin class and offload recorded in the run plan, the
  checkpoint layout only that plugin writes, and a loss curve that is not bit-identical to ddp's;
- the loss computed in chunks of scored positions trains as transformers' loss over the full logits does (the
  run plan says which loss each layout used);
- NEFTune really perturbs training (the curve differs from plain ddp);
- a ``modeling/`` folder given to ``--load_checkpoint`` starts a new stage from those weights.
Crash safety (kills, resume, locks, damaged files) is specified in ``test_train_crash.py``.
"""
from __future__ import annotations

import json

import pytest

from colossal_llama.training.checkpoint import latest_checkpoint
from tests.support.train_runs import LOSS_CHUNK, MAX_STEPS, losses, train_ok

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

# fp32 on CPU: layouts differ only in summation order (all-reduce vs local sums, tp partial matmuls), which moves
# a ~10.8 loss by a few float32 ulps per step (measured: < 1e-7 relative over 8 steps). 1e-5 leaves room for
# that drift to grow through 8 optimizer steps, yet is 100x below the change one step of training makes.
LAYOUT_RTOL = 1e-5


def test_loss_goes_down_and_final_model_loads(reference_runs):
    from transformers import AutoModelForCausalLM

    ddp = reference_runs["ddp"]
    curve = losses(ddp)
    assert len(curve) == MAX_STEPS
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.05, curve
    model = AutoModelForCausalLM.from_pretrained(ddp / "modeling")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert (ddp / "modeling" / "tokenizer.json").is_file()
    resolved = json.loads(reference_runs.config("ddp").read_text())
    assert resolved["warmup_steps"] == 2 and resolved["mixed_precision"] == "fp32"
    assert resolved["plan"]["global_batch"] == 4 and resolved["plan"]["dp_size"] == 2
    assert latest_checkpoint(ddp).name == f"epoch-0_step-{MAX_STEPS}"
    assert list((reference_runs.root / "tb").glob("events.out.tfevents.*"))


# plugin -> (colossalai class that must have run, optimizer states offloaded, files only that plugin writes)
PLUGIN_PROOF = {
    "ddp": ("TorchDDPPlugin", False, ["optimizer/optimizer.bin", "modeling/model.safetensors"]),
    "zero2": ("LowLevelZeroPlugin_ZeRO-2", False, ["optimizer/pytorch_optim.bin.index.json",
                                            "optimizer/pytorch_optim-00001.bin"]),
    "zero2_cpu": ("LowLevelZeroPlugin_ZeRO-2", True, ["optimizer/pytorch_optim.bin.index.json",
                                               "optimizer/pytorch_optim-00001.bin"]),
    "3d_tp2": ("HybridParallelPlugin", False, ["optimizer/pytorch_optim.bin.index.json",
                                               "modeling/pytorch_model.bin.index.json"]),
}


@pytest.mark.parametrize("name", ["zero2", "zero2_cpu", "3d_tp2"])
def test_plugins_match_ddp_and_really_ran(reference_runs, name):
    ddp, curve = losses(reference_runs["ddp"]), losses(reference_runs[name])
    assert len(curve) == len(ddp)
    for step, (a, b) in enumerate(zip(ddp, curve), start=1):
        assert abs(a - b) <= LAYOUT_RTOL * abs(a), f"{name} step {step}: ddp {a!r} vs {b!r}"
    # A plugin that silently fell back to ddp would sum in ddp's order: identical to the last bit.
    assert curve != ddp, f"{name} is bit-identical to ddp: did it run at all?"
    for run in ("ddp", name):
        plugin_class, offload, files = PLUGIN_PROOF[run]
        plan = json.loads(reference_runs.config(run).read_text())["plan"]
        assert (plan["plugin_class"], plan["cpu_offload"]) == (plugin_class, offload), run
        checkpoint = latest_checkpoint(reference_runs[run])
        for relative in files:
            assert (checkpoint / relative).is_file(), f"{run}: {relative} missing in {checkpoint}"
    assert not (latest_checkpoint(reference_runs[name]) / "optimizer" / "optimizer.bin").exists()


def test_the_chunked_loss_trains_as_transformers_full_logits_loss(reference_runs):
    """Every layout of these tests computes the loss in chunks of LOSS_CHUNK scored positions (several per
    micro-batch); this is the same ddp run with transformers' loss over the full logits."""
    chunked, full = losses(reference_runs["ddp"]), losses(reference_runs["ddp_full_logits"])
    assert len(chunked) == len(full) == MAX_STEPS
    for step, (a, b) in enumerate(zip(full, chunked), start=1):
        assert abs(a - b) <= LAYOUT_RTOL * abs(a), f"step {step}: full logits {a!r} vs chunked {b!r}"
    assert chunked != full, "bit-identical curves: did the chunked loss run at all?"  # its sums run in another order
    plans = {run: json.loads(reference_runs.config(run).read_text())["plan"] for run in ("ddp", "ddp_full_logits",
                                                                                         "zero2", "3d_tp2")}
    assert {run: (plan["loss"], plan["loss_chunk_tokens"]) for run, plan in plans.items()} == {
        "ddp": ("scored_chunks", LOSS_CHUNK), "zero2": ("scored_chunks", LOSS_CHUNK),
        "ddp_full_logits": ("transformers", 0), "3d_tp2": ("colossalai", 0)}


def test_neftune_changes_the_loss_curve(reference_runs):
    plain, noisy = losses(reference_runs["ddp"]), losses(reference_runs["ddp_neft"])
    assert len(plain) == len(noisy) == MAX_STEPS
    # noise enters every forward pass, so every step's loss differs, the first one included
    assert all(a != b for a, b in zip(plain, noisy)), (plain, noisy)
    assert max(abs(a - b) for a, b in zip(plain, noisy)) > 1e-4


def test_modeling_folder_starts_next_stage_from_trained_weights(reference_runs, tmp_path):
    stage1 = reference_runs["ddp"] / "modeling"
    args = reference_runs.args("ddp", tmp_path / "stage2", "--load_checkpoint", str(stage1))
    args[args.index("--max_steps") + 1] = "1"
    log = train_ok(tmp_path, "stage2", args).read_text()
    assert f"loaded weights from {stage1}" in log
    stage2_first = losses(tmp_path / "stage2")[0]
    # Same first batch as stage 1's step 1, but from trained weights: the loss starts where stage 1 ended.
    assert stage2_first < losses(reference_runs["ddp"])[0] - 0.05
