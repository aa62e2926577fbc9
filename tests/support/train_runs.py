"""Reference training runs shared by the multi-process test modules, and the helpers to compare runs.

Every run trains the tiny LLaMA (``tiny_llama``) on real prepared data (``prepared_pretrain``) for ``MAX_STEPS``
optimizer steps of the same global batch (4 sequences), under ``torchrun`` with 2 gloo ranks on CPU, in fp32.
A reference run is made the first time a test asks for it and reused by every later test of the session.
"""
from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Dict, List

from colossal_llama.training.metrics import read_loss_log
from tests.support.launch import run_training, tail

MAX_STEPS = 8
SAVE_INTERVAL = 3
# Same global batch (4 sequences per step) for every layout: ddp/zero2 = 2 ranks x 1 x 2 micro-batches,
# 3d tp=2 = 1 dp rank x 1 x 4 micro-batches.
DP2_BATCH = ["--batch_size", "1", "--accumulation_steps", "2"]
DP1_BATCH = ["--batch_size", "1", "--accumulation_steps", "4"]
NEFT = ["--use_neft", "--neft_alpha", "5"]  # the paper's alpha: a clear margin over no noise
RECOMPUTE = ["--use_grad_checkpoint"]
TP2 = ["--plugin", "3d", "--tp", "2", "--zero_stage", "0", *DP1_BATCH]
PP2 = ["--plugin", "3d", "--pp", "2", "--zero_stage", "0", "--batch_size", "4", "--microbatch_size", "2"]
# Several LM-head calls per micro-batch (about 100 scored tokens), so every layout that computes the loss itself
# trains through the chunked loss and its recomputation; tp/pp/sp runs use colossalai's loss (and log that)
LOSS_CHUNK = 32
LORA_RANK = 8
LORA = ["--lora_rank", str(LORA_RANK), "--lora_alpha", "16", "--lora_train_embeddings", "on"]

# name -> the flags that differ between reference runs
LAYOUTS: Dict[str, List[str]] = {
    "ddp": ["--plugin", "ddp", *DP2_BATCH],
    "ddp_full_logits": ["--plugin", "ddp", *DP2_BATCH, "--loss_chunk_tokens", "0"],  # transformers' own loss
    "zero2": ["--plugin", "zero2", *DP2_BATCH],
    "zero2_cpu": ["--plugin", "zero2_cpu", *DP2_BATCH],
    # bf16: the optimizer steps fp32 master copies (each rank its slice), which a checkpoint must hold
    "zero2_bf16": ["--plugin", "zero2", "--mixed_precision", "bf16", *DP2_BATCH],
    # ... 3d without ZeRO: both dp replicas hold the same full masters (written once, read by both)
    "3d_dp2_bf16": ["--plugin", "3d", "--zero_stage", "0", "--mixed_precision", "bf16", *DP2_BATCH],
    "3d_tp2": TP2,
    "ddp_neft": ["--plugin", "ddp", *NEFT, *DP2_BATCH],
    "ddp_neft_recompute": ["--plugin", "ddp", *NEFT, *RECOMPUTE, *DP2_BATCH],
    "zero2_neft": ["--plugin", "zero2", *NEFT, *DP2_BATCH],
    "zero2_neft_recompute": ["--plugin", "zero2", *NEFT, *RECOMPUTE, *DP2_BATCH],
    # pipeline: 2 stages, one dp rank: the whole global batch per step, cut into 2 pipeline micro-batches (as many
    # as stages: 1F1B's minimum; more only add gloo round trips to the test's time)
    "pp2": PP2,
    "pp2_eager": [*PP2, "--lazy_init", "False"],  # every rank loads the whole model first (pp2 builds it lazily)
    "sp_split_gather": [*TP2, "--enable_sequence_parallelism", "--sp_mode", "split_gather"],
    "sp_all_to_all": ["--plugin", "3d", "--sp", "2", "--sp_mode", "all_to_all", "--zero_stage", "0", *DP1_BATCH],
    # 3d with ZeRO needs bf16 (colossalai keeps fp32 master weights itself); bf16 is slow on CPU: 3 steps
    "3d_zero1_offload": ["--plugin", "3d", "--zero_stage", "1", "--zero_cpu_offload", "--mixed_precision", "bf16",
                         *DP2_BATCH, "--max_steps", "3"],
    "lora_ddp": ["--plugin", "ddp", *LORA, *DP2_BATCH],
    "lora_zero2": ["--plugin", "zero2", *LORA, *DP2_BATCH],
}


