"""Bits/char under torchrun: the seconds each process spends reading and tokenising the held-out texts, when every
process tokenises every text (how ``evaluate.py bpc`` did it before) and when they tokenise in turn (what it does).

    .venv/bin/python benchmarks/eval_tokenise_ranks.py [--processes 1,2,4] [--copies 1] [--repeats 5]

The held-out file is the whole People's Daily corpus (real Chinese news, 19,484 paragraphs) written ``--copies``
times over; the tokenizer is Mistral-7B's. For each number of processes N (real processes in a gloo group, as
torchrun makes them) both ways run in the same processes, one after the other, through ``iter_chunks``: read the
file, tokenise, cut into chunks (``evaluate.py bpc``'s default of 16M tokens), no model. Each process gets its
share of this machine's cores for the tokenizer's threads (``RAYON_NUM_THREADS`` = cores // N). Prints the CPU
seconds (every thread of the process) and wall seconds of the process that took longest, each way, their ratios,
and the texts each process tokenised; ``!!`` if the ways' chunks differ. This machine's speed swings from minute
to minute: each N runs ``--repeats`` times, the ways' order alternating, and the medians are shown.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import statistics
import tempfile
import time
from pathlib import Path

from colossal_llama.utils.paths import data_root

CORPUS = data_root() / "pretrain" / "zh_news_peoples_daily_199801.jsonl"
CHUNK_TOKENS = 1 << 24
WAYS = ("every process", "in turn")


def _one_way(path: str, tokenizer, ranks) -> dict:
    """Wall and CPU seconds (every thread of this process), texts tokenised here, tokens and a digest of every
    chunk, for ``iter_chunks`` over ``path``."""
    from colossal_llama.eval.bits_per_char import iter_chunks, iter_texts

    calls = []

    def counting(texts, **kwargs):
        calls.append(len(texts))
        return tokenizer(texts, **kwargs)

    digest, tokens = hashlib.sha256(), 0
    ranks.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    for chunk in iter_chunks(iter_texts(path, "target"), counting, tokenizer.bos_token_id, CHUNK_TOKENS, ranks):
        tokens += chunk.tokens
        for ids in chunk.ids:
            digest.update(ids.tobytes())
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"seconds": seconds, "cpu": cpu, "texts": sum(calls), "tokens": tokens, "digest": digest.hexdigest()}


def _rank_main(rank: int, size: int, port: int, path: str, out_dir: str, order: tuple) -> None:
    os.environ["RAYON_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // size))
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    import torch.distributed as dist

    from colossal_llama.tokenizer.loading import load_tokenizer
    from colossal_llama.utils.ranks import Ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    ranks = Ranks(rank, size)
    tokenizer = load_tokenizer(data_root() / "tokenizers" / "mistral-7b-v0.1")
    tokenizer(["warm-up"], add_special_tokens=False)
    # "every process": a world of one in each process, so each tokenises every text
    results = {way: _one_way(path, tokenizer, Ranks() if way == "every process" else ranks) for way in order}
    ranks.barrier()
    dist.destroy_process_group()
    Path(out_dir, f"{rank}.pkl").write_bytes(pickle.dumps(results))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(path: str, size: int, order: tuple) -> list:
    """Both ways in ``size`` fresh processes, in ``order``; each process's results."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(size, _free_port(), path, out_dir, order), nprocs=size, join=True)
        return [pickle.loads(Path(out_dir, f"{r}.pkl").read_bytes()) for r in range(size)]


def median_run(path: str, size: int, repeats: int) -> dict:
    """``{way: (cpu, wall, per-process results)}``: per way, the largest CPU and wall seconds over the processes
    of a run, the median over ``repeats`` runs (the ways' order alternating from run to run)."""
    runs = [measure(path, size, WAYS if k % 2 == 0 else WAYS[::-1]) for k in range(repeats)]
    out = {}
    for way in WAYS:
        per_run = [[process[way] for process in run] for run in runs]
        cpu = statistics.median(max(r["cpu"] for r in rs) for rs in per_run)
        wall = statistics.median(max(r["seconds"] for r in rs) for rs in per_run)
        out[way] = (cpu, wall, per_run[0])
    if len({r["digest"] for rs in (v[2] for v in out.values()) for r in rs}) != 1:
        print(f"!! {size} processes: the chunks differ between ways or processes")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", default="1,2,4", help="numbers of processes, comma-separated")
    p.add_argument("--copies", type=int, default=1, help="held-out file = the corpus written this many times over")
    p.add_argument("--max_lines", type=int, default=None, help="only the corpus's first lines (for a quick run)")
    p.add_argument("--repeats", type=int, default=5, help="runs per number of processes (the median is shown)")
    args = p.parse_args()
    lines = CORPUS.read_bytes().splitlines(keepends=True)[:args.max_lines]
    print("| processes | tokens | CPU s a process: every process tokenises all -> in turn | ratio "
          "| wall s: every process -> in turn | ratio | texts tokenised per process -> in turn |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "heldout.jsonl"
        data.write_bytes(b"".join(lines) * args.copies)
        for size in (int(n) for n in args.processes.split(",")):
            run = median_run(str(data), size, args.repeats)
            (cpu0, wall0, every), (cpu1, wall1, in_turn) = run["every process"], run["in turn"]
            texts = "/".join(f"{r['texts']:,}" for r in in_turn)
            print(f"| {size} | {in_turn[0]['tokens']:,} | {cpu0:.2f} -> {cpu1:.2f} | {cpu1 / cpu0:.2f}x | "
                  f"{wall0:.2f} -> {wall1:.2f} | {wall1 / wall0:.2f}x | {every[0]['texts']:,} -> {texts} |")
    print(f"(People's Daily x{args.copies}, Mistral-7B tokenizer, {os.cpu_count()} cores, RAYON_NUM_THREADS = "
          f"cores // processes; the largest over a run's processes, median of {args.repeats} runs. With more "
          "processes than cores they take turns on the cores: the CPU seconds say what each does)")


if __name__ == "__main__":
    main()
