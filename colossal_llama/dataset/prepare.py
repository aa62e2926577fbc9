"""Prepare pre-training (packed) and SFT (one conversation per row) data: one code path for both.

    read + validate (main process, exact file:line errors)
    -> tokenise (datasets.map, batched, num_proc workers; cache in OUT/cache)
    -> arrange rows per category (pre-training: lossless first-fit packing; SFT: one row per conversation)
    -> split each category into N seeded bins; part k = bin k of every category
    -> write arrow parts + jsonl mirror, then manifest.json last (atomically)

Output (the data contract): ``OUT/manifest.json``, ``OUT/cache/`` (datasets cache), ``OUT/jsonl/part-k.jsonl``
(one row per sequence: category, the ``file:line``/chunk of each packed piece, decoded text) and
``OUT/arrow/part-k/`` (``save_to_disk``; int32 lists ``input_ids``, ``labels`` (-100 = no loss, unshifted),
``position_ids`` (restart at 0 at every packed piece), string ``category``; no padding).
Empty parts: an entirely empty part (every category has fewer rows than bins) is an error under
``--strict``; with ``--skip_invalid`` it is reported (``counts.empty_parts``) and not written.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
from datasets import Dataset
from tqdm import tqdm

from colossal_llama.dataset.chat_templates import ChatTemplate, get_chat_template
from colossal_llama.dataset.config import (
    FORMAT_VERSION, OutputLayout, PrepConfig, PrepSummary, PretrainPrepConfig, SFTPrepConfig,
)
from colossal_llama.dataset.packing import Piece, category_rng, interleave, pack_category, split_into_bins
from colossal_llama.dataset.records import Records, read_records, validate_pretrain_row, validate_sft_row
from colossal_llama.dataset.tokenization import TOKENIZED_FEATURES, tokenize_pretrain_batch, tokenize_sft_batch
from colossal_llama.dataset.writing import (
    PartRows, TokenStore, build_part_table, write_arrow_part, write_jsonl_part, write_manifest,
)
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.utils.errors import UserInputError, cli_entry
from colossal_llama.utils.fingerprint import tokenizer_fingerprint

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- steps
def _prepare_output(layout: OutputLayout, overwrite: bool) -> None:
    """Refuse to mix with an earlier run unless ``overwrite``; then start from empty dirs."""
    existing = [p for p in (layout.jsonl_dir, layout.arrow_dir) if p.exists() and any(p.iterdir())]
    if layout.manifest.exists():
        existing.insert(0, layout.manifest)
    if existing and not overwrite:
        state = "output already exists" if layout.manifest.exists() else "incomplete output of an earlier run"
        raise UserInputError(f"{existing[0]}: {state} (pass --overwrite to replace it)")
    layout.manifest.unlink(missing_ok=True)  # first, so an interrupted rewrite never looks complete
    for d in (layout.jsonl_dir, layout.arrow_dir, layout.cache_dir):
        if d.exists() and overwrite:
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)


def _load_fast_tokenizer(path: Path):
    tokenizer = load_tokenizer(path)
    if not tokenizer.is_fast:
        raise UserInputError(f"{path}: a fast (tokenizer.json / convertible) tokenizer is required")
    return tokenizer


@contextlib.contextmanager
def _tokenizer_threads(enabled: bool):
    """Workers get one tokenizer thread each (the Rust pool does not survive fork); restored afterwards."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    if not enabled:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _tokenize(records: Records, config: PrepConfig, function, fn_kwargs: dict) -> Dataset:
    """Batched tokenisation in ``num_proc`` processes; shards are concatenated in order (deterministic)."""
    raw = Dataset.from_dict(records.columns)
    with _tokenizer_threads(enabled=config.num_proc == 1):
        return raw.map(
            function, batched=True, batch_size=512, num_proc=config.num_proc if config.num_proc > 1 else None,
            fn_kwargs=fn_kwargs, remove_columns=raw.column_names, features=TOKENIZED_FEATURES,
            cache_file_name=str(config.output.cache_dir / "tokenized.arrow"), load_from_cache_file=False,
            new_fingerprint=f"tokenized-{config.kind}-{config.seed}", desc=f"tokenize ({config.kind})",
        )