def train_args(model: Path, data: Path, save_dir: Path, *extra: str) -> List[str]:
    return ["--pretrained", str(model), "--dataset", str(data / "arrow"), "--save_dir", str(save_dir),
            "--max_length", "128", "--max_steps", str(MAX_STEPS), "--save_interval", str(SAVE_INTERVAL),
            "--lr", "2e-3", "--warmup_steps", "2", "--log_interval", "4", "--mixed_precision", "fp32",
            "--loss_chunk_tokens", str(LOSS_CHUNK), *validation_args(data), *extra]


def validation_args(data: Path) -> List[str]:
    """Validation runs in every run (it must leave training untouched, resume included), but small: 100 batches
    through a 2-stage pipeline on gloo take 40 s (tests/test_train_validation.py has it in full). Data with a
    held-out split is validated on it by default; data without one names 2 batches of its training rows."""
    named = [] if (data / "eval").is_dir() else ["--eval_dataset", str(data / "arrow")]
    return [*named, "--eval_batches", "2"]


def train_ok(log_dir: Path, name: str, args: List[str], **kwargs) -> Path:
    """Run to completion under torchrun; fails the test with the log's tail when it does not exit 0."""
    log = Path(log_dir) / f"{name}.log"
    proc = run_training(args, log, **kwargs)
    assert proc.returncode == 0, f"{name} failed (rc {proc.returncode}):\n{tail(log)}"
    return log


def losses(save_dir: Path) -> List[float]:
    return [r["loss"] for r in read_loss_log(Path(save_dir) / "losses.jsonl")]


def assert_resumed(log: str, checkpoint: Path) -> None:
    """The run whose log is ``log`` resumed from ``checkpoint``: a run that started afresh writes the same losses
    (training is deterministic), so equal records alone do not show a resume."""
    assert f"resumed from {checkpoint}: " in log, log[-3000:]
    assert "starting from scratch" not in log


def assert_bitwise_equal(reference: Path, resumed: Path) -> None:
    """Every record of ``losses.jsonl`` (loss, lr, grad norm, tokens) equal, float for float."""
    ref, got = read_loss_log(reference / "losses.jsonl"), read_loss_log(resumed / "losses.jsonl")
    assert [r["step"] for r in got] == list(range(1, MAX_STEPS + 1))
    assert got == ref  # json keeps repr precision: exact comparison


class ReferenceRuns:
    """``runs[name]`` -> the save dir of the uninterrupted run ``LAYOUTS[name]``, trained on first use."""

    def __init__(self, root: Path, model: Path, data: Path):
        self.root, self.model, self.data = Path(root), Path(model), Path(data)
        self.root.mkdir(parents=True, exist_ok=True)

    def args(self, name: str, save_dir: Path, *extra: str) -> List[str]:
        return train_args(self.model, self.data, save_dir, *LAYOUTS[name], *extra)

    def config(self, name: str) -> Path:
        """The resolved config (flags + run plan) that run ``name`` wrote (made first if need be)."""
        self[name]
        return self._config_path(name)

    def _config_path(self, name: str) -> Path:
        return self.root / f"{name}.config.json"

    def __getitem__(self, name: str) -> Path:
        save_dir = self.root / name
        with open(self.root / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (save_dir / "modeling").is_dir():
                extra = ["--config_file", str(self._config_path(name))]
                if name == "ddp":
                    extra += ["--tensorboard_dir", str(self.root / "tb")]
                train_ok(self.root, name, self.args(name, save_dir, *extra))
        return save_dir
