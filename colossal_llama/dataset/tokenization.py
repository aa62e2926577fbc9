"""Batched tokenisation functions for ``datasets.Dataset.map`` over Arrow batches (run in ``num_proc`` workers).

Input: a ``pyarrow.Table`` batch of raw rows (``file``, ``line``, ``category`` codes and the text columns).
Output: a ``pyarrow.Table`` with one row per input document: ``input_ids`` as int32 lists, built with numpy (no
Python list per token survives the batch); for SFT the unshifted ``labels`` (-100 = no loss), for pre-training
``trained_from`` instead (the labels are the ids with the first ``trained_from`` tokens masked); the per-document
numbers the plan and the token accounting need (``length``, ``full_length``, ``exchanges``...), and ``pid``, the
process that tokenised the row (proof that ``num_proc`` workers ran).
"""
from __future__ import annotations

import itertools
import logging
import os
from typing import Iterable

import numpy as np
import pyarrow as pa
from datasets import Features, List, Value

from colossal_llama.dataset.chat_templates import ChatTemplate, MessageError
from colossal_llama.tokenizer.loading import text_backend
from colossal_llama.utils.errors import DataError, UserInputError

logger = logging.getLogger(__name__)
TEMPLATE_REFUSED = -1     # ``exchanges`` of a conversation the chat template refused (--skip_invalid)
REFUSALS_LOGGED = 10      # per tokenising process
_refusals_logged = 0

_LOCATION = {"file": Value("int32"), "line": Value("int64"), "category": Value("int32")}
MESSAGE_FEATURE = {"from": Value("string"), "content": Value("string")}
RAW_FEATURES = {
    "pretrain": Features({**_LOCATION, "source": Value("string"), "target": Value("string")}),
    "sft": Features({**_LOCATION, "messages": List(MESSAGE_FEATURE)}),
}
TOKENIZED_FEATURES = Features({
    **_LOCATION,
    "input_ids": List(Value("int32")),
    "labels": List(Value("int32")),    # SFT only (pre-training: empty lists, the labels follow from trained_from)
    "length": Value("int32"),          # tokens kept (SFT: 0 = conversation dropped, even one exchange is too long)
    "full_length": Value("int32"),     # tokens before any truncation, for the token accounting
    "trained_from": Value("int32"),    # pre-training: first trained token (after BOS + source); SFT: -1
    "exchanges": Value("int32"),       # SFT: exchanges in the conversation (TEMPLATE_REFUSED: skipped; pre-training: 0)
    "exchanges_kept": Value("int32"),  # SFT: exchanges kept after whole-turn truncation
    "pid": Value("int32"),
})


def _encode_batch(tokenizer, texts: list[str]) -> list:
    """``tokenizers.Encoding`` of each text, no special tokens added nor read in it (:func:`text_backend`: a
    ``</s>`` in a document is text, not EOS), straight from the Rust backend (which skips offsets and attention
    masks with ``encode_batch_fast``, tokenizers >= 0.21: about 2x faster)."""
    backend = text_backend(tokenizer)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return encode(texts, add_special_tokens=False)


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of each text without special tokens: the same as ``tokenizer(texts, add_special_tokens=False,
    split_special_tokens=True)``."""
    return [e.ids for e in _encode_batch(tokenizer, texts)]


def _table(batch: pa.Table, docs: Iterable[list[int]], lengths: np.ndarray, trained_from: np.ndarray | None,
           labels: list[list[int]] | None, full_length, exchanges, exchanges_kept) -> pa.Table:
    """The output batch. ``docs`` yields the token lists, ``lengths[i]`` tokens of document i in all. Labels come
    either as per-document lists (SFT, stored) or, for pre-training, as ``trained_from``: the position in each
    document where the trained tokens start (everything before is -100; the labels are made when gathered)."""
    n = len(lengths)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    ids = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int32, count=total)
    list_offsets = pa.array(offsets.astype(np.int32))
    if labels is None:
        stored_labels = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], pa.int32()))
    else:
        flat_labels = np.fromiter(itertools.chain.from_iterable(labels), dtype=np.int32, count=total)
        stored_labels = pa.ListArray.from_arrays(list_offsets, pa.array(flat_labels))

    def ints(values) -> pa.Array:
        return pa.array(np.asarray(values, dtype=np.int32))

    return pa.table({
        "file": batch.column("file"), "line": batch.column("line"), "category": batch.column("category"),
        "input_ids": pa.ListArray.from_arrays(list_offsets, pa.array(ids)),
        "labels": stored_labels,
        "length": ints(lengths), "full_length": ints(full_length),
        "trained_from": ints(trained_from if labels is None else np.full(n, -1)),  # -1: labels stored
        "exchanges": ints(exchanges), "exchanges_kept": ints(exchanges_kept), "pid": ints(np.full(n, os.getpid())),
    })


def tokenize_pretrain_batch(batch: pa.Table, tokenizer) -> pa.Table:
    """``BOS + source + target + EOS``; labels mask ``BOS + source``.

    Source and target are encoded without special tokens and BOS/EOS ids are added explicitly, so the
    result does not depend on the tokenizer's ``add_bos_token``/``add_eos_token`` settings. A tokenizer
    without a BOS (or EOS) simply gets none.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    targets = batch.column("target").to_pylist()
    sources = batch.column("source").to_pylist()
    n = len(targets)
    # one call into the Rust pool for both fields (fewer, larger batches); most corpora have no source at all
    with_source = any(sources)
    encodings = _encode_batch(tokenizer, targets + sources if with_source else targets)
    target_len = np.fromiter(map(len, encodings[:n]), dtype=np.int64, count=n)
    source_len = np.fromiter(map(len, encodings[n:]), dtype=np.int64, count=n) if with_source else np.zeros(n, np.int64)
    trained_from = len(bos) + source_len
    lengths = trained_from + target_len + len(eos)
    # each list of ids is made and consumed at once (a batch's worth of Python ints never exists at one time)
    source_ids = (e.ids for e in encodings[n:]) if with_source else itertools.repeat([])
    docs = itertools.chain.from_iterable(zip(itertools.repeat(bos), source_ids, (e.ids for e in encodings[:n]),
                                             itertools.repeat(eos)))
    zeros = np.zeros(n, dtype=np.int32)
    return _table(batch, docs, lengths, trained_from, None, lengths, zeros, zeros)


