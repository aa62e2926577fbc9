"""One optimizer step over ``accumulation_steps`` micro-batches, with a token-weighted loss.

The loss of a step is ``sum of per-token losses / number of loss tokens`` over the whole global batch (all
micro-batches on all data-parallel ranks), not a mean of per-micro-batch means. That makes the logged loss and
the gradient independent of how the global batch is split (ddp x2 vs tp2 x1 vs accumulation), which is what
lets the plugins be compared step for step.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from colossal_llama.training.collate import count_loss_tokens
from colossal_llama.training.loss_scale import fp16_helper
from colossal_llama.training.model import NEFTune
from colossal_llama.training.plugin import Parallelism

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")


@dataclass
class StepResult:
    loss: Optional[float]  # None: the global batch had no trained token, and the optimizer did not step
    grad_norm: Optional[float]
    lr: float
    tokens: int
    seconds: float
    category_tokens: List[int] = field(default_factory=list)  # input tokens per category (global batch)
    stop_votes: int = 0  # ranks that asked to stop (a signal; the same number on every rank)


class NonFiniteStep(Exception):
    """The loss or the gradient norm of optimizer step ``step`` is not finite (the same on every rank: both are
    global). ``applied``: the optimizer took the step already (plugins that measure the norm inside their step)."""

    def __init__(self, step: int, loss: float, grad_norm: Optional[float], applied: bool):
        self.step, self.loss, self.grad_norm, self.applied = step, loss, grad_norm, applied
        super().__init__(f"the loss is {loss} (gradient norm {grad_norm})" if not math.isfinite(loss) else
                         f"the gradient norm is {grad_norm} (loss {loss:.6g})")


@dataclass
class Stepper:
    booster: object
    model: object
    optimizer: object
    scheduler: object
    parallel: Parallelism
    device: torch.device
    grad_clip: float
    neftune: Optional[NEFTune] = None  # its noise is a function of (step, micro-batch): told of every step
    num_categories: int = 0  # > 0: count input tokens per category (batches carry category_codes)
    on_progress: Callable[[], None] = lambda: None  # after each micro-batch (training or validation)

    def _all_reduce(self, values: List[float], group=None) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=group)
        return t.tolist()

    def _inputs(self, batch: dict) -> dict:
        return {k: batch[k].to(self.device) for k in MODEL_INPUTS if k in batch}

    def _loss_sum(self, out, n_tokens: int) -> torch.Tensor:
        """Sum (not mean) of the token losses of one micro-batch; 0 with a graph when it has no loss tokens."""
        if n_tokens == 0:  # HF's mean over zero tokens is NaN; keep every parameter in the graph for DDP
            if out.logits is None:  # Liger's fused loss and the chunked one return no logits
                return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
            return out.logits.float().sum() * 0.0
        return out.loss.float() * n_tokens

    def _forward_loss_sum(self, batch: dict, n_tokens: int) -> torch.Tensor:
        dtype = self.parallel.autocast_dtype
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with autocast:
            out = self.model(**self._inputs(batch), use_cache=False)
        return self._loss_sum(out, n_tokens)

    def _accumulate(self, micro_batches: List[dict], local_tokens: List[int], scale: float) -> torch.Tensor:
        """Forward and backward of every micro-batch; returns this rank's loss sum (on device: no host sync)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        last = len(micro_batches) - 1
        for i, (batch, n_tokens) in enumerate(zip(micro_batches, local_tokens)):
            sync = contextlib.nullcontext()
            if self.parallel.no_sync_while_accumulating and i < last:
                sync = self.booster.no_sync(self.model, self.optimizer)
            with sync:
                micro_loss = self._forward_loss_sum(batch, n_tokens)
                self.booster.backward(micro_loss * scale, self.optimizer)
            loss_sum += micro_loss.detach().double()
            self.on_progress()
        return loss_sum

    def _pipeline(self, batch: dict, scale: float, train: bool = True) -> torch.Tensor:
        """One batch through the 1F1B pipeline; the schedule cuts it into micro-batches and divides each
        micro-batch's criterion by their number, which the criterion multiplies back in. Returns the loss sum on
        the last stage (zero elsewhere)."""
        num_micro = len(batch["input_ids"]) // self.parallel.pipeline_microbatch_size

        def criterion(out, micro_batch: dict) -> torch.Tensor:
            return self._loss_sum(out, count_loss_tokens(micro_batch["labels"])) * (scale * num_micro)

        # Validation: no optimizer (under no_grad) runs forward only, and no_sync skips the gradient
        # synchronisation colossalai would otherwise attempt afterwards (on gradients that do not exist).
        optimizer = self.optimizer if train else None
        with contextlib.nullcontext() if train else self.model.no_sync():
            result = self.booster.execute_pipeline(iter([self._inputs(batch)]), self.model, criterion, optimizer,
                                                   return_loss=True)
        self.on_progress()
        loss = result.get("loss")
        if loss is None:  # not the last stage
            return torch.zeros((), dtype=torch.float64, device=self.device)
        return loss.detach().double() / scale

    def eval_loss_sum(self, batch: dict) -> tuple[float, int]:
        """(sum of token losses, loss tokens) of one batch, forward only (call under ``torch.no_grad`` in eval
        mode). With pipeline parallelism the sum is on the last stage (0 elsewhere)."""
        n_tokens = count_loss_tokens(batch["labels"])
        if n_tokens == 0 and not self.parallel.forwards_are_collective:  # gemini: the others' forward waits for it
            return 0.0, 0
        if self.parallel.pipeline_microbatch_size:
            return float(self._pipeline(batch, scale=1.0, train=False)), n_tokens
        loss_sum = float(self._forward_loss_sum(batch, n_tokens))
        self.on_progress()
        return loss_sum, n_tokens

    def step(self, micro_batches: List[dict], step: int, stop_vote: Callable[[], float] = lambda: 0.0) -> StepResult:
        """Optimizer step number ``step`` (1-based) over this rank's ``micro_batches``; ``stop_vote()`` (1: this
        rank was asked to stop) is read at the step's last all-reduce, which sums it over the ranks, so every rank
        learns at once of a signal that came before then, while the step computed too."""
        start = time.perf_counter()
        local_tokens = [count_loss_tokens(b["labels"]) for b in micro_batches]
        input_tokens = sum(int(b["lengths"].sum()) for b in micro_batches)
        per_category = self._category_tokens(micro_batches)
        global_loss_tokens, global_input_tokens, *category_tokens = self._all_reduce(
            [sum(local_tokens), input_tokens, *per_category], self.parallel.layout.dp_group)
        if global_loss_tokens == 0:  # the same on every rank: the dp groups hold the same global batch
            return self._skip(start, global_input_tokens, category_tokens, stop_vote)
        # DDP / ZeRO average gradients over dp ranks, so scale by dp_size to get sum / global_loss_tokens.
        scale = self.parallel.layout.dp_size / global_loss_tokens
        if self.neftune is not None:
            self.neftune.start_step(step)
        if self.parallel.pipeline_microbatch_size:
            (batch,) = micro_batches  # validated: --accumulation_steps 1 with --pp
            loss_sum = self._pipeline(batch, scale)
        else:
            loss_sum = self._accumulate(micro_batches, local_tokens, scale)
        grad_norm = self._clip() if self.parallel.clip_in_step_loop else None
        reported = loss_sum.item() if self.parallel.reports_loss else 0.0
        # world: brings the last pipeline stage's loss to every rank, and every rank's stop vote to all; before the
        # optimizer step, so that a non-finite loss never reaches the weights
        total_loss, stop_votes = self._all_reduce([reported, stop_vote()])
        loss = total_loss / global_loss_tokens
        self._check_finite(step, loss, grad_norm, applied=False)
        lr = self.scheduler.get_last_lr()[0]
        loss_scale = self._loss_scale()  # the one the gradients carry (step() may change it)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        if not self.parallel.clip_in_step_loop:
            grad_norm = self._plugin_grad_norm(loss_scale)
            self._check_finite(step, loss, grad_norm, applied=True)
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, tokens=int(global_input_tokens),
                          seconds=time.perf_counter() - start, category_tokens=[int(t) for t in category_tokens],
                          stop_votes=int(stop_votes))

    def _skip(self, start: float, input_tokens: float, category_tokens: List[float],
              stop_vote: Callable[[], float]) -> StepResult:
        """A global batch without a trained token (every label masked: chunks of long sources) has no gradient;
        an optimizer step would still move the weights (Adam's momentum, weight decay). No forward, no optimizer
        step: the weights, the optimizer state and the loss scale stay as they were; the schedule moves on (the
        learning rate stays a function of the step number) and the stop votes are counted as in any step."""
        (stop_votes,) = self._all_reduce([stop_vote()])
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": skipped on purpose
            warnings.simplefilter("ignore", UserWarning)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
        return StepResult(loss=None, grad_norm=None, lr=lr, tokens=int(input_tokens),
                          seconds=time.perf_counter() - start, category_tokens=[int(t) for t in category_tokens],
                          stop_votes=int(stop_votes))

    def _check_finite(self, step: int, loss: float, grad_norm: Optional[float], applied: bool) -> None:
        """Raise :class:`NonFiniteStep` on a nan/inf loss, or gradient norm (unless fp16's loss scaler skips such
        steps itself): a diverged run must stop before its weights, and then its checkpoints, are nan."""
        norm_broken = grad_norm is not None and not math.isfinite(grad_norm) and not self.parallel.loss_scaling
        if not math.isfinite(loss) or norm_broken:
            raise NonFiniteStep(step, loss, grad_norm, applied)

    def _category_tokens(self, micro_batches: List[dict]) -> List[float]:
        if not self.num_categories:
            return []
        counts = torch.zeros(self.num_categories, dtype=torch.float64)
        for b in micro_batches:
            counts.index_add_(0, b["category_codes"], b["lengths"].double())
        return counts.tolist()

    def _clip(self) -> float:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")  # inf: measure only
        return float(self.optimizer.clip_grad_by_norm(max_norm))

    def _fp16_helper(self):
        """fp16 under ZeRO, gemini or 3d: the optimizer's mixed-precision helper (:func:`fp16_helper`); None
        otherwise."""
        if not self.parallel.loss_scaling or self.parallel.clip_in_step_loop:
            return None
        return fp16_helper(self.optimizer)

    def _loss_scale(self) -> float:
        """The loss scale of this step's gradients (1 without fp16), read without the helper's
        ``get_grad_div_scale``, which changes its state."""
        helper = self._fp16_helper()
        return 1.0 if helper is None else float(helper.loss_scale)

    def _plugin_grad_norm(self, loss_scale: float) -> Optional[float]:
        """The norm the plugin's optimizer measured inside ``step()``; colossalai measures it on the scaled
        gradients (fp16: 65,536x the real norm at the initial scale), so it is divided by ``loss_scale``. None on
        a step the loss scaler skipped (it overflowed): the optimizer then keeps the previous step's norm."""
        found = getattr(self._fp16_helper(), "found_overflow", None)
        if found is not None and bool(found.item() > 0):
            return None
        getter = getattr(self.optimizer, "get_grad_norm", None)
        norm = getter() if getter is not None else None
        return None if norm is None else float(norm) / loss_scale