def _rows_per_category(ds: Dataset, store: TokenStore, config: PrepConfig) -> dict[str, list[list[Piece]]]:
    """Per category, the ordered list of output rows (each a list of pieces)."""
    categories = ds.data.table.column("category").to_pylist()
    keep = np.asarray(store.lengths > 0)  # SFT conversations dropped by truncation have no tokens
    by_category: dict[str, list[int]] = {}
    for doc, cat in enumerate(categories):
        if keep[doc]:
            by_category.setdefault(cat, []).append(doc)
    rows = {}
    for cat in tqdm(sorted(by_category), desc="pack" if config.kind == "pretrain" else "order", unit=" cat"):
        rng = category_rng(config.seed, cat, "order")
        docs = by_category[cat]
        if config.kind == "pretrain":
            rows[cat] = pack_category(docs, store.lengths, config.max_length, rng)
        else:
            rows[cat] = [[Piece(int(d), 0, int(store.lengths[d]))] for d in rng.permutation(docs)]
    return rows


def _assemble_parts(rows: dict[str, list], config: PrepConfig, counts: dict) -> list[PartRows]:
    """Part k = bin k of every category, categories interleaved by a seeded, order-keeping merge."""
    per_bin: list[dict[str, list]] = [{} for _ in range(config.num_bins)]
    empty_bins: dict[str, list[int]] = {}
    for cat, seqs in rows.items():
        for k, span in enumerate(split_into_bins(len(seqs), config.num_bins, category_rng(config.seed, cat, "bins"))):
            per_bin[k][cat] = [seqs[i] for i in span]
            if not span:
                empty_bins.setdefault(cat, []).append(k)
    counts["empty_bins"] = empty_bins
    parts, empty_parts = [], []
    for k, streams in enumerate(per_bin):
        merged = interleave(streams, category_rng(config.seed, "", f"interleave-{k}"))
        if merged:
            parts.append(PartRows(k, merged))
        else:
            empty_parts.append(k)
    counts["empty_parts"] = empty_parts
    if empty_parts and config.strict:
        largest = max(len(s) for s in rows.values())
        raise UserInputError(
            f"--num_spliced_dataset_bins {config.num_bins}: bin {empty_parts[0]} would be empty in every category "
            f"(the largest category has {largest} rows); use fewer bins, or --skip_invalid to write only "
            f"the non-empty parts")
    return parts


def _part_entry(part: PartRows) -> dict:
    per_category: dict[str, dict] = {}
    for cat, pieces in part.rows:
        entry = per_category.setdefault(cat, {"sequences": 0, "tokens": 0})
        entry["sequences"] += 1
        entry["tokens"] += sum(p.length for p in pieces)
    return {
        "name": part.name, "bin": part.index, "num_sequences": len(part.rows),
        "num_tokens": sum(e["tokens"] for e in per_category.values()),
        "per_category": dict(sorted(per_category.items())),
    }


def _token_counts(ds: Dataset, store: TokenStore, rows: dict[str, list], config: PrepConfig, counts: dict):
    """Token accounting; raises if a token was lost (a bug, never expected)."""
    table = ds.data.table
    full = np.asarray(table.column("full_length").to_numpy(), dtype=np.int64)
    kept_lengths = store.lengths
    pieces = [p for seqs in rows.values() for seq in seqs for p in seq]
    tokens_out = sum(p.length for p in pieces)
    dropped = kept_lengths == 0
    counts["tokens_in"] = int(full.sum())
    counts["tokens_out"] = int(tokens_out)
    counts["tokens_trained"] = int(np.count_nonzero(store.labels != -100))
    counts["fully_masked_samples"] = sum(1 for p in pieces if store.trained_tokens(p) == 0)
    num_sequences = sum(len(seqs) for seqs in rows.values())
    counts["sequences"] = num_sequences
    counts["fill_ratio"] = round(tokens_out / (num_sequences * config.max_length), 6) if num_sequences else 0.0
    if config.kind == "pretrain":
        counts["split_documents"] = int(np.count_nonzero(kept_lengths > config.max_length))
        if tokens_out != counts["tokens_in"]:
            raise RuntimeError(f"packing lost tokens: {counts['tokens_in']} in, {tokens_out} out")
    else:
        exchanges = np.asarray(table.column("exchanges").to_numpy(), dtype=np.int64)
        kept = np.asarray(table.column("exchanges_kept").to_numpy(), dtype=np.int64)
        truncated = (~dropped) & (kept < exchanges)
        counts["truncated_conversations"] = int(truncated.sum())
        counts["truncated_exchanges"] = int((exchanges - kept)[truncated].sum())
        counts["tokens_truncated"] = int((full - kept_lengths)[truncated].sum())
        counts["tokens_dropped"] = int(full[dropped].sum())
        if dropped.any():
            counts["skipped"]["first_exchange_exceeds_max_length"] = int(dropped.sum())
        balance = tokens_out + counts["tokens_truncated"] + counts["tokens_dropped"]
        if balance != counts["tokens_in"]:
            raise RuntimeError(f"token accounting broken: {counts['tokens_in']} in, {balance} accounted")


