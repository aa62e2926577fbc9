"""Bits per character of held-out text: a tokenizer-independent measure of how well a model predicts it.

bpc = (sum over the text's tokens of -log2 p(token | preceding tokens)) / (number of characters of the text)

Each text is scored on its own, conditioned on a start token (BOS, else EOS) so that its first token is
predicted too. Texts longer than the window are scored with a sliding window: every token is predicted
exactly once, with at least ``window - stride`` tokens of context after the first window.

Memory is bounded by design, not by the held-out set: texts stream from the file and are scored a chunk at a
time (``chunk_tokens`` tokens, int32, with the windows as offsets into them), so a held-out split of billions of
tokens takes the memory of one chunk. Chunk boundaries depend only on the texts, never on the number of
processes: every process reads every text, the tokenising is shared (groups of texts dealt out in turn, their
token ids exchanged, so each process encodes 1/N of the texts and holds each chunk whole), and a chunk's windows
are batched (longest first) and dealt out exactly as one process batches them.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from colossal_llama.eval.batching import right_pad, target_logprobs
from colossal_llama.model.scored_loss import scored_positions
from colossal_llama.utils.cli import flag
from colossal_llama.utils.errors import DataError, UserInputError
from colossal_llama.utils.jsonl import iter_jsonl
from colossal_llama.utils.labels import IGNORE_INDEX
from colossal_llama.utils.ranks import Ranks

ENCODE_GROUP = 256  # texts per tokenizer call (the fast tokenizer encodes a list on all its threads)


@dataclass
class BpcConfig:
    """``evaluate.py bpc``'s scoring flags (this class *is* that part of its command line)."""

    text_field: str = flag("target", help="the field holding the text")
    max_samples: Optional[int] = flag(None, help="first N non-empty texts of each file")
    window: int = flag(1024, help="tokens per forward pass (capped at the model's positions)")
    stride: int = flag(512, help="new tokens scored per window after the first")
    batch_size: int = flag(8, help="windows scored at once")
    chunk_tokens: int = flag(1 << 24, help="tokens read and tokenised at a time, held as int32 (64 MiB by default): "
                                           "memory does not grow with the files")
    group_by: Optional[str] = flag(None, help="also report each value of this field (e.g. category) on its own")


@dataclass
class BpcResult:
    bits: float = 0.0
    characters: int = 0
    tokens: int = 0
    texts: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count
    batches_per_process: List[int] = field(default_factory=list)  # in rank order (one process: [all of them])

    @property
    def bpc(self) -> float:
        return self.bits / self.characters if self.characters else float("nan")

    @classmethod
    def total(cls, results: Iterable["BpcResult"]) -> "BpcResult":
        """The results of several groups of texts as one (skipped counts added up)."""
        out = cls()
        for r in results:
            out.bits, out.characters, out.tokens, out.texts = (out.bits + r.bits, out.characters + r.characters,
                                                               out.tokens + r.tokens, out.texts + r.texts)
            for reason, count in r.skipped.items():
                out.skipped[reason] = out.skipped.get(reason, 0) + count
            if r.batches_per_process:
                out.batches_per_process = [a + b for a, b in itertools.zip_longest(
                    out.batches_per_process, r.batches_per_process, fillvalue=0)]
        return out

    def to_dict(self) -> dict:
        return {"bits_per_char": self.bpc, "bits": self.bits, "characters": self.characters, "tokens": self.tokens,
                "texts": self.texts, "chars_per_token": self.characters / max(self.tokens, 1),
                "skipped": self.skipped, "batches_per_process": self.batches_per_process}


# ---------------------------------------------------------------------------------------------- reading
MAX_GROUPS = 1000  # --group_by is for categories, not for an id per row


