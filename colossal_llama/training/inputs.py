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
