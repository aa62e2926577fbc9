"""Replies to a file of prompts, as a job: batches dealt out over the launcher's processes, progress kept on disk, and
the reply file (``--output``, ``{"prompt", "response"}`` rows in the prompts' order) published whole at the end.

A job over thousands of prompts on a large model runs for hours, so a crash must not lose it. Every process appends
the replies of each finished batch to its progress file beside the output, ``.NAME.progress-RRRRR-of-NNNNN.jsonl``
(rows ``{"index", "prompt", "response"}``). Run the same command again and the prompts already answered are read
back (from the progress files of any number of processes; a row cut short by the crash is dropped and counted) and
only the others are generated; a progress row whose prompt is not the prompt at its index in ``--input_txt`` stops
the run (the prompts file changed: ``--overwrite`` starts afresh). When every reply is in, rank 0 writes the output
(to a hidden sibling, then renamed) and removes the progress files.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.ranks import Ranks

log = logging.getLogger(__name__)


def progress_files(target: Path) -> List[Path]:
    """The progress files of ``target`` left by any run, of any number of processes."""
    return sorted(target.parent.glob(f".{target.name}.progress-*-of-*.jsonl"))


def progress_file(target: Path, ranks: Ranks) -> Path:
    return target.with_name(f".{target.name}.progress-{ranks.rank:05d}-of-{ranks.size:05d}.jsonl")


def read_progress(target: Path, prompts: Sequence[str]) -> Tuple[Dict[int, str], int]:
    """Replies already written by earlier runs: ``({prompt index: reply}, rows cut short)``."""
    done: Dict[int, str] = {}
    cut = 0
    for path in progress_files(target):
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                try:
                    row = json.loads(line)
                    index, prompt, reply = int(row["index"]), row["prompt"], row["response"]
                except (ValueError, KeyError, TypeError):
                    cut += 1  # the crash cut this row short (it is the last one of its file)
                    continue
                if not 0 <= index < len(prompts) or prompts[index] != prompt:
                    raise UserInputError(f"{path}:{line_no}: prompt: not prompt {index + 1} of --input_txt (the "
                                         "prompts changed since the interrupted run; pass --overwrite to start afresh)")
                done[index] = reply
    return done, cut


def prepare(target: Path, prompts: Sequence[str], overwrite: bool, ranks: Ranks) -> Dict[int, str]:
    """Before generating: with ``overwrite`` rank 0 removes earlier progress; then every process reads what is left.
    Returns the replies already done."""
    if ranks.is_main:
        target.parent.mkdir(parents=True, exist_ok=True)
        for path in progress_files(target) if overwrite else ():
            path.unlink()
    ranks.barrier()
    done, cut = read_progress(target, prompts)
    if done and ranks.is_main:
        log.info("resuming %s: %d of %d replies from an interrupted run%s", target, len(done), len(prompts),
                 f" ({cut} row(s) cut short by the interruption dropped)" if cut else "")
    return done


def generate_replies(model, tokenizer, sampling, prompts: Sequence[str], encoded: List[List[int]], batch_size: int,
                     ranks: Ranks, done: Dict[int, str], progress: Optional[Path]) -> Tuple[List[str], int, float]:
    """Every prompt's reply, in the prompts' order, with the new tokens and seconds spent here (all processes).

    The prompts not in ``done`` are batched longest first (a batch pads little) and dealt out over ``ranks``; each
    finished batch is appended to ``progress`` when given. A progress bar with the rate on rank 0."""
    from tqdm.auto import tqdm

    from colossal_llama.inference.generation import generate_batch

    order = sorted((i for i in range(len(encoded)) if i not in done), key=lambda i: -len(encoded[i]))
    mine = ranks.share_batches(order, batch_size)
    replies: Dict[int, str] = {}
    new_tokens, start = 0, time.perf_counter()
    fh = open(progress, "a", encoding="utf-8") if progress is not None else None
    try:
        with tqdm(total=sum(map(len, mine)), unit="prompt", desc="generate", disable=not ranks.is_main) as bar:
            for batch in mine:
                for i, ids in zip(batch, generate_batch(model, tokenizer, [encoded[i] for i in batch], sampling)):
                    replies[i], new_tokens = tokenizer.decode(ids, skip_special_tokens=True), new_tokens + len(ids)
                if fh is not None:
                    fh.writelines(json.dumps({"index": i, "prompt": prompts[i], "response": replies[i]},
                                             ensure_ascii=False) + "\n" for i in batch)
                    fh.flush()
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):,.0f}")
    finally:
        if fh is not None:
            fh.close()
    merged = {**done, **ranks.merge(replies)}
    (total_tokens,) = ranks.sum([new_tokens])
    return [merged[i] for i in range(len(encoded))], int(total_tokens), time.perf_counter() - start


def publish(target: Path, prompts: Sequence[str], replies: Sequence[str]) -> None:
    """Write the reply file (a hidden sibling renamed into place), then remove the progress files (rank 0, after
    every process has closed its own)."""
    from colossal_llama.utils.output import tmp_sibling

    partial = tmp_sibling(target, "partial")
    with open(partial, "w", encoding="utf-8") as fh:
        for prompt, reply in zip(prompts, replies):
            fh.write(json.dumps({"prompt": prompt, "response": reply}, ensure_ascii=False) + "\n")
    os.replace(partial, target)
    for path in progress_files(target):
        path.unlink()
