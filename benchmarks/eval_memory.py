"""Evaluation memory: the LM head on scored positions in chunks (``eval/batching.py``) vs full logits.

    .venv/bin/python benchmarks/eval_memory.py [--model_path DIR] [--shapes 4x1024,8x1024,16x1024]

For each (batch, window) shape, bits/char scoring of real text windows (Botchan, stride window/2, so after the
first window of a text half the positions are scored) runs once each way, each in a fresh process: the previous
way (``model(input_ids).logits`` for every position, upcast, ``cross_entropy``) and the current one. Prints the
peak memory the scoring adds over the loaded model (the process's high-water mark, ``ru_maxrss``), the seconds,
the bits, and their relative error against the exact bits of the same logits (softmax in float64).
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from colossal_llama.utils.paths import REPO_ROOT, data_root


def _windows(tokenizer, batch: int, window: int) -> list:
    from colossal_llama.eval.bits_per_char import load_texts, sliding_windows

    texts, _ = load_texts(data_root() / "pretrain" / "en_novel_botchan.jsonl", "target")
    ids = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    pieces = sliding_windows(ids, tokenizer.bos_token_id, window, window // 2)
    return pieces[1: batch + 1]  # full-length windows, half of each scored


def _full_logits_bits(model, batch, pad_id: int) -> float:
    """The previous scoring: logits at every position, then ``cross_entropy`` over the whole batch."""
    from colossal_llama.eval.batching import right_pad
    from colossal_llama.utils.labels import IGNORE_INDEX

    input_ids = right_pad([inp for inp, _ in batch], pad_id)
    labels = right_pad([lab for _, lab in batch], IGNORE_INDEX)
    with torch.inference_mode():
        logits = model(input_ids=input_ids).logits
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                              reduction="sum")
    return nll.item() / math.log(2)


def _exact_bits(model, batch, pad_id: int) -> float:
    """The reference: the same float32 logits, normalised in float64 (one row at a time, to bound memory)."""
    from colossal_llama.eval.batching import right_pad
    from colossal_llama.utils.labels import IGNORE_INDEX

    input_ids = right_pad([inp for inp, _ in batch], pad_id)
    labels = right_pad([lab for _, lab in batch], IGNORE_INDEX)
    nats = 0.0
    with torch.inference_mode():
        hidden = model.get_decoder()(input_ids=input_ids)[0]
        for row, row_labels in zip(hidden, labels):
            logprobs = torch.log_softmax(model.get_output_embeddings()(row[:-1]).double(), dim=-1)
            scored = row_labels[1:] != IGNORE_INDEX
            nats -= logprobs[scored].gather(-1, row_labels[1:][scored, None]).sum().item()
    return nats / math.log(2)


def measure(model_path: str, way: str, batch: int, window: int) -> dict:
    """One scoring in this process: extra peak RSS (MB) over the loaded model, seconds, bits."""
    from colossal_llama.eval.bits_per_char import window_nll_bits
    from colossal_llama.inference.loading import load_model_and_tokenizer

    torch.set_num_threads(2)
    model, tokenizer = load_model_and_tokenizer(model_path, device="cpu")
    pieces = _windows(tokenizer, batch, window)
    score = _full_logits_bits if way == "full logits" else window_nll_bits
    score(model, pieces[:1], tokenizer.pad_token_id)  # warm-up on one row
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    bits = score(model, pieces, tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    exact = _exact_bits(model, pieces, tokenizer.pad_token_id)  # after the peak was read
    return {"extra_mb": peak - before, "seconds": seconds, "bits": bits, "error": bits / exact - 1,
            "vocab": len(tokenizer)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=str(REPO_ROOT / ".cache" / "smollm2-135m-instruct"))
    p.add_argument("--shapes", default="4x1024,8x1024,16x1024", help="BATCHxWINDOW, comma-separated")
    p.add_argument("--measure", nargs=3, metavar=("WAY", "BATCH", "WINDOW"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        way, batch, window = args.measure
        print(json.dumps(measure(args.model_path, way, int(batch), int(window))))
        return
    print("| batch x window | way | extra peak memory | seconds | bits | vs exact | memory vs full logits | time vs full |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        batch, window = (int(x) for x in shape.split("x"))
        rows = {}
        for way in ("full logits", "scored positions, chunked"):
            out = subprocess.run([sys.executable, __file__, "--model_path", args.model_path, "--measure", way,
                                  str(batch), str(window)], capture_output=True, text=True, check=True)
            rows[way] = json.loads(out.stdout.strip().splitlines()[-1])
        base = rows["full logits"]
        for way, r in rows.items():
            print(f"| {batch} x {window} | {way} | {r['extra_mb']:,.0f} MB | {r['seconds']:.2f} | {r['bits']:,.2f} | "
                  f"{r['error']:+.1e} | {r['extra_mb'] / base['extra_mb']:.2f}x | {r['seconds'] / base['seconds']:.2f}x |")
    print(f"(vocabulary {base['vocab']:,}; {args.model_path})")


if __name__ == "__main__":
    main()
