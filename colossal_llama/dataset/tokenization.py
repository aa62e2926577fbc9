"""Batched tokenisation functions for ``datasets.Dataset.map`` (run in ``num_proc`` worker processes).

Both kinds produce one row per input document with ``input_ids`` and unshifted ``labels`` (-100 = no loss)
and ``full_length`` (tokens before any truncation, for the token accounting).
"""
from __future__ import annotations

from datasets import Features, List, Value

from colossal_llama.dataset.chat_templates import IGNORE_INDEX, ChatTemplate

TOKENIZED_FEATURES = Features({
    "doc_id": Value("string"),
    "category": Value("string"),
    "input_ids": List(Value("int32")),
    "labels": List(Value("int32")),
    "full_length": Value("int64"),
    "exchanges": Value("int32"),          # SFT: exchanges in the conversation (pre-training: 0)
    "exchanges_kept": Value("int32"),     # SFT: exchanges kept after whole-turn truncation (0 = dropped)
})


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of each text without special tokens: the same as ``tokenizer(texts, add_special_tokens=False)``
    but straight from the Rust backend, skipping offsets/attention masks (about 2x faster)."""
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: tokenizers >= 0.21
    encodings = encode(texts, add_special_tokens=False)
    return [e.ids for e in encodings]


def tokenize_pretrain_batch(batch: dict, tokenizer) -> dict:
    """``BOS + source + target + EOS``; labels mask ``BOS + source``.

    Source and target are encoded without special tokens and BOS/EOS ids are added explicitly, so the
    result does not depend on the tokenizer's ``add_bos_token``/``add_eos_token`` settings. A tokenizer
    without a BOS (or EOS) simply gets none.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sources, targets = encode_texts(tokenizer, batch["source"]), encode_texts(tokenizer, batch["target"])
    input_ids, labels = [], []
    for src, tgt in zip(sources, targets):
        masked = bos + src
        trained = tgt + eos
        input_ids.append(masked + trained)
        labels.append([IGNORE_INDEX] * len(masked) + trained)
    n = len(input_ids)
    return {
        "doc_id": batch["doc_id"], "category": batch["category"], "input_ids": input_ids, "labels": labels,
        "full_length": [len(x) for x in input_ids], "exchanges": [0] * n, "exchanges_kept": [0] * n,
    }


def truncate_to_exchanges(template: ChatTemplate, messages: list, max_length: int) -> tuple[list, list, int]:
    """Encode the longest prefix of whole human+assistant exchanges that fits in ``max_length`` tokens.

    Returns ``(input_ids, labels, exchanges_kept)``; ``exchanges_kept == 0`` (empty ids) means even the
    first exchange does not fit and the conversation must be dropped.
    """
    ends = template.exchange_ends(messages)
    kept = sum(1 for end in ends if end <= max_length)
    while kept > 0:
        ids, labels = template.encode_conversation(messages[: 2 * kept])
        if len(ids) <= max_length:  # exact check: a re-render may tokenise the cut differently
            return ids, labels, kept
        kept -= 1
    return [], [], 0


def tokenize_sft_batch(batch: dict, template: ChatTemplate, max_length: int) -> dict:
    """Template every conversation; keep whole exchanges that fit in ``max_length``."""
    out = {k: [] for k in TOKENIZED_FEATURES}
    for doc_id, category, messages in zip(batch["doc_id"], batch["category"], batch["messages"]):
        full_ids, full_labels = template.encode_conversation(messages)
        if len(full_ids) <= max_length:
            ids, labels, kept = full_ids, full_labels, len(messages) // 2
        else:
            ids, labels, kept = truncate_to_exchanges(template, messages, max_length)
        out["doc_id"].append(doc_id)
        out["category"].append(category)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["full_length"].append(len(full_ids))
        out["exchanges"].append(len(messages) // 2)
        out["exchanges_kept"].append(kept)
    return out