def _rows(path, text_field: str, max_samples: Optional[int], skipped: Optional[dict],
          group_field: Optional[str]) -> Iterator[Tuple[Optional[str], str]]:
    """``(group, text)`` of the first ``max_samples`` non-empty texts of a jsonl, streaming (group None without
    ``group_field``). Blank texts are skipped and counted in ``skipped``; a missing field or a non-string is a
    DataError naming file and line."""
    kept = 0
    for line, row in iter_jsonl(Path(path)):
        if max_samples is not None and kept >= max_samples:
            return
        if not isinstance(row, dict):
            raise DataError(path, line, None, f"expected a JSON object, got {type(row).__name__}")
        for name, option in ((text_field, "--text_field"), (group_field, "--group_by")):
            if name is None:
                continue
            if name not in row:
                raise DataError(path, line, name, f"missing (choose the field with {option})")
            if not isinstance(row[name], str):
                raise DataError(path, line, name, f"expected a string, got {type(row[name]).__name__}")
        if not row[text_field].strip():
            if skipped is not None:
                skipped["empty_text"] = skipped.get("empty_text", 0) + 1
            continue
        kept += 1
        yield (row[group_field] if group_field else None), row[text_field]


def iter_texts(path, text_field: str, max_samples: Optional[int] = None, skipped: Optional[dict] = None,
               group_field: Optional[str] = None, group: Optional[str] = None) -> Iterator[str]:
    """The non-empty texts of ``text_field`` of a jsonl, streaming: the first ``max_samples`` of the file, and of
    those, with ``group_field``, the ones whose field is ``group``."""
    for value, text in _rows(path, text_field, max_samples, skipped, group_field):
        if value == group:
            yield text


@dataclass
class TextScan:
    """One pass over a held-out file, keeping no text: its groups (``--group_by`` values in the order they first
    appear; one group None without it), each group's texts and characters, and the skipped counts."""

    groups: Dict[Optional[str], List[int]]  # group -> [texts, characters]
    skipped: dict

    @property
    def characters(self) -> int:
        return sum(c for _, c in self.groups.values())


def scan_texts(path, text_field: str, max_samples: Optional[int] = None,
               group_field: Optional[str] = None) -> TextScan:
    """Check every row :func:`iter_texts` would read (before a model loads); a file without a text is an error."""
    scan = TextScan({}, {})
    for value, text in _rows(path, text_field, max_samples, scan.skipped, group_field):
        counts = scan.groups.setdefault(value, [0, 0])
        counts[0], counts[1] = counts[0] + 1, counts[1] + len(text)
        if len(scan.groups) > MAX_GROUPS:
            raise UserInputError(f"{path}: --group_by {group_field}: more than {MAX_GROUPS} values (it is meant for "
                                 "a field such as category)")
    if not scan.groups:
        raise UserInputError(f"{path}: no non-empty '{text_field}' texts")
    return scan


def load_texts(path, text_field: str, max_samples: Optional[int] = None) -> Tuple[List[str], dict]:
    """All texts of a (small) file in memory, with the skipped counts: for tests and benchmarks."""
    skipped: dict = {}
    texts = list(iter_texts(path, text_field, max_samples, skipped))
    if not texts:
        raise UserInputError(f"{path}: no non-empty '{text_field}' texts")
    return texts, skipped


# ---------------------------------------------------------------------------------------------- windows
def window_spans(length: int, window: int, stride: int) -> List[Tuple[int, int, int]]:
    """``(begin, end, scored_from)`` of the windows over a sequence of ``length`` tokens whose position 0 is the
    start token: window = positions ``[begin, end)``, labels at ``[scored_from, end)``. Every position but 0 is
    scored exactly once; windows after the first score at most ``stride`` new tokens."""
    if not 0 < stride <= window - 1:
        raise UserInputError(f"--stride must be in [1, window-1={window - 1}], got {stride}")
    spans, scored_until = [], 1  # position 0 (the start token) is never a label
    while scored_until < length:
        end = min(length, scored_until + (window - 1 if scored_until == 1 else stride))
        spans.append((max(0, end - window), end, scored_until))
        scored_until = end
    return spans


