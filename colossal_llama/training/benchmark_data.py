"""``--benchmark``: random full-length sequences instead of a prepared dataset, to size a cluster job quickly."""
from __future__ import annotations

import numpy as np

from colossal_llama.training.data import PreparedData


class RandomSequences:
    """``num_samples`` rows of ``max_length`` random token ids (seeded); every token is trained on, one document
    per row. Rows are made on access: the dataset costs no memory however many samples are asked for."""

    def __init__(self, num_samples: int, max_length: int, vocab_size: int, seed: int):
        self.num_samples, self.max_length, self.vocab_size, self.seed = num_samples, max_length, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        ids = np.random.default_rng([self.seed, index]).integers(0, self.vocab_size, self.max_length, dtype=np.int64)
        return {"input_ids": ids, "labels": ids, "position_ids": np.arange(self.max_length, dtype=np.int64)}


def random_data(num_samples: int, max_length: int, vocab_size: int, seed: int) -> PreparedData:
    return PreparedData(RandomSequences(num_samples, max_length, vocab_size, seed), [num_samples], {}, None)
