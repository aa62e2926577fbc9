"""Token accounting of a preparation run: every document and token that came in is either written or counted
as skipped/truncated/dropped, and the books must balance (a lost token is a bug: it raises).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np

from colossal_llama.dataset.records import EXAMPLES_PER_REASON
from colossal_llama.dataset.tokenization import TEMPLATE_REFUSED

if TYPE_CHECKING:  # the manifest (and so every reader) needs PrepCounts, not the preparation machinery
    from colossal_llama.dataset.records import ReadLog
    from colossal_llama.dataset.token_cache import DocTable
    from colossal_llama.dataset.writing import WrittenPart


# Reasons for which a valid row is skipped after it was read (so it is in documents_in, not in documents_out).
_SKIPPED_AFTER_READING = ("first_exchange_exceeds_max_length", "chat_template_refused")


@dataclass
class PrepCounts:
    """The numbers of a run (``manifest.json["counts"]``). Pre-training leaves the SFT fields at 0."""

    files_ignored: int = 0             # files of the --data_input_dirs folders not read (not JSON lines by name;
                                       # hidden files aside), named in a warning when the run started
    lines_read: int = 0                # non-blank lines of this shard
    documents_in: int = 0              # valid rows (documents / conversations), before tokenisation
    documents_out: int = 0             # documents written (training + held out): lines_read == documents_out +
                                       # sum(skipped), as SFT's conversations dropped after tokenisation are skipped
    skipped: dict = field(default_factory=dict)          # reason -> rows
    skipped_examples: list = field(default_factory=list)  # "file:line: field: problem", <= 10 per reason
    tokens_in: int = 0                 # tokens of every valid document before any truncation
    tokens_out: int = 0                # tokens written (training parts + held-out split)
    tokens_trained: int = 0            # written tokens with a label (loss)
    fully_masked_samples: int = 0      # written pieces without any trained token
    sequences: int = 0                 # rows written (training parts + held-out split)
    fill_ratio: float = 0.0            # tokens_out / (sequences * max_length)
    split_documents: int = 0           # documents longer than max_length, continued in the next sequences
    truncated_conversations: int = 0   # SFT: conversations cut to the whole exchanges that fit
    truncated_exchanges: int = 0
    tokens_truncated: int = 0
    tokens_dropped: int = 0            # SFT: conversations whose first exchange alone is too long
    padding_tokens: int = 0            # sequences * max_length - tokens_out: padding if every row were max_length
    padding_tokens_unpacked: int = 0   # the same with one document per row (what packing saves)
    empty_bins: dict = field(default_factory=dict)   # category -> bins that got no sequence
    empty_parts: list = field(default_factory=list)  # bins empty in every category (not written)
    eval_documents: int = 0            # documents held out (--holdout_fraction)
    eval_sequences: int = 0
    eval_tokens: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "PrepCounts":
        known = {f.name for f in fields(cls)}
        counts = cls(**{k: v for k, v in data.items() if k in known})
        if "documents_out" not in data:  # a manifest from before the field: the valid rows less the late drops
            late = sum(counts.skipped.get(reason, 0) for reason in _SKIPPED_AFTER_READING)
            counts.documents_out = counts.documents_in - late
        return counts

    @property
    def padding_saved(self) -> float:
        """Fraction of the unpacked padding that packing removed."""
        return 1 - self.padding_tokens / self.padding_tokens_unpacked if self.padding_tokens_unpacked else 0.0


def count_tokens(read: ReadLog, docs: DocTable, parts: list[WrittenPart], eval_parts: list[WrittenPart],
                 eval_documents: int, *, kind: str, max_length: int, empty_bins: dict, empty_parts: list) -> PrepCounts:
    """Balance the books of a run from what was read, the document table and what was written.

    Raises ``RuntimeError`` if a token or a row is unaccounted for (never expected: it would be a bug).
    """
    everything = parts + eval_parts
    kept = docs.length > 0
    c = PrepCounts(
        files_ignored=read.files_ignored, lines_read=read.lines_read, documents_in=read.documents,
        documents_out=int(np.count_nonzero(kept)),
        skipped=dict(sorted(read.skipped.items())),
        skipped_examples=list(read.skipped_examples),
        tokens_in=int(docs.full_length.sum(dtype=np.int64)),
        tokens_out=sum(p.num_tokens for p in everything),
        tokens_trained=sum(p.trained_tokens for p in everything),
        fully_masked_samples=sum(p.fully_masked_pieces for p in everything),
        sequences=sum(p.num_sequences for p in everything),
        empty_bins=empty_bins, empty_parts=empty_parts,
        eval_documents=eval_documents, eval_sequences=sum(p.num_sequences for p in eval_parts),
        eval_tokens=sum(p.num_tokens for p in eval_parts),
    )
    c.fill_ratio = round(c.tokens_out / (c.sequences * max_length), 6) if c.sequences else 0.0
    c.padding_tokens = c.sequences * max_length - c.tokens_out
    c.padding_tokens_unpacked = int(np.count_nonzero(kept)) * max_length - c.tokens_out
    kept_tokens = int(docs.length.sum(dtype=np.int64))
    if kept_tokens != c.tokens_out:
        raise RuntimeError(f"writing lost tokens: {kept_tokens} planned, {c.tokens_out} written")
    if kind == "pretrain":
        c.split_documents = int(np.count_nonzero(docs.length > max_length))
        if c.tokens_out != c.tokens_in:
            raise RuntimeError(f"packing lost tokens: {c.tokens_in} in, {c.tokens_out} out")
        _check_rows(c)
        return c
    refused = docs.exchanges == TEMPLATE_REFUSED
    dropped = ~kept & ~refused
    truncated = kept & (docs.exchanges_kept < docs.exchanges)
    c.truncated_conversations = int(truncated.sum())
    c.truncated_exchanges = int((docs.exchanges - docs.exchanges_kept)[truncated].sum(dtype=np.int64))
    c.tokens_truncated = int((docs.full_length.astype(np.int64) - docs.length)[truncated].sum())
    c.tokens_dropped = int(docs.full_length[dropped].sum(dtype=np.int64))
    if dropped.any():
        c.skipped["first_exchange_exceeds_max_length"] = int(dropped.sum())
    if refused.any():
        c.skipped["chat_template_refused"] = int(refused.sum())
        c.skipped_examples += [f"{docs.files[docs.file[i]]}:{docs.line[i]}: messages: the chat template refused it"
                               for i in np.flatnonzero(refused)[:EXAMPLES_PER_REASON]]
        c.skipped = dict(sorted(c.skipped.items()))
    balance = c.tokens_out + c.tokens_truncated + c.tokens_dropped
    if balance != c.tokens_in:
        raise RuntimeError(f"token accounting broken: {c.tokens_in} in, {balance} accounted")
    _check_rows(c)
    return c


def _check_rows(c: PrepCounts) -> None:
    """Every row read is written or skipped, never both (the summary says rows = written + skipped)."""
    if c.documents_out + sum(c.skipped.values()) != c.lines_read:
        raise RuntimeError(f"row accounting broken: {c.lines_read} rows, {c.documents_out} written, "
                           f"{sum(c.skipped.values())} skipped")


def format_summary(manifest, seconds: dict | None = None, manifest_path=None) -> list[str]:
    """Human-readable lines of a :class:`~colossal_llama.dataset.manifest.Manifest`: what came in, what went
    out, what was skipped and why."""
    m, c = manifest, manifest.counts
    shard = f" (shard {m.shard_index} of {m.num_shards})" if m.num_shards > 1 else ""
    lines = [
        f"{m.kind}{shard}: {c.documents_out} documents written from {c.lines_read} rows, "
        f"skipped {sum(c.skipped.values())} {c.skipped or ''}".rstrip(),
        f"tokens in {c.tokens_in:,} -> out {c.tokens_out:,} (trained {c.tokens_trained:,}); "
        f"{c.sequences:,} sequences of <= {m.max_length}, fill ratio {c.fill_ratio:.4f}; "
        f"fully masked samples {c.fully_masked_samples}",
    ]
    if c.files_ignored:
        lines.append(f"input files ignored, not JSON lines by name: {c.files_ignored} (named in the warning above)")
    if m.kind == "pretrain":
        lines.append(f"documents split across sequences: {c.split_documents}")
    else:
        lines.append(f"truncated {c.truncated_conversations} conversations ({c.truncated_exchanges} exchanges, "
                     f"{c.tokens_truncated} tokens); dropped tokens {c.tokens_dropped}")
    if m.kind == "sft" and m.packing:
        lines.append(f"packing: padding to max_length {c.padding_tokens:,} tokens instead of "
                     f"{c.padding_tokens_unpacked:,} unpacked (saved {100 * c.padding_saved:.1f} %)")
    for part in m.parts:
        lines.append(f"  {part.name}: {part.num_sequences} sequences, {part.num_tokens:,} tokens, "
                     f"{len(part.per_category)} categories")
    if m.eval_parts:
        lines.append(f"held out ({m.holdout_fraction:g} of each category): {c.eval_documents} documents, "
                     f"{c.eval_sequences} sequences, {c.eval_tokens:,} tokens in {m.eval_dir}/")
    if c.empty_bins:
        lines.append(f"empty bins (category: bins): {c.empty_bins}")
    if c.empty_parts:
        lines.append(f"empty parts not written: {c.empty_parts}")
    for example in c.skipped_examples:
        lines.append(f"  skipped {example}")
    if seconds:
        lines.append("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
    if manifest_path is not None:
        lines.append(f"manifest: {manifest_path}")
    return lines
