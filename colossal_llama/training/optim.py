"""AdamW (betas 0.9, 0.95) and a linear warm-up + cosine schedule that resumes exactly."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

BETAS = (0.9, 0.95)
MIN_LR_RATIO = 0.1  # cosine decays to 0.1 x lr


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Trainable params split into decayed (matrices, embeddings) and not decayed (norm weights, biases)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, cuda: bool) -> torch.optim.Optimizer:
    """colossalai's HybridAdam (fused AdamW) on CUDA; ``torch.optim.AdamW`` on CPU (HybridAdam needs CUDA here)."""
    groups = param_groups(model, weight_decay)
    if cuda:
        from colossalai.nn.optimizer import HybridAdam

        return HybridAdam(groups, lr=lr, betas=BETAS, weight_decay=weight_decay, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, weight_decay=weight_decay, foreach=False)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = MIN_LR_RATIO) -> float:
    """lr multiplier for optimizer step ``step`` (0-based).

    Warm-up: (step + 1) / warmup for step < warmup (never 0, so step 0 learns). Then cosine from 1 down to
    ``min_ratio`` at ``total_steps - 1``, and ``min_ratio`` after that.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR(LRScheduler):
    """Closed-form schedule: the lr depends only on ``last_epoch`` (= optimizer steps taken), so restoring the
    state dict (which holds ``last_epoch``) restores the schedule bit for bit."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                 min_ratio: float = MIN_LR_RATIO, last_epoch: int = -1):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        factor = warmup_cosine_factor(self.last_epoch, self.warmup_steps, self.total_steps, self.min_ratio)
        return [base_lr * factor for base_lr in self.base_lrs]


@dataclass(frozen=True)
class OptimizerSettings:
    """What comes from the flags (``--lr``, ``--warmup_steps``, the steps planned, ``--weight_decay``) and what a
    checkpoint also holds: loading one puts its values back into the scheduler and the param groups."""

    warmup_steps: int
    total_steps: int
    base_lrs: Tuple[float, ...]
    weight_decays: Tuple[float, ...]

    def differences(self, other: "OptimizerSettings") -> List[str]:
        """What changes from ``self`` to ``other``, in words (the first param group: the decayed one)."""
        pairs = (("total steps", self.total_steps, other.total_steps),
                 ("warm-up steps", self.warmup_steps, other.warmup_steps),
                 ("lr", self.base_lrs[0], other.base_lrs[0]),
                 ("weight decay", self.weight_decays[0], other.weight_decays[0]))
        return [f"{name} {old:g} -> {new:g}" for name, old, new in pairs if old != new]


def settings_of(scheduler: WarmupCosineLR) -> OptimizerSettings:
    return OptimizerSettings(scheduler.warmup_steps, scheduler.total_steps, tuple(scheduler.base_lrs),
                             tuple(group["weight_decay"] for group in scheduler.optimizer.param_groups))


def follow_settings(scheduler: WarmupCosineLR, wanted: OptimizerSettings) -> Tuple[List[str], float, float]:
    """After a checkpoint's optimizer and scheduler states were loaded into ``scheduler`` (and its optimizer): make
    ``wanted`` (this run's flags) hold from the next step on; the steps taken and Adam's moments stay the
    checkpoint's. Returns (the changes in words, empty when none; the next step's lr under the checkpoint's
    settings; under ``wanted``)."""
    saved = settings_of(scheduler)
    saved_next = scheduler.get_last_lr()[0]
    changes = saved.differences(wanted)
    if saved != wanted:
        scheduler.warmup_steps, scheduler.total_steps = wanted.warmup_steps, wanted.total_steps
        scheduler.base_lrs = list(wanted.base_lrs)
        lrs = scheduler.get_lr()  # the closed form at the steps taken (last_epoch)
        for group, lr, decay in zip(scheduler.optimizer.param_groups, lrs, wanted.weight_decays):
            group["lr"], group["weight_decay"] = lr, decay
        scheduler._last_lr = lrs
    return changes, saved_next, scheduler.get_last_lr()[0]
