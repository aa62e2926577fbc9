"""Speed of SFT preparation per chat template, on the real chatterbot conversations (English and Chinese).

    .venv/bin/python benchmarks/sft_templates.py [--smollm2_dir DIR] [--copies 10] [--repeats 2]

Runs ``prepare_sft`` end to end (read, template, tokenise, write) on the chatterbot corpora copied ``--copies``
times, with SmolLM2's tokenizer (exported from the GGUF unless ``--smollm2_dir`` is given), once per template
(``llama2``, ``llama3``, ``tokenizer``: SmolLM2's own ChatML Jinja template), each ``--repeats`` times in turn,
and prints the best read+tokenise time of each and its ratio to ``llama3``'s in the same run (these machines are
noisy; the ratio is the figure). ``--skip_invalid``: the corpora hold a few empty replies, counted and skipped.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

from colossal_llama.dataset.config import OutputLayout, SFTPrepConfig
from colossal_llama.dataset.pipeline import prepare_sft
from colossal_llama.utils.paths import data_root, smollm2_gguf

TEMPLATES = ("llama2", "llama3", "tokenizer")


def copied_corpus(work: Path, copies: int) -> Path:
    """``work/sft`` holding every chatterbot file ``copies`` times (distinct names, same conversations)."""
    folder = work / "sft"
    folder.mkdir()
    for source in sorted((data_root() / "sft").glob("*.jsonl")):
        for k in range(copies):
            shutil.copyfile(source, folder / f"{source.stem}-{k:03d}.jsonl")
    return folder


def smollm2_dir(work: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    from colossal_llama.model.gguf_export import export_gguf_to_hf

    return export_gguf_to_hf(smollm2_gguf(), work / "smollm2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2_dir", help="an exported SmolLM2 HF folder (skips the GGUF export)")
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=4096)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    best: dict[str, float] = {}
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus, tokenizer = copied_corpus(work, args.copies), smollm2_dir(work, args.smollm2_dir)
        for repeat in range(args.repeats):
            for name in TEMPLATES:
                out = work / f"out-{name}-{repeat}"
                config = SFTPrepConfig(input_dirs=[corpus], tokenizer_dir=tokenizer, output=OutputLayout.under(out),
                                       max_length=args.max_length, chat_template=name, strict=False)
                summary = prepare_sft(config)
                seconds = summary.seconds["read+tokenize"]
                best[name] = min(best.get(name, seconds), seconds)
                counts[name] = summary.counts
                shutil.rmtree(out)
    header = f"{'template':<10} {'conversations':>13} {'tokens':>10} {'read+tok s':>10} {'conv/s':>8} {'vs llama3':>9}"
    print(header)
    print("-" * len(header))
    for name in TEMPLATES:
        c, s = counts[name], best[name]
        print(f"{name:<10} {c.documents_in:>13,} {c.tokens_out:>10,} {s:>10.2f} {c.documents_in / s:>8,.0f} "
              f"{s / best['llama3']:>8.2f}x")
    print(f"(SmolLM2 tokenizer; chatterbot en+zh x {args.copies}; best of {args.repeats}; skipped rows: "
          f"{sum(counts['llama3'].skipped.values())})")


if __name__ == "__main__":
    main()