def window_of(ids: Sequence[int], begin: int, end: int, scored_from: int) -> Tuple[list, list]:
    """``(input_ids, labels)`` of one span: labels aligned with inputs (HF convention, the loss shifts them),
    -100 on context-only positions."""
    inputs = [int(t) for t in ids[begin:end]]
    return inputs, [IGNORE_INDEX] * (scored_from - begin) + inputs[scored_from - begin:]


def sliding_windows(token_ids: Sequence[int], start_id: int, window: int, stride: int) -> List[Tuple[list, list]]:
    """Split ``[start_id] + token_ids`` into ``(input_ids, labels)`` windows of at most ``window`` tokens, each of
    ``token_ids`` a label exactly once (see :func:`window_spans`)."""
    ids = [start_id, *token_ids]
    return [window_of(ids, *span) for span in window_spans(len(ids), window, stride)]


def window_nll_bits(model, batch: Sequence[Tuple[list, list]], pad_id: int) -> float:
    """Sum over the batch of -log2 p(label) (right-padded; padded and -100 positions contribute nothing)."""
    input_ids = right_pad([inp for inp, _ in batch], pad_id)  # no attention mask: see eval/batching.py
    labels = right_pad([lab for _, lab in batch], IGNORE_INDEX)
    rows, positions, targets = scored_positions(labels)  # position p predicts the token at p + 1
    logprobs = target_logprobs(model, input_ids, rows, positions, targets)
    return -logprobs.double().sum().item() / math.log(2)


# ---------------------------------------------------------------------------------------------- chunks
@dataclass
class Chunk:
    """Consecutive texts, tokenised: ``ids[i]`` = start token + text i's tokens (int32), ``characters[i]`` its
    length in characters."""

    ids: List[np.ndarray] = field(default_factory=list)
    characters: List[int] = field(default_factory=list)
    tokens: int = 0  # sum of len(ids[i]) - 1


def _groups(texts: Iterable[str], size: int) -> Iterator[List[str]]:
    """``texts`` in consecutive lists of ``size`` (the last one shorter)."""
    group: List[str] = []
    for text in texts:
        group.append(text)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _encode(group: Sequence[str], tokenizer, start_id: int) -> List[np.ndarray]:
    """Start token + tokens of each text, int32 (one tokenizer call: a fast tokenizer uses all its threads). A
    special token spelled in a text is text (``</s>`` is not EOS), as in prepared data."""
    if not group:
        return []
    return [np.asarray([start_id, *ids], dtype=np.int32)
            for ids in tokenizer(list(group), add_special_tokens=False, split_special_tokens=True)["input_ids"]]


def encoded_groups(texts: Iterable[str], tokenizer, start_id: int,
                   ranks: Ranks = Ranks()) -> Iterator[Tuple[List[np.ndarray], List[int]]]:
    """``(ids, characters)`` of consecutive groups of ``ENCODE_GROUP`` texts, in order, on every process.

    The groups go in rounds of one per process: process r encodes group r of a round, then the round's ids are
    exchanged, so N processes each tokenise 1/N of the texts (each still reads them all: their characters, and
    the same rounds everywhere)."""
    round_: List[List[str]] = []
    for group in _groups(texts, ENCODE_GROUP):
        round_.append(group)
        if len(round_) == ranks.size:
            yield from _exchange_round(round_, tokenizer, start_id, ranks)
            round_ = []
    if round_:
        yield from _exchange_round(round_, tokenizer, start_id, ranks)


def _exchange_round(round_: List[List[str]], tokenizer, start_id: int,
                    ranks: Ranks) -> Iterator[Tuple[List[np.ndarray], List[int]]]:
    mine = _encode(round_[ranks.rank] if ranks.rank < len(round_) else [], tokenizer, start_id)
    # each process's texts as one int32 array, [lengths of its texts..., their ids...] (its texts are counted
    # in round_), exchanged as raw tensors
    packed = np.concatenate([np.asarray([len(a) for a in mine], dtype=np.int32), *mine])
    for group, part in zip(round_, ranks.exchange_int32(packed)):
        lengths, ids = part[:len(group)], part[len(group):]
        yield np.split(ids, np.cumsum(lengths)[:-1]), [len(text) for text in group]


