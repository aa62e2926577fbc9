"""Replies to a file of prompts, as a job: the prompts read a chunk at a time, each chunk's batches dealt out over the
launcher's processes, and the reply file (``--output``, ``{"prompt", "response"}`` rows in the prompts' order)
written a chunk at a time as the job goes, so memory does not grow with the prompts file.

A chunk is ``--chunk_prompts`` consecutive prompts: encoded, batched longest first (a batch pads little), the
batches dealt out, generated; then rank 0 gathers the chunk's replies and appends them, in order, to the hidden
``.NAME.partial`` beside the output, or prints them (under a launcher, without ``--output``). When every chunk is
in, the partial file is renamed to the output.

A job over millions of prompts runs for hours, so a crash must not lose it. Every process also appends the replies of
each finished batch to its progress file, ``.NAME.progress-RRRRR-of-NNNNN.jsonl`` (rows ``{"index", "prompt",
"response"}``). Run the same command again: the rows of the partial file count as done (a row cut short by the crash
is dropped), the progress rows past them are read back (from any number of processes' files; a cut row is dropped
and counted), and only the other prompts are generated. A written row whose prompt is not the prompt at its place in
``--input_txt`` stops the run (the prompts file changed: ``--overwrite`` starts afresh). So does a rerun with other
settings (model, tokenizer, prompt style, chat template, system message, sampling flags): the job's settings are
recorded in ``.NAME.settings.json`` when it starts, so that one file never mixes the replies of two models.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from colossal_llama.utils.durable import publish_file, replace_file
from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.ranks import Ranks

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- the prompts
def _looks_like_a_path(text: str) -> bool:
    """One word that names a folder or ends like a file of prompts (``prompts.txt``, ``data/q.jsonl``)."""
    return bool(text) and not any(c.isspace() for c in text) and (
        os.sep in text or Path(text).suffix.lower() in (".txt", ".jsonl", ".json", ".md", ".csv", ".tsv"))


@dataclass(frozen=True)
class Prompts:
    """``--input_txt``: one prompt per non-blank line of a file, read as the job goes, or the literal text itself
    when it is not a file. ``count`` comes from a first pass that checks the whole file before any model loads."""

    input_txt: str
    path: Optional[Path]
    count: int

    @classmethod
    def read(cls, input_txt: str) -> "Prompts":
        path = Path(input_txt)
        try:
            is_file = path.is_file()
        except OSError:  # e.g. a literal prompt longer than the OS path limit
            is_file = False
        if not is_file:
            if _looks_like_a_path(input_txt):  # a mistyped file name would get one reply to its own name
                log.warning("--input_txt %r: no such file, so it is taken as the prompt itself", input_txt)
            return cls(input_txt, None, 1)
        count = sum(1 for _ in _prompt_lines(path))
        if not count:
            raise UserInputError(f"{path}: --input_txt file holds no prompt")
        return cls(input_txt, path, count)

    def __iter__(self) -> Iterator[str]:
        return (prompt for _, prompt in self.located())

    def located(self) -> Iterator[Tuple[str, str]]:
        """``(where, prompt)``: ``where`` is ``file:line`` (``--input_txt`` for a literal prompt), for errors."""
        if self.path is None:
            return iter([("--input_txt", self.input_txt)])
        return ((f"{self.path}:{line_no}", line) for line_no, line in _prompt_lines(self.path))

    def chunks(self, size: int) -> Iterator[Tuple[int, List[str]]]:
        """``(index of the first prompt, prompts)`` of consecutive chunks of ``size`` prompts (the last shorter)."""
        prompts, start = iter(self), 0
        while True:
            chunk = list(itertools.islice(prompts, size))
            if not chunk:
                return
            yield start, chunk
            start += len(chunk)


def _prompt_lines(path: Path) -> Iterator[Tuple[int, str]]:
    """``(line number, line)`` of the stripped non-blank lines of ``path``; a line that is not UTF-8 is an error
    naming it."""
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise UserInputError(f"{path}:{line_no}: not valid UTF-8 ({err.reason})") from None
            if line:
                yield line_no, line


# ---------------------------------------------------------------------------------------------- files beside the output
def progress_files(target: Path) -> List[Path]:
    """The progress files of ``target`` left by any run, of any number of processes."""
    return sorted(target.parent.glob(f".{target.name}.progress-*-of-*.jsonl"))


def progress_file(target: Path, ranks: Ranks) -> Path:
    return target.with_name(f".{target.name}.progress-{ranks.rank:05d}-of-{ranks.size:05d}.jsonl")


def partial_file(target: Path) -> Path:
    """The output being written, whole chunks in order, renamed to ``target`` when complete."""
    return target.with_name(f".{target.name}.partial")


def settings_file(target: Path) -> Path:
    """The settings of the job writing ``target`` (:func:`check_settings`), removed when it is published."""
    return target.with_name(f".{target.name}.settings.json")


def interrupted_files(target: Path) -> List[Path]:
    """What an interrupted run writing ``target`` left: its progress files and partial output."""
    partial = partial_file(target)
    return [*progress_files(target), *([partial] if partial.exists() else [])]


def check_resumable(target: Path, settings: dict, overwrite: bool) -> None:
    """Before the model loads: a run that will resume an interrupted one (it left files, no ``overwrite``) must
    have its settings (:func:`check_settings`)."""
    if not overwrite and interrupted_files(target):
        check_settings(target, settings)


def check_settings(target: Path, settings: dict) -> None:
    """Resuming: the interrupted run's recorded settings must be ``settings``, else a one-line error naming the
    first that differs (its replies would sit beside replies of another model or other sampling)."""
    path = settings_file(target)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"--output {target}: an interrupted run's replies are there but not its settings "
                             f"({path.name} is missing); pass --overwrite to start afresh") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UserInputError(f"{path}: not a settings file ({err}); pass --overwrite to start afresh") from None
    for key, value in settings.items():
        if saved.get(key) != value:
            raise UserInputError(f"{path}: the interrupted run used --{key} {saved.get(key)!r}, this run {value!r} "
                                 "(the file would mix their replies); rerun with its settings, or pass --overwrite "
                                 "to start afresh")


def _changed(path: Path, line_no: int, index: int) -> UserInputError:
    return UserInputError(f"{path}:{line_no}: prompt: not prompt {index + 1} of --input_txt (the prompts changed "
                          "since the interrupted run; pass --overwrite to start afresh)")


def _cut_after_last_line(path: Path, block: int = 1 << 16) -> None:
    """Rank 0: cut ``path`` after its last complete line (a row the crash cut short is dropped), reading only its
    tail, a block at a time backwards (the file may be the replies to millions of prompts)."""
    with open(path, "rb+") as fh:
        end = fh.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - block)
            fh.seek(start)
            newline = fh.read(end - start).rfind(b"\n")
            if newline >= 0:
                fh.truncate(start + newline + 1)
                return
            end = start
        fh.truncate(0)


@dataclass
class Resumed:
    """What an interrupted run left: the first ``written`` prompts are in the partial file; ``done`` has replies
    of later prompts from the progress files, ``{index: (prompt, reply, file, line)}``."""

    written: int = 0
    done: Dict[int, tuple] = field(default_factory=dict)
    cut: int = 0  # progress rows cut short by the interruption

    def reply_of(self, index: int, prompt: str) -> Optional[str]:
        """The reply read back for prompt ``index``, checked against the prompt now at that place."""
        if index not in self.done:
            return None
        saved, reply, path, line_no = self.done[index]
        if saved != prompt:
            raise _changed(path, line_no, index)
        return reply


def read_progress(target: Path, written: int) -> Resumed:
    """The progress rows past the first ``written`` prompts (the partial file holds those)."""
    resumed = Resumed(written)
    for path in progress_files(target):
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                try:
                    row = json.loads(line)
                    index, prompt, reply = int(row["index"]), row["prompt"], row["response"]
                except (ValueError, KeyError, TypeError):
                    resumed.cut += 1  # the crash cut this row short (it is the last one of its file)
                    continue
                if index >= written:
                    resumed.done[index] = (prompt, reply, path, line_no)
    return resumed


def prepare(target: Path, prompts: Prompts, overwrite: bool, ranks: Ranks, settings: Optional[dict] = None
            ) -> Resumed:
    """Before generating: with ``overwrite`` rank 0 removes an earlier run's files; an interrupted run's files must
    have been written with ``settings`` (:func:`check_settings`), else ``settings`` are recorded; rank 0 cuts the
    partial file after its last whole row; then every process reads what is done and checks it against the prompts
    (the files beside the output are on a file system every process sees, as the output is)."""
    partial, interrupted = partial_file(target), interrupted_files(target)
    if settings is not None:
        check_resumable(target, settings, overwrite)  # every process: each stops with the same one-line error
    if ranks.is_main:
        target.parent.mkdir(parents=True, exist_ok=True)
        for path in [*interrupted, settings_file(target)] if overwrite else ():
            path.unlink(missing_ok=True)
        if settings is not None and (overwrite or not interrupted):
            replace_file(settings_file(target), json.dumps(settings, indent=1, ensure_ascii=False))
        if partial.exists():
            _cut_after_last_line(partial)
    ranks.barrier()
    written = 0
    if partial.exists():
        now = iter(prompts)
        with open(partial, encoding="utf-8") as fh:
            for written, line in enumerate(fh, start=1):
                if json.loads(line)["prompt"] != next(now, None):
                    raise _changed(partial, written, written - 1)
    resumed = read_progress(target, written)
    if (written or resumed.done) and ranks.is_main:
        log.info("resuming %s: %d of %d replies from an interrupted run%s", target, written + len(resumed.done),
                 prompts.count, f" ({resumed.cut} row(s) cut short by the interruption dropped)" if resumed.cut else "")
    return resumed


# ---------------------------------------------------------------------------------------------- the job
@dataclass
class JobStats:
    replies: int = 0
    resumed: int = 0  # replies read back from an interrupted run (partial file and progress files)
    new_tokens: int = 0  # generated here, all processes
    seconds: float = 0.0
    batches: int = 0  # generated by this process (run_job turns it into batches_per_process)
    batches_per_process: List[int] = field(default_factory=list)  # in rank order


def run_job(model, tokenizer, sampling, prompts: Prompts, encode: Callable[[str], List[int]], batch_size: int,
            chunk_prompts: int, ranks: Ranks, emit: Callable[[List[Tuple[str, str]]], None],
            resumed: Optional[Resumed] = None, progress: Optional[Path] = None) -> JobStats:
    """Every prompt's reply, a chunk at a time: after each chunk rank 0 calls ``emit`` with its ``(prompt, reply)``
    rows in the prompts' order (from the first prompt past ``resumed.written``). Each finished batch is appended to
    ``progress`` when given. A progress bar with the rate on rank 0."""
    from tqdm.auto import tqdm

    resumed = resumed or Resumed()
    stats, start = JobStats(prompts.count, resumed.written + len(resumed.done)), time.perf_counter()
    fh = open(progress, "a", encoding="utf-8") if progress is not None else None
    try:
        with tqdm(total=prompts.count - stats.resumed, unit="prompt", desc="generate",
                  disable=not ranks.is_main) as bar:
            for first, chunk in prompts.chunks(chunk_prompts):
                if first + len(chunk) <= resumed.written:
                    continue
                indices = range(max(first, resumed.written), first + len(chunk))
                replies = {i: reply for i in indices if (reply := resumed.reply_of(i, chunk[i - first])) is not None}
                todo = [i for i in indices if i not in replies]
                mine = _generate_chunk(model, tokenizer, sampling, chunk, first, todo, encode, batch_size, ranks, fh,
                                       bar, stats, start)
                replies.update(ranks.gather(mine))
                if ranks.is_main:
                    emit([(chunk[i - first], replies[i]) for i in indices])
    finally:
        if fh is not None:
            fh.close()
    (stats.new_tokens,) = (int(n) for n in ranks.sum([stats.new_tokens]))
    stats.batches_per_process = ranks.per_process(stats.batches)
    stats.seconds = time.perf_counter() - start
    return stats


def _generate_chunk(model, tokenizer, sampling, chunk: Sequence[str], first: int, todo: List[int], encode,
                    batch_size: int, ranks: Ranks, fh, bar, stats: JobStats, start: float) -> Dict[int, str]:
    """This process's share of a chunk's missing replies: longest prompts first, batches dealt out in rounds of one
    per process (rank 0's bar counts each whole round)."""
    from colossal_llama.inference.generation import decode_reply, generate_batch

    encoded = {i: encode(chunk[i - first]) for i in todo}
    order = sorted(todo, key=lambda i: -len(encoded[i]))
    replies: Dict[int, str] = {}
    for round_, mine in ranks.rounds(order, batch_size):
        stats.batches += len(mine)
        for batch in mine:
            for i, ids in zip(batch, generate_batch(model, tokenizer, [encoded[i] for i in batch], sampling)):
                replies[i] = decode_reply(tokenizer, ids)
                stats.new_tokens += len(ids)
            if fh is not None:
                fh.writelines(json.dumps({"index": i, "prompt": chunk[i - first], "response": replies[i]},
                                         ensure_ascii=False) + "\n" for i in batch)
                fh.flush()
        bar.update(len(round_))
        bar.set_postfix(tok_s=f"{stats.new_tokens / max(time.perf_counter() - start, 1e-9):,.0f}")  # this process
    return replies


class PartialWriter:
    """Rank 0: appends each chunk's ``{"prompt", "response"}`` rows to the partial file (flushed: a crash keeps
    every chunk written), then publishes it as the output and removes the progress files."""

    def __init__(self, target: Path):
        self.target, self.partial = target, partial_file(target)
        self.fh = open(self.partial, "a", encoding="utf-8")

    def __call__(self, rows: List[Tuple[str, str]]) -> None:
        self.fh.writelines(json.dumps({"prompt": p, "response": r}, ensure_ascii=False) + "\n" for p, r in rows)
        self.fh.flush()

    def publish(self) -> None:
        """After every process is done with its progress file."""
        self.fh.close()
        publish_file(self.partial, self.target)
        for path in progress_files(self.target):
            path.unlink()
        settings_file(self.target).unlink(missing_ok=True)
