"""Bits/char evaluation as the held-out file grows: what the evaluation holds in host memory besides the model.

    .venv/bin/python benchmarks/eval_scale.py [--copies 1,4,16] [--chunk_tokens 16777216]

The held-out file is the whole People's Daily corpus (real Chinese news, 19,484 paragraphs) written 1x, 4x, 16x
over; the tokenizer is Mistral-7B's; windows of 1024 tokens, stride 512 (``evaluate.py bpc``'s defaults). Each
(size, way) runs once in a fresh process and does everything ``bpc`` does before and between forward passes
(read, tokenise, cut into windows, sort them longest first), no forward: the forward's memory is per batch, the
same at every size (``benchmarks/eval_memory.py``). The ways:

- ``whole file`` (how ``bpc`` held its input before it streamed): every text in a list, each tokenised alone,
  every window as Python lists of input ids and labels, then sorted;
- ``streamed`` (what ``bpc`` does): texts read from the file a chunk at a time (``--chunk_tokens``, the command's
  default), tokenised 256 a call, held as int32 arrays, windows as offsets into them; a chunk is dropped before
  the next is read.

Prints the peak memory each adds over the loaded tokenizer (``ru_maxrss``), the seconds, and the windows (equal for
both ways: the same windows, held differently).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from colossal_llama.utils.paths import data_root

CORPUS = data_root() / "pretrain" / "zh_news_peoples_daily_199801.jsonl"
WINDOW, STRIDE = 1024, 512


def _whole_file(path: str, tokenizer) -> tuple[int, int]:
    from colossal_llama.eval.bits_per_char import load_texts, sliding_windows

    texts, _ = load_texts(path, "target")
    pieces, tokens = [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens += len(ids)
        pieces.extend(sliding_windows(ids, tokenizer.bos_token_id, WINDOW, STRIDE))
    pieces.sort(key=lambda p: -len(p[0]))
    return tokens, len(pieces)


def _streamed(path: str, tokenizer, chunk_tokens: int) -> tuple[int, int]:
    from colossal_llama.eval.bits_per_char import chunk_windows, iter_chunks, iter_texts

    tokens = windows = 0
    for chunk in iter_chunks(iter_texts(path, "target"), tokenizer, tokenizer.bos_token_id, chunk_tokens):
        tokens += chunk.tokens
        windows += len(chunk_windows(chunk, WINDOW, STRIDE))
    return tokens, windows


def measure(path: str, way: str, chunk_tokens: int) -> dict:
    """One way in this process: extra peak RSS (MB) over the loaded tokenizer, seconds, tokens and windows."""
    from colossal_llama.tokenizer.loading import load_tokenizer

    tokenizer = load_tokenizer(data_root() / "tokenizers" / "mistral-7b-v0.1")
    tokenizer("warm-up", add_special_tokens=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    tokens, windows = _whole_file(path, tokenizer) if way == "whole file" else _streamed(path, tokenizer, chunk_tokens)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"extra_mb": peak - before, "seconds": seconds, "tokens": tokens, "windows": windows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", default="1,4,16", help="held-out file = the corpus written this many times over")
    p.add_argument("--chunk_tokens", type=int, default=1 << 24)
    p.add_argument("--measure", nargs=3, metavar=("DATA", "WAY", "CHUNK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        data, way, chunk = args.measure
        print(json.dumps(measure(data, way, int(chunk))))
        return
    print("| held-out file | tokens | way | extra peak memory | seconds | windows | memory vs whole file |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for copies in (int(c) for c in args.copies.split(",")):
            data = Path(tmp) / f"heldout-{copies}x.jsonl"
            with open(data, "wb") as fh:
                for _ in range(copies):
                    fh.write(CORPUS.read_bytes())
            rows = {}
            for way in ("whole file", "streamed"):
                out = subprocess.run([sys.executable, __file__, "--measure", str(data), way, str(args.chunk_tokens)],
                                     capture_output=True, text=True, check=True)
                rows[way] = json.loads(out.stdout.strip().splitlines()[-1])
            if rows["whole file"]["windows"] != rows["streamed"]["windows"]:
                print(f"!! {copies}x: the ways cut different windows: {rows}")
            size = f"{copies}x ({data.stat().st_size / 1e6:.0f} MB)"
            for way, r in rows.items():
                print(f"| {size} | {r['tokens']:,} | {way} | {r['extra_mb']:,.0f} MB | {r['seconds']:.1f} | "
                      f"{r['windows']:,} | {r['extra_mb'] / rows['whole file']['extra_mb']:.2f}x |")
            data.unlink()
    print(f"(streamed: {args.chunk_tokens:,} tokens a chunk; Mistral-7B tokenizer; window {WINDOW}, stride {STRIDE})")


if __name__ == "__main__":
    main()
