"""Initialise a model for an expanded tokenizer: new embedding rows = mean of their source pieces' rows.

For every token the target tokenizer adds, the new row of the input embeddings and of ``lm_head`` is the
mean of the source rows of the pieces the *source* tokenizer splits that token into (see
:mod:`colossal_llama.model.vocab_mapping`). Every other tensor is copied byte for byte, shard by shard, so
a 7B checkpoint converts in a few GB of memory: only the vocabulary matrices are ever materialised.

    python colossal_llama/model/init_model.py --source_model_and_tokenizer_path S \
        --target_tokenizer_path T --target_model_path M [--overwrite] [--pad_vocab_to_multiple_of 64]
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from colossal_llama.model.checkpoint_files import WEIGHT_SUFFIXES, CheckpointLayout, find_checkpoint, open_shard, \
    shard_shapes
from colossal_llama.model.safetensors_stream import OutputTensor, write_safetensors, write_tensor_bytes
from colossal_llama.model.vocab_mapping import check_is_expansion, source_piece_ids
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.utils.cli import OneLineErrorParser, add_flags, config_from, flag
from colossal_llama.utils.errors import UserInputError, cli_entry
from colossal_llama.utils.json_files import read_json, write_json
from colossal_llama.utils.output import check_output_file, lies_in, staged_dir

log = logging.getLogger(__name__)

# Names of vocabulary-indexed matrices ([vocab, hidden]) in LLaMA-family and other common checkpoints.
VOCAB_MATRIX_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "word_embeddings.weight",
                         "embed_out.weight", "tok_embeddings.weight", "output.weight")
# Model-folder files that are not tokenizer files (everything else in the target tokenizer dir is copied).
NOT_TOKENIZER_FILES = ("config.json", "generation_config.json")
GATHER_CHUNK_BYTES = 256 << 20  # float32 working set of one mean-computation chunk
# config.json keys that LoRA's ``--lora_train_embeddings auto`` reads: the source tokenizer's token count before the
# first expansion, and the expanded tokenizer's. Tokens, not matrix rows: a source whose matrices carry padding rows
# (32064 rows for 32000 tokens) puts its new tokens inside that padding, so the row count does not grow.
BASE_TOKENS_KEY = "colossal_llama_base_tokenizer_size"
TOKENS_KEY = "colossal_llama_tokenizer_size"
# Written by earlier versions: matrix rows before the first expansion (still read for their models).
BASE_VOCAB_KEY = "colossal_llama_base_vocab_size"
TMP_KIND = "tmp-init"  # the target is built in ``.{target}.tmp-init-{pid}`` beside it, then renamed


@dataclass
class InitModelConfig:
    """What to convert (this class *is* the command line, under the original's flag names)."""

    source_dir: Path = flag(name="source_model_and_tokenizer_path", help="HF folder of the source model and its "
                                                                         "tokenizer")
    target_tokenizer_dir: Path = flag(name="target_tokenizer_path", help="folder of the expanded tokenizer")
    target_dir: Path = flag(name="target_model_path", help="output folder (must not exist unless --overwrite)")
    overwrite: bool = flag(False, help="replace --target_model_path if it exists")
    pad_vocab_to_multiple_of: int = flag(1, help="round the new vocabulary up to a multiple of this (e.g. 64 x tp "
                                                 "for the 3d plugin)")


@dataclass
class InitReport:
    """What :func:`init_model_from_expanded_tokenizer` did, in numbers."""

    source_tokenizer_size: int
    target_tokenizer_size: int
    old_vocab_size: int  # rows of the source vocabulary matrices (source config.vocab_size)
    new_vocab_size: int  # rows written (target config.vocab_size)
    new_rows: int  # rows mean-initialised from source pieces
    empty_split_rows: int  # new tokens the source split into nothing: mean of all source rows instead
    padding_rows: int  # rows added by --pad_vocab_to_multiple_of: mean of all source rows
    pieces_per_new_row: Dict[str, object]  # min / max / mean / histogram {pieces: rows}
    vocab_matrices: List[str]
    tied_embeddings: bool
    tensors_copied: int  # tensors copied bit-identically
    shards: int
    bytes_written: int
    tokenizer_files: List[str]
    peak_rss_bytes: int
    seconds: float
    notes: List[str] = field(default_factory=list)


def mean_init_new_rows(old_matrix: torch.Tensor, piece_ids: Sequence[Sequence[int]],
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows for new tokens: row i = mean of ``old_matrix[piece_ids[i]]``.

    old_matrix: [V_old, H]; piece_ids: one list of row indices (< V_old) per new token.
    Returns [len(piece_ids), H] in ``old_matrix.dtype`` (written into ``out`` when given, e.g. a view of
    the resized matrix, which saves a copy of the new rows). Sums are accumulated in float32 and rounded once,
    so the result equals ``old_matrix[ids].float().mean(0).to(dtype)`` bit for bit (and
    ``old_matrix[ids].mean(0)`` for float32). An empty list gets the mean of all rows of ``old_matrix``.

    Vectorised per piece count: tokens with k pieces are gathered as one [n, k, H] block (chunked to bound
    memory) and reduced over k in one op, so the cost is linear in the number of new tokens.
    """
    num_new, hidden = len(piece_ids), old_matrix.shape[1]
    if out is None:
        out = torch.empty(num_new, hidden, dtype=old_matrix.dtype)
    elif out.shape != (num_new, hidden) or out.dtype != old_matrix.dtype:
        raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, expected {(num_new, hidden)} {old_matrix.dtype}")
    rows_by_count: Dict[int, List[int]] = {}
    for row, ids in enumerate(piece_ids):
        rows_by_count.setdefault(len(ids), []).append(row)
    for count, rows in rows_by_count.items():
        if count == 0:
            out[rows] = mean_of_all_rows(old_matrix)
            continue
        chunk = max(1, GATHER_CHUNK_BYTES // (count * hidden * 4))
        for start in range(0, len(rows), chunk):
            block_rows = rows[start : start + chunk]
            index = torch.tensor([piece_ids[r] for r in block_rows], dtype=torch.long)  # [n, k]
            gathered = old_matrix[index].float()  # [n, k, H]
            out[block_rows] = (gathered.sum(dim=1) / count).to(old_matrix.dtype)
    return out


def mean_of_all_rows(matrix: torch.Tensor) -> torch.Tensor:
    """[H] mean of all rows of a [V, H] matrix, accumulated in float32, in the matrix dtype.

    Summed in chunks of rows: ``sum(dtype=float32)`` over the whole matrix would first convert all of it to
    float32 (LLaMA-3-70B's bf16 embedding is 2.1 GB: 4.2 GB more at the peak)."""
    chunk = max(1, GATHER_CHUNK_BYTES // (matrix.shape[1] * 4))
    total = torch.zeros(matrix.shape[1], dtype=torch.float32)
    for start in range(0, matrix.shape[0], chunk):
        total += matrix[start : start + chunk].sum(dim=0, dtype=torch.float32)
    return (total / matrix.shape[0]).to(matrix.dtype)


def resize_vocab_matrix(old_matrix: torch.Tensor, piece_ids: Sequence[Sequence[int]], source_tokens: int,
                        new_vocab_size: int) -> torch.Tensor:
    """[V_old, H] -> [new_vocab_size, H].

    Rows ``[0, V_old)`` are kept, except rows ``[source_tokens, source_tokens + len(piece_ids))`` (new
    tokens, which may land on unused padding rows of the source) that get :func:`mean_init_new_rows` over
    the source tokenizer's rows ``[0, source_tokens)``. Rows past both get the mean of those rows.
    """
    old_rows = old_matrix.shape[0]
    new_end = source_tokens + len(piece_ids)
    new = torch.empty(new_vocab_size, old_matrix.shape[1], dtype=old_matrix.dtype)
    new[:old_rows] = old_matrix
    real_rows = old_matrix[:source_tokens]
    mean_init_new_rows(real_rows, piece_ids, out=new[source_tokens:new_end])
    pad_start = max(new_end, old_rows)
    if pad_start < new_vocab_size:
        new[pad_start:] = mean_of_all_rows(real_rows)
    return new


def init_model_from_expanded_tokenizer(source_dir, target_tokenizer_dir, target_dir, **options) -> InitReport:
    """Write ``target_dir``: the model of ``source_dir`` resized and mean-initialised for the tokenizer in
    ``target_tokenizer_dir`` (an expansion of the source's tokenizer), plus that tokenizer's files.

    The output is written into a temporary sibling and renamed, so ``target_dir`` is complete or absent.
    ``options``: the other fields of :class:`InitModelConfig` (``overwrite``, ``pad_vocab_to_multiple_of``).
    """
    return run_init(InitModelConfig(Path(source_dir), Path(target_tokenizer_dir), Path(target_dir), **options))


def run_init(cfg: InitModelConfig) -> InitReport:
    started = time.monotonic()
    _check_paths(cfg)
    layout = find_checkpoint(cfg.source_dir)
    config = read_json(cfg.source_dir / "config.json")
    source_tok = load_tokenizer(cfg.source_dir)
    target_tok = load_tokenizer(cfg.target_tokenizer_dir)
    check_is_expansion(source_tok, target_tok, cfg.source_dir, cfg.target_tokenizer_dir)

    shapes = shard_shapes(layout)
    vocab_matrices = _find_vocab_matrices(shapes, config, cfg.source_dir)
    old_rows = shapes[vocab_matrices[0]][0]
    source_tokens, target_tokens = len(source_tok), len(target_tok)
    if source_tokens > old_rows:
        raise UserInputError(f"{cfg.source_dir}: tokenizer has {source_tokens} tokens but the model's "
                             f"{vocab_matrices[0]} has only {old_rows} rows: tokenizer and model do not match")
    multiple = cfg.pad_vocab_to_multiple_of
    new_vocab = -(-max(target_tokens, old_rows) // multiple) * multiple

    new_ids = range(source_tokens, target_tokens)
    piece_ids = source_piece_ids(source_tok, target_tok, new_ids, cfg.target_tokenizer_dir)
    counts = [len(p) for p in piece_ids]
    log.info("tokenizer %d -> %d tokens; vocabulary matrices %s: %d -> %d rows", source_tokens, target_tokens,
             vocab_matrices, old_rows, new_vocab)

    # built beside the target; a sibling left by a run that was killed (kill -9, out of memory) goes first
    with staged_dir(cfg.target_dir, TMP_KIND) as tmp:
        tmp.mkdir(parents=True)
        bytes_written, copied = _write_weights(layout, tmp, set(vocab_matrices), piece_ids, source_tokens, new_vocab)
        config["vocab_size"] = new_vocab
        config.setdefault(BASE_TOKENS_KEY, source_tokens)  # a second expansion keeps the first base
        config[TOKENS_KEY] = target_tokens
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if (cfg.source_dir / "generation_config.json").is_file():
            shutil.copy2(cfg.source_dir / "generation_config.json", tmp / "generation_config.json")
        tokenizer_files = _copy_tokenizer_files(cfg.target_tokenizer_dir, tmp)

    notes = []
    if not layout.is_safetensors:
        notes.append("source was pytorch_model*.bin: each shard was read fully while converting to safetensors")
    report = InitReport(
        source_tokenizer_size=source_tokens,
        target_tokenizer_size=target_tokens,
        old_vocab_size=old_rows,
        new_vocab_size=new_vocab,
        new_rows=len(piece_ids),
        empty_split_rows=counts.count(0),
        padding_rows=max(0, new_vocab - max(target_tokens, old_rows)),
        pieces_per_new_row=_count_summary(counts),
        vocab_matrices=vocab_matrices,
        tied_embeddings=len(vocab_matrices) == 1,
        tensors_copied=copied,
        shards=len(layout.shard_files),
        bytes_written=bytes_written,
        tokenizer_files=tokenizer_files,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        seconds=round(time.monotonic() - started, 3),
        notes=notes,
    )
    if report.empty_split_rows:
        log.warning("%d new tokens split into no source piece; given the mean of all source rows",
                    report.empty_split_rows)
    return report


def _check_paths(cfg: InitModelConfig) -> None:
    if not cfg.source_dir.is_dir():
        raise UserInputError(f"{cfg.source_dir}: source model directory does not exist")
    if not (cfg.source_dir / "config.json").is_file():
        raise UserInputError(f"{cfg.source_dir}: no config.json (not a Hugging Face model folder)")
    if not cfg.target_tokenizer_dir.is_dir():
        raise UserInputError(f"{cfg.target_tokenizer_dir}: target tokenizer directory does not exist")
    if cfg.pad_vocab_to_multiple_of < 1:
        raise UserInputError(f"--pad_vocab_to_multiple_of {cfg.pad_vocab_to_multiple_of}: must be >= 1")
    for what, given in (("source model", cfg.source_dir), ("target tokenizer", cfg.target_tokenizer_dir)):
        if lies_in(given, cfg.target_dir):  # --overwrite would delete it with the old target
            raise UserInputError(f"{cfg.target_dir}: target model path is or contains the {what} ({given}); "
                                 f"choose a new folder")
    if cfg.target_dir.exists() and not cfg.target_dir.is_dir():
        raise UserInputError(f"{cfg.target_dir}: target model path exists and is not a directory")
    if cfg.target_dir.exists() and not cfg.overwrite:
        raise UserInputError(f"{cfg.target_dir}: already exists (pass --overwrite to replace it)")


def _find_vocab_matrices(shapes: Dict[str, tuple], config: dict, source_dir: Path) -> List[str]:
    """Names of the [vocab, hidden] matrices (input embeddings, and lm_head unless tied)."""
    found = [name for name, shape in shapes.items() if len(shape) == 2 and name.endswith(VOCAB_MATRIX_SUFFIXES)]
    if not found:
        raise UserInputError(f"{source_dir}: no embedding matrix found (looked for names ending in "
                             f"{', '.join(VOCAB_MATRIX_SUFFIXES)})")
    rows = {shapes[name][0] for name in found}
    if len(rows) != 1:
        raise UserInputError(f"{source_dir}: vocabulary matrices disagree on rows: "
                             + ", ".join(f"{n} {shapes[n]}" for n in found))
    if "vocab_size" in config and config["vocab_size"] != shapes[found[0]][0]:
        raise UserInputError(f"{source_dir / 'config.json'}: vocab_size: {config['vocab_size']} but "
                             f"{found[0]} has {shapes[found[0]][0]} rows")
    return sorted(found)


def _write_weights(layout: CheckpointLayout, out_dir: Path, vocab_matrices: set, piece_ids, source_tokens: int,
                   new_vocab: int) -> tuple:
    """Write every shard of ``layout`` into ``out_dir``; returns (bytes written, tensors copied verbatim)."""
    weight_map, total_tensor_bytes, bytes_written, copied = {}, 0, 0, 0
    total = sum((layout.folder / s).stat().st_size for s in layout.shard_files)  # grows as shards open
    with tqdm(total=total, unit="B", unit_scale=True, desc="init model", mininterval=1.0) as bar:
        for shard_file in layout.shard_files:
            shard = open_shard(layout, shard_file)
            outputs = []
            for t in shard.tensors:
                if t.name in vocab_matrices:
                    outputs.append(_resized_output(t, shard.load, piece_ids, source_tokens, new_vocab))
                else:
                    outputs.append(t)
                    copied += 1
            bar.total += sum(o.nbytes for o in outputs) - sum(t.nbytes for t in shard.tensors)  # grown rows
            bar.refresh()
            out_name = layout.output_name(shard_file)
            bytes_written += write_safetensors(out_dir / out_name, outputs, shard.metadata, progress=bar.update)
            total_tensor_bytes += sum(t.nbytes for t in outputs)
            weight_map.update({t.name: out_name for t in outputs})
            del shard  # a .bin shard's state dict goes here, before the next one is loaded
    if layout.index is not None:  # sharded source (even a single shard named model-00001-of-00001)
        index = dict(layout.index)
        index["metadata"] = {**index.get("metadata", {}), "total_size": total_tensor_bytes}
        index["weight_map"] = dict(sorted(weight_map.items()))
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return bytes_written, copied


def _resized_output(source: OutputTensor, load, piece_ids, source_tokens: int, new_vocab: int) -> OutputTensor:
    """An output that materialises the resized matrix only while it is being written."""
    rows, hidden = source.shape
    element_size = source.nbytes // (rows * hidden)

    def write_to(fh) -> None:
        old = load(source.name)
        write_tensor_bytes(fh, resize_vocab_matrix(old, piece_ids, source_tokens, new_vocab))

    return OutputTensor(source.name, source.dtype, (new_vocab, hidden), new_vocab * hidden * element_size, write_to)


def _copy_tokenizer_files(tokenizer_dir: Path, out_dir: Path) -> List[str]:
    """Copy every file of the tokenizer folder except model weights and model configs."""
    copied = []
    for path in sorted(tokenizer_dir.iterdir()):
        if path.is_file() and path.name not in NOT_TOKENIZER_FILES and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, out_dir / path.name)
            copied.append(path.name)
    return copied


def _count_summary(counts: List[int]) -> Dict[str, object]:
    if not counts:
        return {"min": 0, "max": 0, "mean": 0.0, "histogram": {}}
    return {"min": min(counts), "max": max(counts), "mean": round(sum(counts) / len(counts), 3),
            "histogram": {str(k): n for k, n in sorted(Counter(counts).items())}}


def format_report(report: InitReport) -> str:
    """A few human-readable lines summarising ``report``."""
    pieces = report.pieces_per_new_row
    lines = [
        f"tokenizer: {report.source_tokenizer_size} -> {report.target_tokenizer_size} tokens",
        f"vocabulary rows: {report.old_vocab_size} -> {report.new_vocab_size} ({report.new_rows} mean-initialised, "
        f"{report.padding_rows} padding, {report.empty_split_rows} with no source piece) in "
        f"{', '.join(report.vocab_matrices)}{' (tied)' if report.tied_embeddings else ''}",
        f"pieces per new token: min {pieces['min']}, mean {pieces['mean']}, max {pieces['max']}",
        f"copied {report.tensors_copied} tensors bit-identically in {report.shards} shard(s); wrote "
        f"{report.bytes_written / 2**30:.2f} GiB in {report.seconds:.1f} s; peak RSS "
        f"{report.peak_rss_bytes / 2**30:.2f} GiB",
        f"tokenizer files: {', '.join(report.tokenizer_files)}",
    ]
    return "\n".join(lines + [f"note: {n}" for n in report.notes])


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    add_flags(parser, InitModelConfig)
    parser.add_argument("--report_json", type=Path, default=None, help="also write the report as JSON here (an "
                        "existing file is replaced only with --overwrite)")
    return parser


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_from(args, InitModelConfig)
    if args.report_json:
        check_output_file(args.report_json, "--report_json", cfg.overwrite)
    report = run_init(cfg)
    print(format_report(report))
    print(f"wrote {cfg.target_dir}")
    if args.report_json:
        args.report_json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.report_json, asdict(report))
    return 0


if __name__ == "__main__":
    main()
