"""Training-step memory of the loss: transformers' loss over the full logits vs scored positions in chunks.

    .venv/bin/python benchmarks/train_loss_memory.py [--model_path DIR] [--shapes 1x2048,1x4096] [--vocabs 49152,128256]

One training micro-step (forward and backward, float32, 2 CPU threads, activation checkpointing on as for long
sequences) of SmolLM2-135M on real text (the English novel and Chinese news of the data folder, every token
scored, as in pre-training), each way in a fresh process:
``--loss_chunk_tokens 0`` (transformers: the ``(tokens x vocab)`` logits, upcast, log-softmax kept for backward)
and the default (``colossal_llama/model/scored_loss.py``: the LM head on scored positions, a chunk at a time,
recomputed in backward). Vocabulary 49,152 is the real model; 128,256 (LLaMA-3's) is the same shape built from
its config with that vocabulary (random weights: memory and time do not depend on the values). Prints the peak
memory the step adds over the loaded model (the process's high-water mark, ``ru_maxrss``), its seconds and loss;
a step the kernel kills for memory is a row that says so.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time

import torch

from colossal_llama.utils.paths import REPO_ROOT, data_root

REAL_VOCAB = 49_152


def _token_ids(tokenizer, n: int) -> torch.Tensor:
    """The first ``n`` tokens of the real texts, concatenated (the novel, then the news)."""
    from colossal_llama.eval.bits_per_char import iter_texts

    ids = []
    for name in ("en_novel_botchan.jsonl", "zh_news_peoples_daily_199801.jsonl"):
        for text in iter_texts(data_root() / "pretrain" / name, "target"):
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(ids) >= n:
                return torch.tensor(ids[:n])
    raise SystemExit(f"the data folder has fewer than {n} tokens")


def _model(model_path: str, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    if vocab == REAL_VOCAB:
        return AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa")
    config = AutoConfig.from_pretrained(model_path)
    config.vocab_size = vocab
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _step(model, input_ids: torch.Tensor) -> float:
    loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def measure(model_path: str, way: str, vocab: int, batch: int, length: int) -> dict:
    """One step in this process: extra peak RSS (MB) over the loaded model, seconds, loss."""
    from colossal_llama.model.scored_loss import default_chunk_tokens, install_scored_loss
    from colossal_llama.tokenizer.loading import load_tokenizer

    torch.set_num_threads(2)
    model = _model(model_path, vocab)
    model.train()  # from_pretrained returns it in eval mode, where transformers skips the checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    chunk = default_chunk_tokens(vocab)
    if way == "chunked":
        install_scored_loss(model, chunk)
    input_ids = _token_ids(load_tokenizer(model_path), batch * length).view(batch, length)
    _step(model, input_ids[:1, :64])  # warm-up: kernels, allocator, gradient buffers
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    loss = _step(model, input_ids)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"extra_mb": peak - before, "seconds": seconds, "loss": loss, "chunk": chunk}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=str(REPO_ROOT / ".cache" / "smollm2-135m-instruct"))
    p.add_argument("--shapes", default="1x2048,1x4096", help="BATCHxLENGTH, comma-separated")
    p.add_argument("--vocabs", default=f"{REAL_VOCAB},128256", help="vocabulary sizes, comma-separated")
    p.add_argument("--measure", nargs=4, metavar=("WAY", "VOCAB", "BATCH", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        way, vocab, batch, length = args.measure
        print(json.dumps(measure(args.model_path, way, int(vocab), int(batch), int(length))))
        return
    print("| vocabulary | batch x length | loss | extra peak memory | seconds | loss value | memory vs full "
          "| time vs full |")
    print("|---|---|---|---|---|---|---|---|")
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for shape in args.shapes.split(","):
            batch, length = (int(x) for x in shape.split("x"))
            rows = {}
            for way in ("full", "chunked"):
                out = subprocess.run([sys.executable, __file__, "--model_path", args.model_path, "--measure", way,
                                      str(vocab), str(batch), str(length)], capture_output=True, text=True)
                if out.returncode == -signal.SIGKILL:
                    rows[way] = None
                    continue
                if out.returncode != 0:
                    raise SystemExit(f"{way} {vocab} {shape} failed:\n{out.stderr[-3000:]}")
                rows[way] = json.loads(out.stdout.strip().splitlines()[-1])
            base = rows["full"]
            for way, r in rows.items():
                if r is None:
                    print(f"| {vocab:,} | {batch} x {length} | {way} | killed: out of memory | - | - | - | - |")
                    continue
                name = "full logits" if way == "full" else f"scored positions, {r['chunk']:,} a call"
                ratios = (f"{r['extra_mb'] / base['extra_mb']:.2f}x | {r['seconds'] / base['seconds']:.2f}x"
                          if base else "- | -")
                print(f"| {vocab:,} | {batch} x {length} | {name} | {r['extra_mb']:,.0f} MB | {r['seconds']:.1f} | "
                      f"{r['loss']:.6f} | {ratios} |")
    print(f"(SmolLM2-135M's shape, 30 layers, activation checkpointing, float32, 2 CPU threads, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB of memory; {args.model_path})")


if __name__ == "__main__":
    main()