def _log_refused(located: DataError) -> None:
    global _refusals_logged
    _refusals_logged += 1
    if _refusals_logged <= REFUSALS_LOGGED:
        logger.warning("skipped (--skip_invalid): %s", located)


def truncate_to_exchanges(template: ChatTemplate, messages: list, max_length: int) -> tuple[list, list, int]:
    """Encode the longest prefix of whole human+assistant exchanges that fits in ``max_length`` tokens.

    Returns ``(input_ids, labels, exchanges_kept)``; ``exchanges_kept == 0`` (empty ids) means even the
    first exchange does not fit and the conversation must be dropped.
    """
    ends = template.exchange_ends(messages)
    kept = sum(1 for end in ends if end <= max_length)
    while kept > 0:
        ids, labels = template.encode_conversation(template.first_exchanges(messages, kept))
        if len(ids) <= max_length:  # exact check: a re-render may tokenise the cut differently
            return ids, labels, kept
        kept -= 1
    return [], [], 0


def tokenize_sft_batch(batch: pa.Table, template: ChatTemplate, max_length: int, files: list[str],
                       strict: bool = True) -> pa.Table:
    """Template every conversation; keep whole exchanges that fit in ``max_length``.

    A conversation the template refuses (a tokenizer's Jinja template that raises on its content, or renders it
    in a way the labels cannot be found in) is a :class:`DataError` naming ``files[file]:line``; not ``strict``
    (``--skip_invalid``) it becomes an empty row with ``exchanges == TEMPLATE_REFUSED``, counted when the books
    are balanced, and the first few are logged."""
    docs, labels, full, exchanges, kept = [], [], [], [], []
    lines, file_codes = batch.column("line").to_pylist(), batch.column("file").to_pylist()
    for messages, line, file in zip(batch.column("messages").to_pylist(), lines, file_codes):
        try:
            full_ids, full_labels = template.encode_conversation(messages)
            total = template.num_exchanges(messages)
            if len(full_ids) <= max_length:
                ids, labs, keep = full_ids, full_labels, total
            else:
                ids, labs, keep = truncate_to_exchanges(template, messages, max_length)
        except UserInputError as err:  # a message's own field where the refusal names one, else the whole
            field, problem = (err.field, err.problem) if isinstance(err, MessageError) else ("messages", str(err))
            located = DataError(files[file], line, field, problem)
            if strict:
                raise located from None
            _log_refused(located)
            ids, labs, full_ids, total, keep = [], [], [], TEMPLATE_REFUSED, 0
        docs.append(ids)
        labels.append(labs)
        full.append(len(full_ids))
        exchanges.append(total)
        kept.append(keep)
    return _table(batch, docs, np.fromiter(map(len, docs), dtype=np.int64, count=len(docs)), None, labels, full,
                  exchanges, kept)
