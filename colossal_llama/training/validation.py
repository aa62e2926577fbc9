"""Validation while training: loss and bits per character per category on held-out prepared data.

The held-out rows (``--eval_dataset``, by default the ``eval/`` split of each ``--dataset``) are grouped by
category (a prepared row holds one category: packing and bins are per category) into batches of
``--batch_size`` rows; categories take turns, so ``--eval_batches`` of at least the number of categories covers
all of them (fewer leave the last ones in name order out of the table, and the log says which and how many batches
would cover them). Batch i is evaluated by data-parallel rank ``i % dp``; sums are all-reduced, so every plugin
(pipeline included) gives one table.

bits/char = (sum of the token losses in nats / ln 2) / characters of the trained text (the decoded loss-bearing
tokens, special tokens excluded): comparable across tokenizers, so a vocabulary expansion does not flatter it.

Validation draws no random numbers and runs in eval mode (no NEFTune noise, no dropout): the training losses of
a run are the same, bit for bit, with and without it.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from colossal_llama.utils.groups import grouped_rows
from colossal_llama.utils.labels import IGNORE_INDEX

ALL = "all"


@dataclass
class CategoryScore:
    loss_sum: float  # nats, over the trained tokens
    tokens: int  # trained (loss-bearing) tokens
    characters: int  # characters of their decoded text

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else float("nan")

    @property
    def bits_per_char(self) -> float:
        return self.loss_sum / math.log(2) / self.characters if self.characters else float("nan")

    def to_json(self) -> dict:
        """JSON values: a score of nothing (no trained token, no character) is null, never NaN (not JSON)."""
        return {"loss": self.loss if self.tokens else None, "bpc": self.bits_per_char if self.characters else None,
                "tokens": self.tokens, "characters": self.characters}


def trained_characters(labels: np.ndarray, tokenizer) -> int:
    """Characters of the text a row is trained on (its loss-bearing tokens, decoded without special tokens)."""
    ids = np.asarray(labels)
    ids = ids[ids != IGNORE_INDEX]
    return len(tokenizer.decode(ids.tolist(), skip_special_tokens=True))


def batch_plan(categories: Sequence[str], batch_size: int, max_batches: int,
               multiple: int = 1) -> List[tuple[str, np.ndarray]]:
    """``(category, row indices)`` batches: each category's rows in order, cut into ``batch_size``; categories
    take turns (batch 0 of each, then batch 1 of each, ...); at most ``max_batches``. A last batch is
    cut to a multiple of ``multiple`` rows (with ``multiple = batch_size``: full batches only)."""
    distinct, members = grouped_rows(np.asarray(categories))  # one sort, not a pass per category
    rows = dict(zip(distinct.tolist(), members))
    names = list(rows)
    per_category = {}
    for name in names:
        batches = [rows[name][i:i + batch_size] for i in range(0, len(rows[name]), batch_size)]
        batches = [b[:len(b) - len(b) % multiple] for b in batches]
        per_category[name] = [b for b in batches if len(b)]
    plan, turn = [], 0
    while any(turn < len(batches) for batches in per_category.values()):
        plan.extend((name, per_category[name][turn]) for name in names if turn < len(per_category[name]))
        turn += 1
    return plan[:max_batches]


class Validator:
    """Scores the model on fixed held-out batches; call :meth:`run` on every rank together."""

    def __init__(self, dataset, categories: Sequence[str], tokenizer, collator, stepper, batch_size: int,
                 max_batches: int):
        self.dataset, self.collator, self.stepper = dataset, collator, stepper
        # colossalai's pipeline schedule wants every batch of a run to have the training batch's size
        full_only = batch_size if stepper.parallel.pipeline_microbatch_size else 1
        every = batch_plan(categories, batch_size, sys.maxsize, multiple=full_only)
        self.plan = every[:max_batches]
        # scored: the categories with a batch in the plan (a table row of nothing was loss nan, and NaN in JSON)
        self.categories = sorted({category for category, _ in self.plan})
        self.left_out = sorted(set(categories) - set(self.categories))
        # each category with a batch has one in the plan's first turn: that many batches score every one
        self.batched = sorted({category for category, _ in every})
        # Characters of the rows this rank scores only: decoding is the costly part of setting up (every row's
        # labels, tokenizer.decode), and on dp ranks each scores 1/dp of the batches; a rank whose sums are not
        # counted (pipeline stages but the last, tp/sp peers) decodes nothing.
        counted = stepper.parallel.reports_loss
        self.characters = {int(r): trained_characters(dataset[int(r)]["labels"], tokenizer) if counted else 0
                           for category, rows in self.my_batches() if category is not None for r in rows}

    def left_out_note(self) -> Optional[str]:
        """Why held-out categories are not scored (None: every one is): too few ``--eval_batches`` for one batch
        each, or (a pipeline scores full batches only) fewer held-out rows than ``--batch_size``."""
        if not self.left_out:
            return None
        few = [name for name in self.left_out if name in self.batched]
        reasons = []
        if few:
            reasons.append(f"{', '.join(few)}: --eval_batches {len(self.plan)} gives categories a batch each in name "
                           f"order; {len(self.batched)} would score them")
        short = [name for name in self.left_out if name not in few]
        if short:
            reasons.append(f"{', '.join(short)}: fewer held-out rows than a full batch of --batch_size, which a "
                           "pipeline needs")
        return f"validation leaves {len(self.left_out)} held-out categories out of its table ({'; '.join(reasons)})"

    def my_batches(self) -> List[tuple[Optional[str], np.ndarray]]:
        """This dp rank's batches of the plan (batch i is rank ``i % dp``'s). Where forwards are collective
        (gemini all-gathers the parameters in each), a rank left with fewer batches than rank 0 makes up the
        difference with filler forwards (``category`` None, the plan's first batch, not scored): with 100
        batches on 64 ranks, ranks 36-63 ran one forward fewer and the others' all-gathers waited for them."""
        layout = self.stepper.parallel.layout
        mine = [batch for i, batch in enumerate(self.plan) if i % layout.dp_size == layout.dp_rank]
        if self.stepper.parallel.forwards_are_collective and self.plan:
            rounds = -(-len(self.plan) // layout.dp_size)
            mine += [(None, self.plan[0][1])] * (rounds - len(mine))
        return mine

    def run(self) -> Dict[str, CategoryScore]:
        """Scores per category and ``"all"``; the model is left in training mode."""
        index = {name: k for k, name in enumerate(self.categories)}
        sums = np.zeros((3, len(self.categories)), dtype=np.float64)  # loss, tokens, characters
        model = self.stepper.model
        model.eval()
        try:
            with torch.no_grad():
                for category, rows in self.my_batches():
                    batch = self.collator([self.dataset[int(r)] for r in rows])
                    loss_sum, tokens = self.stepper.eval_loss_sum(batch)
                    if category is None:  # a filler forward (see my_batches): not scored
                        continue
                    k = index[category]
                    sums[:, k] += (loss_sum, tokens, sum(self.characters[int(r)] for r in rows))
        finally:
            model.train()
        if not self.stepper.parallel.reports_loss:  # pipeline stages but the last, tp/sp peers: counted once
            sums[:] = 0
        total = torch.tensor(sums, dtype=torch.float64, device=self.stepper.device)
        dist.all_reduce(total)
        total = total.cpu().numpy()
        scores = {name: CategoryScore(float(total[0, k]), int(total[1, k]), int(total[2, k]))
                  for k, name in enumerate(self.categories)}
        scores[ALL] = CategoryScore(float(total[0].sum()), int(total[1].sum()), int(total[2].sum()))
        return scores
