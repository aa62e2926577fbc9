"""Batched generation for a file of prompts (``inference_example.py --batch_size N --output F``) vs one at a time.

    .venv/bin/python benchmarks/generation_batch.py [--model_path DIR] [--prompts 32] [--batch_sizes 1,4,16]
                                                    [--max_new_tokens 48] [--device cpu]

The prompts are the first distinct human questions of the bundled ChatterBot SFT data (real chat questions),
wrapped in the model's chat template, answered greedily, so every batch size gives the same replies (checked: a
row that differs is reported). Each batch size runs what ``--output`` runs (``reply_file.run_job``, batches
longest prompt first). Prints, per batch size, the seconds, new tokens per second and the speed-up over one prompt
at a time, from one run on one machine.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import List

from colossal_llama.utils.paths import data_root
from colossal_llama.utils.ranks import Ranks


def questions(count: int) -> List[str]:
    seen: List[str] = []
    with open(data_root() / "sft" / "chatterbot_en.jsonl", encoding="utf-8") as fh:
        for line in fh:
            question = json.loads(line)["messages"][0]["content"].strip()
            if question not in seen:
                seen.append(question)
            if len(seen) == count:
                break
    return seen


def main() -> None:
    import torch

    from colossal_llama.inference.generation import SamplingConfig
    from colossal_llama.inference.loading import load_model_and_tokenizer
    from colossal_llama.inference.prompting import resolve_chat_template, sft_prompt_ids
    from colossal_llama.inference.reply_file import Prompts, run_job
    from colossal_llama.utils.paths import REPO_ROOT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default=str(REPO_ROOT / ".cache" / "smollm2-135m-instruct"))
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch_sizes", default="1,4,16")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model_path, device=args.device)
    template = resolve_chat_template(args.model_path, tokenizer)
    config = SamplingConfig(args.max_new_tokens, do_sample=False, stop_token_ids=list(template.stop_token_ids))
    texts = questions(args.prompts)
    prompts = [sft_prompt_ids(template, q) for q in texts]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as fh:
        fh.write("\n".join(texts) + "\n")
    prompt_file = Prompts.read(fh.name)
    device = torch.cuda.get_device_name() if model.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), greedy, at most "
          f"{args.max_new_tokens} new tokens, {device}\n")
    print("| batch size | seconds | new tokens/s | speed-up | replies equal to batch 1 |")
    print("|---|---|---|---|---|")
    baseline = reference = None
    for size in [int(s) for s in args.batch_sizes.split(",")]:
        rows = []
        stats = run_job(model, tokenizer, config, prompt_file, lambda q: sft_prompt_ids(template, q), size, 4096,
                        Ranks(), rows.extend)
        replies, tokens, seconds = [reply for _, reply in rows], stats.new_tokens, stats.seconds
        baseline, reference = baseline or seconds, reference or replies
        same = sum(a == b for a, b in zip(replies, reference))
        print(f"| {size} | {seconds:.1f} | {tokens / seconds:,.1f} | {baseline / seconds:.2f}x | "
              f"{same} of {len(prompts)} |", flush=True)
    os.unlink(fh.name)


if __name__ == "__main__":
    main()