def iter_chunks(texts: Iterable[str], tokenizer, start_id: int, chunk_tokens: int,
                ranks: Ranks = Ranks()) -> Iterator[Chunk]:
    """``texts`` tokenised (:func:`encoded_groups`) and cut into chunks: a chunk closes after the group that takes
    it to ``chunk_tokens`` tokens, so the chunks are the same for any number of processes. A chunk holds at most
    ``chunk_tokens`` plus one group's tokens; with N processes up to N - 1 more groups wait for the next one."""
    chunk = Chunk()
    for ids, characters in encoded_groups(texts, tokenizer, start_id, ranks):
        chunk.ids.extend(ids)
        chunk.characters.extend(characters)
        chunk.tokens += sum(len(a) - 1 for a in ids)
        if chunk.tokens >= chunk_tokens:
            yield chunk
            chunk = Chunk()
    if chunk.ids:
        yield chunk


def chunk_windows(chunk: Chunk, window: int, stride: int) -> List[Tuple[int, int, int, int]]:
    """``(text, begin, end, scored_from)`` of every window of the chunk, longest first (a stable sort: ties keep
    text order), the order they are batched in."""
    spans = [(i, *span) for i, ids in enumerate(chunk.ids) for span in window_spans(len(ids), window, stride)]
    spans.sort(key=lambda s: s[1] - s[2])
    return spans


def _score_chunk(model, chunk: Chunk, window: int, stride: int, pad_id: int, config: BpcConfig, ranks: Ranks,
                 bar) -> Tuple[float, int]:
    """This process's share of the chunk's bits, and its number of batches: the windows cut into batches, dealt out
    (batch k to rank k mod N).

    The batches go in rounds of one per process; after its batch of a round, rank 0's bar counts the whole round
    (the processes keep pace), in characters: each scored token carries its text's characters / tokens."""
    bits, batches = 0.0, 0
    for round_, mine in ranks.rounds(chunk_windows(chunk, window, stride), config.batch_size):
        for batch in mine:
            bits += window_nll_bits(model, [window_of(chunk.ids[i], b, e, s) for i, b, e, s in batch], pad_id)
        batches += len(mine)
        bar.update(sum(chunk.characters[i] * (e - s) / (len(chunk.ids[i]) - 1) for i, b, e, s in round_))
    return bits, batches


def bits_per_char(model, tokenizer, texts: Iterable[str], config: BpcConfig, ranks: Ranks = Ranks(),
                  total_characters: Optional[int] = None, desc: str = "bits per char") -> BpcResult:
    """Score ``texts`` (see the module docstring), a chunk at a time. With several processes (``ranks``) each
    scores its share of every chunk's batches and every process returns the whole result.

    ``total_characters`` sizes the progress bar (:func:`scan_texts` gives it; a list's is counted here)."""
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start_id is None:
        raise UserInputError("the tokenizer has neither a BOS nor an EOS token to start texts with")
    window = min(config.window, int(getattr(model.config, "max_position_embeddings", config.window)))
    stride = min(config.stride, window - 1)
    window_spans(2, window, stride)  # a bad --stride is an error before any text is read
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start_id
    if total_characters is None and isinstance(texts, Sequence):
        total_characters = sum(len(t) for t in texts)
    result, bits, batches = BpcResult(), 0.0, 0
    with tqdm(total=total_characters, desc=desc, unit="char", unit_scale=True,
              disable=not ranks.is_main) as bar:
        for chunk in iter_chunks(texts, tokenizer, start_id, config.chunk_tokens, ranks):
            result.texts += len(chunk.ids)
            result.characters += sum(chunk.characters)
            result.tokens += chunk.tokens
            chunk_bits, chunk_batches = _score_chunk(model, chunk, window, stride, pad_id, config, ranks, bar)
            bits, batches = bits + chunk_bits, batches + chunk_batches
    (result.bits,) = ranks.sum([bits])
    result.batches_per_process = ranks.per_process(batches)
    return result
