"""Throughput of pre-training data preparation on the real corpora, 1 vs 2 worker processes.

    .venv/bin/python benchmarks/prepare_throughput.py [--smollm2_dir DIR] [--max_length 4096]

Runs ``prepare_pretrain`` end to end (read, tokenise, pack, write) on every file of
``data_root()/pretrain`` with the real Mistral tokenizer (SentencePiece -> LlamaTokenizerFast folder) and
SmolLM2's byte-level BPE tokenizer (exported from the GGUF unless ``--smollm2_dir`` is given), and prints
a table: tokens, wall seconds per stage (reading overlaps tokenising), end-to-end tokens/s and the packing fill
ratio. ``benchmarks/prepare_scale.py`` measures memory and speed as the corpus grows.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig
from colossal_llama.dataset.pipeline import prepare_pretrain
from colossal_llama.tokenizer.loading import sentencepiece_to_hf_dir
from colossal_llama.utils.paths import data_root, mistral_tokenizer_model, smollm2_gguf


def tokenizer_dirs(work: Path, smollm2_dir: str | None) -> dict[str, Path]:
    dirs = {"mistral-7b (sentencepiece)": sentencepiece_to_hf_dir(mistral_tokenizer_model(), work / "mistral")}
    if smollm2_dir:
        dirs["smollm2-135m (byte BPE)"] = Path(smollm2_dir)
    else:
        from colossal_llama.model.gguf_export import export_gguf_to_hf

        dirs["smollm2-135m (byte BPE)"] = export_gguf_to_hf(smollm2_gguf(), work / "smollm2")
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2_dir", help="an exported SmolLM2 HF folder (skips the GGUF export)")
    parser.add_argument("--max_length", type=int, default=4096)
    parser.add_argument("--num_bins", type=int, default=10)
    parser.add_argument("--procs", default="1,2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, tok_dir in tokenizer_dirs(work, args.smollm2_dir).items():
            for num_proc in (int(p) for p in args.procs.split(",")):
                out = work / f"out-{len(rows)}"
                config = PretrainPrepConfig(
                    input_dirs=[data_root() / "pretrain"], tokenizer_dir=tok_dir, output=OutputLayout.under(out),
                    max_length=args.max_length, num_bins=args.num_bins, seed=0, num_proc=num_proc)
                # (the real novel file ends with a row without text: counted and skipped)
                summary = prepare_pretrain(config)
                rows.append((name, num_proc, summary))
    header = (f"{'tokenizer':<28} {'procs':>5} {'docs':>7} {'tokens':>10} {'read+tok s':>10} {'plan s':>7} "
              f"{'write s':>7} {'total s':>8} {'tok/s e2e':>10} {'fill':>7}")
    print(header)
    print("-" * len(header))
    for name, num_proc, summary in rows:
        c, s = summary.counts, summary.seconds
        total = sum(s.values())
        print(f"{name:<28} {num_proc:>5} {c.documents_in:>7} {c.tokens_out:>10,} {s['read+tokenize']:>10.2f} "
              f"{s['plan']:>7.2f} {s['write']:>7.2f} {total:>8.2f} {c.tokens_out / total:>10,.0f} {c.fill_ratio:>7.4f}")
    print(f"(tokens in == tokens out in every run; max_length {args.max_length}; skipped rows: "
          f"{rows[0][2].counts.skipped})")


if __name__ == "__main__":
    main()
