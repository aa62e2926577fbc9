"""Bits per character of held-out text: a tokenizer-independent measure of how well a model predicts it.

bpc = (sum over the text's tokens of -log2 p(token | preceding tokens)) / (number of characters of the text)

Each text is scored on its own, conditioned on a start token (BOS, else EOS) so that its first token is
predicted too. Texts longer than the window are scored with a sliding window: every token is predicted
exactly once, with at least ``window - stride`` tokens of context after the first window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from tqdm.auto import tqdm

from colossal_llama.eval.batching import right_pad, target_logprobs
from colossal_llama.utils.errors import DataError, UserInputError
from colossal_llama.utils.jsonl import iter_jsonl
from colossal_llama.utils.ranks import Ranks

IGNORE = -100


@dataclass
class BpcConfig:
    text_field: str = "target"
    max_samples: Optional[int] = None  # first N non-empty texts
    window: int = 1024  # tokens per forward (capped at the model's positions)
    stride: int = 512  # new tokens scored per window after the first
    batch_size: int = 8


@dataclass
class BpcResult:
    bits: float = 0.0
    characters: int = 0
    tokens: int = 0
    texts: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count

    @property
    def bpc(self) -> float:
        return self.bits / self.characters if self.characters else float("nan")

    def to_dict(self) -> dict:
        return {"bits_per_char": self.bpc, "bits": self.bits, "characters": self.characters, "tokens": self.tokens,
                "texts": self.texts, "chars_per_token": self.characters / max(self.tokens, 1),
                "skipped": self.skipped}


def load_texts(path, text_field: str, max_samples: Optional[int] = None) -> Tuple[List[str], dict]:
    """Texts from ``text_field`` of a jsonl. Blank texts are skipped and counted; a non-string is a DataError."""
    texts, skipped = [], {}
    for line, row in iter_jsonl(Path(path)):
        if max_samples is not None and len(texts) >= max_samples:
            break
        if not isinstance(row, dict):
            raise DataError(path, line, None, f"expected a JSON object, got {type(row).__name__}")
        if text_field not in row:
            raise DataError(path, line, text_field, "missing (choose the field with --text_field)")
        value = row[text_field]
        if not isinstance(value, str):
            raise DataError(path, line, text_field, f"expected a string, got {type(value).__name__}")
        if not value.strip():
            skipped["empty_text"] = skipped.get("empty_text", 0) + 1
            continue
        texts.append(value)
    if not texts:
        raise UserInputError(f"{path}: no non-empty '{text_field}' texts")
    return texts, skipped


def sliding_windows(token_ids: Sequence[int], start_id: int, window: int, stride: int) -> List[Tuple[list, list]]:
    """Split ``[start_id] + token_ids`` into ``(input_ids, labels)`` windows of at most ``window`` tokens.

    Labels are aligned with inputs (HF convention, the loss shifts them) and are -100 on context-only positions,
    so each of ``token_ids`` is a label exactly once across all windows.
    """
    if not 0 < stride <= window - 1:
        raise UserInputError(f"--stride must be in [1, window-1={window - 1}], got {stride}")
    ids = [start_id, *token_ids]
    pieces, scored_until = [], 1  # position 0 (the start token) is never a label
    while scored_until < len(ids):
        end = min(len(ids), scored_until + (window - 1 if scored_until == 1 else stride))
        begin = max(0, end - window)
        inputs = ids[begin:end]
        labels = [IGNORE if begin + i < scored_until else tok for i, tok in enumerate(inputs)]
        pieces.append((inputs, labels))
        scored_until = end
    return pieces


def window_nll_bits(model, batch: Sequence[Tuple[list, list]], pad_id: int) -> float:
    """Sum over the batch of -log2 p(label) (right-padded; padded and -100 positions contribute nothing)."""
    input_ids = right_pad([inp for inp, _ in batch], pad_id)  # no attention mask: see eval/batching.py
    labels = right_pad([lab for _, lab in batch], IGNORE)
    rows, positions = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)  # position p predicts the token at p + 1
    logprobs = target_logprobs(model, input_ids, rows, positions, labels[rows, positions + 1])
    return -logprobs.double().sum().item() / math.log(2)


def bits_per_char(model, tokenizer, texts: Sequence[str], config: BpcConfig,
                  ranks: Ranks = Ranks()) -> BpcResult:
    """Score ``texts`` (see the module docstring). Windows of similar length are batched together; with several
    processes (``ranks``) each scores its share of the batches and every process returns the whole result."""
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start_id is None:
        raise UserInputError("the tokenizer has neither a BOS nor an EOS token to start texts with")
    window = min(config.window, int(getattr(model.config, "max_position_embeddings", config.window)))
    stride = min(config.stride, window - 1)
    result = BpcResult(texts=len(texts))
    pieces = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        result.characters += len(text)
        result.tokens += len(ids)
        pieces.extend(sliding_windows(ids, start_id, window, stride))
    pieces.sort(key=lambda p: -len(p[0]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start_id
    batches = ranks.share_batches(pieces, config.batch_size)
    scored = [sum(sum(lab != IGNORE for lab in labels) for _, labels in batch) for batch in batches]
    bits = 0.0
    with tqdm(total=sum(scored), desc="bits per char", unit="tok", disable=not ranks.is_main) as bar:
        for batch, tokens in zip(batches, scored):
            bits += window_nll_bits(model, batch, pad_id)
            bar.update(tokens)
    (result.bits,) = ranks.sum([bits])
    return result
