"""What a run reads: the training data (with its replay mixture, if any) and the held-out data for validation."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional

from colossal_llama.training.benchmark_data import random_data
from colossal_llama.training.config import TrainConfig
from colossal_llama.training.data import PreparedData, expand_dataset_args, load_training_data
from colossal_llama.training.mixture import Mixture, parse_category_weights, split_dataset_weight
from colossal_llama.utils.errors import UserInputError

log = logging.getLogger(__name__)


@dataclass
class RunInputs:
    train: PreparedData
    mixture: Optional[Mixture]  # weighted draws, or None: every sequence once per epoch
    eval: Optional[PreparedData]  # held-out rows for validation, or None


def load_inputs(cfg: TrainConfig, tokenizer, vocab_rows: int) -> RunInputs:
    """Check every manifest against --pretrained (before any model is built), then load what the run reads."""
    if cfg.benchmark:
        return RunInputs(random_data(cfg.num_samples, cfg.max_length, vocab_rows, cfg.seed), None, None)
    train = load_training_data(cfg.dataset, tokenizer, vocab_rows, cfg.max_length, cfg.pretrained)
    eval_args = (cfg.eval_dataset or held_out_splits(cfg.dataset)) if cfg.eval_batches else []
    held_out = (load_training_data(eval_args, tokenizer, vocab_rows, cfg.max_length, cfg.pretrained,
                                   split="train" if cfg.eval_dataset else "eval") if eval_args else None)
    return RunInputs(train, _mixture(cfg, train), held_out)


def held_out_splits(dataset_args: List[str]) -> List[str]:
    """The ``--dataset`` entries (weights stripped) whose outputs hold a held-out split."""
    found = []
    for arg in dataset_args:
        path = split_dataset_weight(arg)[0]
        try:
            expand_dataset_args([path], split="eval")
        except UserInputError:
            continue
        found.append(path)
    return found


def _mixture(cfg: TrainConfig, train: PreparedData) -> Optional[Mixture]:
    weights = {i: w for i, (_, w) in enumerate(map(split_dataset_weight, cfg.dataset)) if w is not None}
    if weights and len(weights) < len(cfg.dataset):  # `new:0.7 old` gave old 1.0: new trained 41 %, not 70 %
        unweighted = [d for i, d in enumerate(cfg.dataset) if i not in weights]
        raise UserInputError(f"--dataset: {', '.join(unweighted)} has no weight while others have one; give every "
                             "entry DIR:WEIGHT (or none)")
    categories = parse_category_weights(cfg.category_weights)
    if not weights and not categories:
        return None
    mixture = Mixture.build(train.bucket_groups(), weights, categories)
    shares = {}
    for groups, size in zip(mixture.buckets, mixture.bucket_sizes):
        for group in groups:
            shares[group.key] = shares.get(group.key, 0.0) + group.share * size
    total = sum(mixture.bucket_sizes)
    log.info("replay mixture (share of every epoch's sequences): %s", ", ".join(
        f"{cfg.dataset[d]} / {c}: {n / total:.1%}" for (d, c), n in sorted(shares.items())))
    return mixture


def epoch_order_inputs(cfg: TrainConfig, inputs: RunInputs) -> dict:
    """What every epoch's order is a function of besides the epoch number (the sampler draws it from these alone):
    the seed, ``--shuffle_buckets``, the bucket sizes and the mixture's groups and shares. Checkpoints record it,
    so a resume can say when the order it goes on in is not the one its sample offset counts in. JSON types."""
    mixture = None if inputs.mixture is None else [[[g.key[0], g.key[1], len(g.rows), float(g.share)]
                                                    for g in groups] for groups in inputs.mixture.buckets]
    return {"seed": cfg.seed, "shuffle_buckets": cfg.shuffle_buckets,
            "bucket_sizes": [int(n) for n in inputs.train.bucket_sizes], "mixture": mixture}


def epoch_order_changes(saved: dict, now: dict) -> List[str]:
    """What differs between two :func:`epoch_order_inputs`, in words (empty: the same order)."""
    changes = [f"{key} {saved.get(key)} -> {now[key]}" for key in ("seed", "shuffle_buckets")
               if saved.get(key) != now[key]]
    before, after = saved.get("bucket_sizes") or [], now["bucket_sizes"]
    if before != after:
        changes.append(f"data {sum(before):,} sequences in {len(before)} buckets -> {sum(after):,} in {len(after)}"
                       + ("" if (sum(before), len(before)) != (sum(after), len(after)) else " (other bucket sizes)"))
    if saved.get("mixture") != now["mixture"]:
        changes.append("mixture groups or shares (--category_weights, --dataset weights)")
    return changes
