"""Run metrics on rank 0: TensorBoard scalars, a tqdm bar, log lines, and ``save_dir/losses.jsonl``.

``losses.jsonl`` holds one record per optimizer step ``{"step", "epoch", "loss", "lr", "grad_norm", "tokens"}``
(``loss`` null: the step's global batch had no trained token, and the optimizer did not step).
Floats are written with ``repr`` precision, so two runs can be compared bit for bit. On resume from step S
the records after S (written by the interrupted run after its last checkpoint) are dropped first.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from colossal_llama.utils.durable import replace_file

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A800": 312e12, "H800": 989e12}
LOSS_LOG = "losses.jsonl"
EVAL_LOG = "eval.jsonl"  # {"step", "scores": {category: {"loss", "bpc", "tokens", "characters"}, "all": ...}}


def peak_flops(cuda: bool) -> float:
    """Peak FLOP/s of this device, 0 when unknown (CPU): MFU is then reported as 0."""
    if not cuda:
        return 0.0
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), 0.0)


def trim_loss_log(path: Path, keep_through_step: int) -> int:
    """Keep records with ``step <= keep_through_step`` (0 clears the file) of a per-step jsonl log
    (``losses.jsonl``, ``eval.jsonl``); returns how many were dropped. A line that is no record (the last one cut
    short by a crash or a full disk) is dropped with a warning naming it: the resume goes on (this runs on rank 0
    alone, where an error would leave the other ranks waiting in a collective)."""
    if not path.is_file():
        return 0
    lines = [(n, ln) for n, ln in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if ln.strip()]
    kept = []
    for line_no, line in lines:
        step = _record_step(line)
        if step is None:
            log.warning("%s:%d: not a record (%.60r): dropped", path, line_no, line)
        elif step <= keep_through_step:
            kept.append(line)
    replace_file(path, "".join(ln + "\n" for ln in kept))
    return len(lines) - len(kept)


def _record_step(line: str) -> Optional[int]:
    """The ``step`` of a log line, None when the line is not a record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def peak_memory_gib(cuda: bool) -> float:
    """Peak memory of this rank so far: allocated GPU memory on CUDA, the process's peak RSS on CPU."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def read_loss_log(path: Path) -> list:
    return [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


@dataclass
class StepStats:
    step: int  # optimizer steps done, 1-based
    epoch: int
    loss: Optional[float]  # token-weighted mean over the global batch; None: no trained token, no optimizer step
    lr: float
    grad_norm: Optional[float]
    tokens: int  # input tokens (not padding) in the global batch
    seconds: float  # wall time of the step
    category_tokens: List[int] = field(default_factory=list)  # input tokens per category (RunMetrics.categories)


class RunMetrics:
    """Only rank 0 writes; other ranks get a no-op instance (``enabled=False``). Without ``save_dir`` (a
    benchmark) no ``losses.jsonl`` is kept. MFU = 6 x parameters x global tokens/s over the peak FLOP/s of all
    ``devices`` (the run's world size)."""

    def __init__(self, enabled: bool, save_dir: Optional[Path], tensorboard_dir: Optional[str], total_steps: int,
                 start_step: int, log_interval: int, num_params: int, cuda: bool, categories: Sequence[str] = (),
                 category_tokens: Optional[dict] = None, devices: int = 1):
        self.enabled = enabled
        self.log_interval = log_interval
        self.flops_per_token = 6 * num_params
        # a step's tokens are the global batch's, processed by every device of the run: MFU is per device
        self.peak = peak_flops(cuda) * devices
        self.cuda = cuda
        self.categories = list(categories)
        # running totals of input tokens per category, carried across a resume by the checkpoint's running state
        self._category_totals = {c: int((category_tokens or {}).get(c, 0)) for c in self.categories}
        self.loss_log = save_dir / LOSS_LOG if save_dir is not None else None
        self._writer = self._bar = self._fh = self._eval_fh = None
        self._window: list[StepStats] = []
        if not enabled:
            return
        if self.loss_log is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            for path in (self.loss_log, save_dir / EVAL_LOG):
                dropped = trim_loss_log(path, start_step)
                if dropped:
                    log.info("%s: dropped %d records after step %d (steps redone after resume)", path, dropped,
                             start_step)
            self._fh = open(self.loss_log, "a", encoding="utf-8")
            self._eval_fh = open(save_dir / EVAL_LOG, "a", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run's first step onwards: the points a crashed run logged after its checkpoint go
            self._writer = SummaryWriter(tensorboard_dir, purge_step=start_step + 1 if start_step else None)
        from tqdm import tqdm

        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def record(self, stats: StepStats) -> None:
        for name, n in zip(self.categories, stats.category_tokens):  # on every rank: the totals are checkpointed
            self._category_totals[name] += n
        if not self.enabled:
            return
        tokens_per_s = stats.tokens / max(stats.seconds, 1e-9)
        mfu = self.flops_per_token * tokens_per_s / self.peak if self.peak else 0.0
        if self._fh is not None:
            self._fh.write(json.dumps({"step": stats.step, "epoch": stats.epoch, "loss": stats.loss, "lr": stats.lr,
                                       "grad_norm": stats.grad_norm, "tokens": stats.tokens}) + "\n")
            self._fh.flush()
        if self._writer is not None:
            for tag, value in (("train/loss", stats.loss), ("train/lr", stats.lr), ("train/tokens_per_s", tokens_per_s),
                               ("train/mfu", mfu), ("train/grad_norm", stats.grad_norm),
                               ("train/peak_memory_gib", peak_memory_gib(self.cuda))):
                if value is not None:
                    self._writer.add_scalar(tag, value, stats.step)
            for name, total in self._category_totals.items():
                self._writer.add_scalar(f"data/tokens/{name}", total, stats.step)
        self._bar.update(1)
        self._bar.set_postfix(loss="skipped" if stats.loss is None else f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}",
                              tok_s=f"{tokens_per_s:.0f}")
        self._window.append(stats)
        if stats.step % self.log_interval == 0:
            self._log_window()

    def category_totals(self) -> dict:
        return dict(self._category_totals)

    def record_eval(self, step: int, scores: dict) -> None:
        """Validation scores (``{category: CategoryScore}``, ``"all"`` included) after ``step`` steps."""
        if not self.enabled:
            return
        width = max(len(name) for name in scores)
        log.info("validation after step %d:\n%s", step, "\n".join(
            f"  {name:<{width}}  loss {s.loss:.4f}  bits/char {s.bits_per_char:.4f}  ({s.tokens} tokens, "
            f"{s.characters} characters)" for name, s in scores.items()))
        if self._eval_fh is not None:
            record = {"step": step, "scores": {name: s.to_json() for name, s in scores.items()}}
            self._eval_fh.write(json.dumps(record) + "\n")
            self._eval_fh.flush()
        if self._writer is not None:
            for name, s in scores.items():
                if s.tokens and s.characters:  # a score of nothing is no point of the curve
                    self._writer.add_scalar(f"eval/loss/{name}", s.loss, step)
                    self._writer.add_scalar(f"eval/bpc/{name}", s.bits_per_char, step)

    def _log_window(self) -> None:
        w, self._window = self._window, []
        seconds = sum(s.seconds for s in w)
        tokens = sum(s.tokens for s in w)
        norms = [s.grad_norm for s in w if s.grad_norm is not None]
        trained = [s.loss for s in w if s.loss is not None]
        tokens_per_s = tokens / max(seconds, 1e-9)
        mfu = f" | MFU {self.flops_per_token * tokens_per_s / self.peak:.1%}" if self.peak else ""
        loss = f"{sum(trained) / len(trained):.4f} (mean of {len(trained)} steps)" if trained else "n/a"
        skipped = len(w) - len(trained)
        if skipped:  # every label of their global batches masked (chunks of long sources): no optimizer step
            loss += f"; {skipped} step(s) skipped: no trained token"
        log.info("step %d epoch %d | loss %s | lr %.3e | grad_norm %s | %.0f tokens/s%s | %.2f s/step | "
                 "peak memory %.2f GiB%s", w[-1].step, w[-1].epoch, loss, w[-1].lr,
                 f"{sum(norms) / len(norms):.3f}" if norms else "n/a", tokens_per_s, mfu, seconds / len(w),
                 peak_memory_gib(self.cuda), self._mix_so_far())

    def _mix_so_far(self) -> str:
        """`` | tokens so far: news 71.2%, novel 28.8%`` (the realised mix), or nothing without categories."""
        total = sum(self._category_totals.values())
        if len(self.categories) < 2 or not total:
            return ""
        return " | tokens so far: " + ", ".join(f"{name} {n / total:.1%}" for name, n in self._category_totals.items())

    def close(self) -> None:
        if not self.enabled:
            return
        if self._window:
            self._log_window()
        for fh in (self._fh, self._eval_fh):
            if fh is not None:
                fh.close()
        self._bar.close()
        if self._writer is not None:
            self._writer.close()
