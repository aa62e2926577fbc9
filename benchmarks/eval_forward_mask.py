"""Evaluation runs right-padded batches without an attention mask: this checks that is exact, and what it costs.

    .venv/bin/python benchmarks/eval_forward_mask.py [--model_path DIR] [--repeats 3]

Prints, for a few (batch, length) shapes of the real SmolLM2-135M on CPU, the best-of-N seconds per forward
with and without a mask (one row right-padded to half length), and the largest logit difference at real
positions, which must be 0: with right padding the causal mask alone keeps real tokens from seeing pads.
"""
from __future__ import annotations

import argparse
import time

import torch

from colossal_llama.inference.loading import load_model_and_tokenizer
from colossal_llama.utils.paths import REPO_ROOT


def timed_forward(model, ids, mask, repeats: int):
    best, logits = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits
        best = min(best, time.perf_counter() - start)
    return best, logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=str(REPO_ROOT / ".cache" / "smollm2-135m-instruct"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model, _ = load_model_and_tokenizer(args.model_path, device="cpu")
    print(f"{'batch':>5} {'length':>6} {'no mask s':>10} {'mask s':>8} {'slowdown':>8} {'max |diff|':>10}")
    for batch, length in [(1, 256), (4, 256), (8, 128)]:
        ids = torch.randint(100, 40000, (batch, length))
        mask = torch.ones_like(ids)
        mask[0, length // 2:] = 0  # one right-padded row, as in a real eval batch
        plain_s, plain = timed_forward(model, ids, None, args.repeats)
        masked_s, masked = timed_forward(model, ids, mask, args.repeats)
        real = mask.bool()
        diff = (plain[real] - masked[real]).abs().max().item()
        print(f"{batch:>5} {length:>6} {plain_s:>10.3f} {masked_s:>8.3f} {masked_s / plain_s:>7.1f}x {diff:>10.2e}")


if __name__ == "__main__":
    main()