# ------------------------------------------------------------------------------------------ entry points
def _prepare(config: PrepConfig, template: ChatTemplate | None) -> PrepSummary:
    clock = _StageClock()
    tokenizer = template.tokenizer if template is not None else _load_fast_tokenizer(config.tokenizer_dir)
    validate = validate_pretrain_row if config.kind == "pretrain" else validate_sft_row
    with clock("read"):
        records = read_records(config.input_dirs, validate, config.strict)  # before touching the output
    _prepare_output(config.output, config.overwrite)
    with clock("tokenize"):
        if template is None:
            ds = _tokenize(records, config, tokenize_pretrain_batch, {"tokenizer": tokenizer})
        else:
            ds = _tokenize(records, config, tokenize_sft_batch,
                           {"template": template, "max_length": config.max_length})
    with clock("pack"):
        store = TokenStore.from_dataset(ds)
        rows = _rows_per_category(ds, store, config)
        counts: dict = {"lines_read": records.lines_read, "documents_in": records.num_documents,
                        "skipped": dict(sorted(records.skipped.items())),
                        "skipped_examples": records.skipped_examples}
        _token_counts(ds, store, rows, config, counts)
        if not rows:
            raise UserInputError("no rows left to write (every conversation was dropped by truncation)")
        parts = _assemble_parts(rows, config, counts)
    with clock("write"):
        entries = []
        for part in tqdm(parts, desc="write", unit=" part"):
            write_arrow_part(build_part_table(store, part), config.output.arrow_dir / part.name)
            write_jsonl_part(store, part, tokenizer, config.output.jsonl_dir / f"{part.name}.jsonl")
            entries.append(_part_entry(part))
        manifest = {
            "format_version": FORMAT_VERSION, "kind": config.kind,
            "tokenizer_dir": str(config.tokenizer_dir.resolve()),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
            "max_length": config.max_length, "num_bins": config.num_bins, "seed": config.seed,
            "chat_template": template.to_manifest() if template is not None else None,
            "parts": entries, "counts": counts,
        }
        write_manifest(manifest, config.output.manifest)
    summary = PrepSummary(config.output.manifest, config.output.arrow_dir, manifest, clock.seconds)
    for line in format_summary(summary):
        logger.info(line)
    return summary


class _StageClock:
    """``with clock("name"):`` accumulates wall seconds per stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def prepare_pretrain(config: PretrainPrepConfig) -> PrepSummary:
    """Tokenise ``{source, target, category}`` documents and pack them losslessly; see module docstring."""
    return _prepare(config, None)


def prepare_sft(config: SFTPrepConfig) -> PrepSummary:
    """Template conversations (labels on assistant turns), truncate to whole exchanges; one per row."""
    tokenizer = _load_fast_tokenizer(config.tokenizer_dir)
    return _prepare(config, get_chat_template(config.chat_template, tokenizer, config.system_message))


def format_summary(summary: PrepSummary) -> list[str]:
    """Human-readable lines: what came in, what went out, what was skipped and why."""
    m, c = summary.manifest, summary.counts
    lines = [
        f"{m['kind']}: {c['documents_in']} documents from {c['lines_read']} rows, "
        f"skipped {sum(c['skipped'].values())} {c['skipped'] or ''}".rstrip(),
        f"tokens in {c['tokens_in']:,} -> out {c['tokens_out']:,} (trained {c['tokens_trained']:,}); "
        f"{c['sequences']:,} sequences of <= {m['max_length']}, fill ratio {c['fill_ratio']:.4f}; "
        f"fully masked samples {c['fully_masked_samples']}",
    ]
    if m["kind"] == "pretrain":
        lines.append(f"documents split across sequences: {c['split_documents']}")
    else:
        lines.append(f"truncated {c['truncated_conversations']} conversations ({c['truncated_exchanges']} exchanges, "
                     f"{c['tokens_truncated']} tokens); dropped tokens {c['tokens_dropped']}")
    for part in m["parts"]:
        lines.append(f"  {part['name']}: {part['num_sequences']} sequences, {part['num_tokens']:,} tokens, "
                     f"{len(part['per_category'])} categories")
    if c["empty_bins"]:
        lines.append(f"empty bins (category: bins): {c['empty_bins']}")
    if c["empty_parts"]:
        lines.append(f"empty parts not written: {c['empty_parts']}")
    for example in c["skipped_examples"]:
        lines.append(f"  skipped {example}")
    if summary.seconds:
        lines.append("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.seconds.items()))
    lines.append(f"manifest: {summary.manifest_path}")
    return lines


# ------------------------------------------------------------------------------------------------- CLI
def _common_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data_input_dirs", required=True, help="comma-separated dirs (or files) of jsonl[.gz|.zst]")
    p.add_argument("--tokenizer_dir", required=True)
    p.add_argument("--data_output_dirs", help="OUT: writes OUT/{cache,jsonl,arrow} and OUT/manifest.json")
    p.add_argument("--data_cache_dir", help="older form: cache dir (with the two below, instead of OUT)")
    p.add_argument("--data_jsonl_output_dir", help="older form: jsonl mirror dir")
    p.add_argument("--data_arrow_output_dir", help="older form: arrow dir (manifest goes to its parent)")
    p.add_argument("--max_length", type=int, default=4096)
    p.add_argument("--num_spliced_dataset_bins", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num_proc", type=int, default=1)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--strict", dest="strict", action="store_true", default=True,
                      help="(default) stop at the first invalid row or empty part with file:line: field")
    mode.add_argument("--skip_invalid", dest="strict", action="store_false",
                      help="skip invalid rows and empty parts, counting them by reason in the summary")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared output")
    return p


def _layout(args) -> OutputLayout:
    triple = (args.data_cache_dir, args.data_jsonl_output_dir, args.data_arrow_output_dir)
    if args.data_output_dirs and any(triple):
        raise UserInputError("give either --data_output_dirs or the three --data_*_dir flags, not both")
    if args.data_output_dirs:
        if "," in args.data_output_dirs:
            raise UserInputError("--data_output_dirs: exactly one output directory is supported")
        return OutputLayout.under(args.data_output_dirs)
    if not all(triple):
        raise UserInputError("an output is required: --data_output_dirs OUT (or all of --data_cache_dir, "
                             "--data_jsonl_output_dir, --data_arrow_output_dir)")
    return OutputLayout(*(Path(p) for p in triple))


def _common_kwargs(args) -> dict:
    return dict(
        input_dirs=[d.strip() for d in args.data_input_dirs.split(",") if d.strip()],
        tokenizer_dir=args.tokenizer_dir, output=_layout(args), max_length=args.max_length,
        num_bins=args.num_spliced_dataset_bins, seed=args.seed, num_proc=args.num_proc, strict=args.strict,
        overwrite=args.overwrite,
    )


def _run_cli(prepare, config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare(config)
    return 0


@cli_entry
def pretrain_main(argv=None) -> int:
    """CLI of ``prepare_pretrain_dataset.py``."""
    args = _common_parser("Tokenise and pack pre-training jsonl into arrow parts.").parse_args(argv)
    return _run_cli(prepare_pretrain, PretrainPrepConfig(**_common_kwargs(args)))


@cli_entry
def sft_main(argv=None) -> int:
    """CLI of ``prepare_sft_dataset.py``."""
    p = _common_parser("Template and tokenise SFT conversations into arrow parts.")
    p.add_argument("--llama_version", type=int, choices=(2, 3), default=None,
                   help="chat template llama2 or llama3 (default 3 unless --chat_template is given)")
    p.add_argument("--chat_template", choices=("llama2", "llama3", "tokenizer"), default=None,
                   help="'tokenizer' uses the tokenizer's own chat_template")
    p.add_argument("--system_message", default=None)
    args = p.parse_args(argv)
    by_version = f"llama{args.llama_version}" if args.llama_version else None
    if by_version and args.chat_template and by_version != args.chat_template:
        raise UserInputError(f"--llama_version {args.llama_version} contradicts --chat_template {args.chat_template}")
    template = args.chat_template or by_version or "llama3"
    config = SFTPrepConfig(**_common_kwargs(args), chat_template=template, system_message=args.system_message)
    return _run_cli(prepare_sft, config)


if __name__ == "__main__":
    pretrain_main()
