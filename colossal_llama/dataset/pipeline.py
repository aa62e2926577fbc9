"""Prepare pre-training (packed) and SFT (one conversation per row, or packed) data: one code path for both.

    read + validate, streaming (main process, exact file:line errors; only this shard's lines)
    -> tokenise block by block into the on-disk token cache (datasets.map, num_proc workers, memory-mapped Arrow)
    -> plan from document lengths alone: held-out documents, per category lossless first-fit packing (SFT: one
       row per conversation unless --packing), N seeded bins per category; part k = bin k of every category
    -> write each part by gathering its rows from the cache (arrow + jsonl mirror), then manifest.json last

Memory is bounded by the number of documents (a few numpy arrays), not tokens. The previous output stays whole
until the new one is complete: parts are written to temporary siblings and swapped in at the end.

Output (the data contract): ``OUT/manifest.json``, ``OUT/jsonl/part-k.jsonl`` (one row per sequence: category,
the ``file:line``/chunk/start/tokens of each packed piece; the decoded text with ``--mirror_text``), ``OUT/arrow/part-k/`` (``save_to_disk`` layout;
int32 lists ``input_ids``, ``labels`` (-100 = no loss, unshifted), ``position_ids`` (restart at 0 at every
packed piece), string ``category``; no padding), ``OUT/eval/part-00000/`` with ``--holdout_fraction``, and
``OUT/cache/`` (working files while the run lasts). With ``--num_shards N`` (N > 1) each shard writes all of
this under ``OUT/shard-IIIII-of-NNNNN/``.
Empty parts: an entirely empty part (every category has fewer rows than bins) is an error under
``--strict``; with ``--skip_invalid`` it is reported (``counts.empty_parts``) and not written.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from colossal_llama.dataset.accounting import count_tokens, format_summary
from colossal_llama.dataset.chat_templates import ChatTemplate, get_chat_template
from colossal_llama.dataset.config import (SHARD_DIR, OutputLayout, PrepConfig, PretrainPrepConfig, SFTPrepConfig,
                                          check_one_run_per_folder)
from colossal_llama.dataset.manifest import EVAL_DIR, InputFiles, Manifest, PartEntry
from colossal_llama.dataset.packing import Plan, category_rng, plan_parts
from colossal_llama.dataset.records import ReadLog, input_files, read_batches
from colossal_llama.dataset.token_cache import DocTable, TokenCacheBuilder
from colossal_llama.dataset.tokenization import tokenize_pretrain_batch, tokenize_sft_batch
from colossal_llama.dataset.writing import PartWriter, WrittenPart, part_name
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.fingerprint import tokenizer_fingerprint
from colossal_llama.utils.output import (check_apart, check_folder_path, check_replaceable, pid_alive,
                                         remove_stale_siblings, remove_stale_tmp_dirs, replace_dir, tmp_sibling)

logger = logging.getLogger(__name__)



@dataclass
class PrepSummary:
    """What a run did: the manifest it wrote plus what is not reproducible (and so not in the manifest)."""

    manifest_path: Path
    arrow_dir: Path
    manifest: Manifest
    seconds: dict = field(default_factory=dict)        # wall time per stage
    tokenize_pids: list = field(default_factory=list)  # the processes that ran the tokeniser (num_proc workers)

    @property
    def counts(self):
        return self.manifest.counts

    def lines(self) -> list[str]:
        """The human-readable summary (what came in, what went out, what was skipped, seconds per stage)."""
        return format_summary(self.manifest, self.seconds, self.manifest_path)

    @property
    def part_dirs(self) -> list[Path]:
        return [self.arrow_dir / p.name for p in self.manifest.parts]

    @property
    def eval_part_dirs(self) -> list[Path]:
        return [self.arrow_dir.parent / EVAL_DIR / p.name for p in self.manifest.eval_parts]


class _StageClock:
    """``with clock("name"):`` accumulates wall seconds per stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


# ------------------------------------------------------------------------------------------ output folder
class OutputRun:
    """The output of one run: refuses to mix with an earlier one unless ``--overwrite``, stages the new parts
    in temporary siblings, publishes them (manifest last) on success and removes every trace on failure.

    It claims only what it writes: ``arrow`` and ``jsonl``, the held-out folder when this run holds data out or an
    earlier manifest of ours names it, and ``manifest.json``. Such a folder holding anything but the names this tool
    gives its parts, or a ``manifest.json`` that is not ours, is refused even with ``--overwrite`` (with the older
    flags the output root is the arrow folder's parent, often a working directory full of other things)."""

    STAGE = "prep"

    def __init__(self, config: PrepConfig, files: list[Path]):
        self.layout, self.overwrite, self.shard = config.output, config.overwrite, config.shard
        self.inputs = [*config.input_dirs, *files]
        layout = self.layout
        self.earlier = self._earlier_manifest()
        self.targets = {"arrow": layout.arrow_dir, "jsonl": layout.jsonl_dir}
        if config.holdout_fraction or (self.earlier is not None and self.earlier.eval_dir) or \
                _held_out_parts_left(layout.eval_dir):
            self.targets[EVAL_DIR] = layout.eval_dir
        self.staged = {name: tmp_sibling(path, self.STAGE) for name, path in self.targets.items()}
        # the host too: a --data_cache_dir shared by machines holds each one's work folder, never removed by another
        self.work_dir = layout.cache_dir / f"tokens-{socket.gethostname()}-{os.getpid()}"
        self._created: list[Path] = []

    def _earlier_manifest(self) -> Manifest | None:
        """The manifest of an earlier run in this output, if any; a ``manifest.json`` not ours is refused."""
        path = self.layout.manifest
        if not (path.exists() or path.is_symlink()):
            return None
        try:
            if not path.is_file():
                raise UserInputError(f"{path}: not a file")
            return Manifest.read(path)
        except (UserInputError, OSError, TypeError, AttributeError, ValueError) as err:  # whatever a stranger holds
            raise UserInputError(f"{path}: not a manifest written by this tool ({_reason(err, path)}); "
                                 f"remove it or choose another output folder") from None

    def _check_paths(self) -> None:
        """Every folder can be made or replaced, and none the run replaces touches an input (before any work)."""
        layout = self.layout
        for path in (layout.cache_dir, layout.arrow_dir.parent, layout.jsonl_dir.parent, *self.targets.values()):
            check_folder_path(path)
        for path in self.targets.values():
            check_replaceable(path)
        check_apart([*self.targets.values(), layout.manifest], self.inputs)
        for name, path in self.targets.items():
            _check_only_ours(path, _OURS[name])

    def _check_existing(self) -> None:
        layout = self.layout
        existing = [p for p in self.targets.values() if p.exists() and any(p.iterdir())]
        if self.earlier is not None:
            existing.insert(0, layout.manifest)
        if existing and not self.overwrite:
            state = "output already exists" if self.earlier is not None else "incomplete output of an earlier run"
            raise UserInputError(f"{existing[0]}: {state} (pass --overwrite to replace it)")
        self._check_shard_layout()

    def _check_shard_layout(self) -> None:
        """A folder holds either one output or the shards of one N-shard run, never a mix (training reads all)."""
        root = self.layout.arrow_dir.parent.parent if self.shard.count > 1 else self.layout.arrow_dir.parent
        check_one_run_per_folder(root, self.shard, "manifest.json", SHARD_DIR, "--data_output_dirs")

    def __enter__(self) -> "OutputRun":
        self._check_paths()
        self._check_existing()
        for path in (self.layout.cache_dir, self.layout.arrow_dir.parent, self.layout.jsonl_dir.parent):
            for parent in [path, *path.parents]:
                if parent.exists():
                    break
                if parent not in self._created:
                    self._created.append(parent)
        for target in {*self.targets.values(), self.layout.eval_dir}:  # eval/'s even when this run has none
            remove_stale_siblings(target, self.STAGE)
        remove_stale_tmp_dirs(self.layout.cache_dir, "tokens-{host}-{pid}")
        _remove_stale_tmp_files(self.layout.manifest)
        self.work_dir.mkdir(parents=True)
        return self

    def stage(self, name: str) -> Path:
        path = self.staged[name]
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, manifest: Manifest) -> None:
        """Swap the staged folders in (the manifest goes first, so a crash meanwhile never looks complete).

        A kill at any step leaves the old output whole (before the manifest is removed), the new one whole (once
        it is written), or a folder without manifest that readers refuse and the next run replaces (with
        ``--overwrite``), leaving nothing of this one: each folder is swapped whole, hidden siblings are removed
        by the next run."""
        self.layout.manifest.unlink(missing_ok=True)
        for name, target in self.targets.items():
            if self.staged[name].exists():
                replace_dir(self.staged[name], target)
            elif target.exists():  # an earlier run's held-out split that this run does not have
                target.rename(self.staged[name])  # gone at once: a kill amid rmtree left an empty eval/ behind
                shutil.rmtree(self.staged[name])
        manifest.write(self.layout.manifest)

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
        if exc_type is None:
            return
        for path in self.staged.values():
            shutil.rmtree(path, ignore_errors=True)
        for path in sorted(self._created, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir()  # only what this run created, and only when empty


# What this tool writes in each folder it replaces: anything else there is not ours to delete.
_OURS = {"arrow": re.compile(r"part-\d{5}"), EVAL_DIR: re.compile(r"part-\d{5}"),
         "jsonl": re.compile(rf"(?:{EVAL_DIR}-)?part-\d{{5}}\.jsonl")}


def _check_only_ours(folder: Path, ours: re.Pattern) -> None:
    """A one-line error (even with ``--overwrite``) when ``folder`` holds an entry this tool does not write."""
    if not folder.is_dir():
        return
    foreign = next((entry for entry in sorted(folder.iterdir()) if not ours.fullmatch(entry.name)), None)
    if foreign is not None:
        raise UserInputError(f"{folder}: holds {foreign.name}, which this tool did not write, so it is not an output "
                             f"of this tool to replace; remove it or choose another output folder")


def _remove_stale_tmp_files(path: Path) -> None:
    """``NAME.tmpPID`` files beside ``path`` (what :func:`~colossal_llama.utils.durable.replace_file` writes before
    its rename) of runs killed meanwhile, once their process is gone: nothing else removes them."""
    stale = re.compile(rf"{re.escape(path.name)}\.tmp(\d+)")
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        match = stale.fullmatch(entry.name)
        pid = int(match.group(1)) if match else os.getpid()
        if pid != os.getpid() and not pid_alive(pid) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)


def _held_out_parts_left(folder: Path) -> bool:
    """``folder`` holds held-out parts and nothing else: an earlier run's split whose manifest is gone (a run killed
    while publishing removes the manifest first). Left alone, it stayed beside the next output, which has none."""
    if not folder.is_dir():
        return False
    names = [entry.name for entry in folder.iterdir()]
    return bool(names) and all(_OURS[EVAL_DIR].fullmatch(name) for name in names)


def _reason(err: Exception, path: Path) -> str:
    """``err``'s message without the leading ``path: `` it may carry."""
    return str(err).removeprefix(f"{path}: ")


# ------------------------------------------------------------------------------------------ planning
def _holdout(docs: DocTable, per_category: list[np.ndarray], fraction: float, seed: int):
    """Per category, ``round(fraction * n)`` whole documents (seeded; at least one document stays for training)
    -> (training documents per category, held-out documents per category)."""
    train, held = [], []
    for c, cat_docs in enumerate(per_category):
        n = len(cat_docs)
        k = min(int(round(fraction * n)), n - 1) if n else 0
        chosen = np.zeros(n, dtype=bool)
        chosen[category_rng(seed, docs.categories[c], "holdout").choice(n, size=k, replace=False)] = True
        train.append(cat_docs[~chosen])
        held.append(cat_docs[chosen])
    return train, held


def _plans(docs: DocTable, config: PrepConfig) -> tuple[Plan, Plan | None, int]:
    """The training plan, the held-out plan (or None) and the number of held-out documents."""
    kept = np.flatnonzero(docs.length > 0)  # SFT conversations dropped by truncation have no tokens
    if len(kept) == 0:
        raise UserInputError("no rows left to write (every conversation was dropped by truncation)")
    per_category = docs.by_category(kept)
    held = None
    if config.holdout_fraction:
        per_category, held = _holdout(docs, per_category, config.holdout_fraction, config.seed)
    bar = tqdm(total=len(kept), desc="plan", unit=" docs", unit_scale=True, mininterval=1.0, disable=not config.packs)
    common = dict(max_length=config.max_length, seed=config.seed, pack=config.packs, progress=bar)
    with bar:
        train = plan_parts(per_category, docs.length, docs.categories, num_bins=config.num_bins, **common)
        if held is not None:
            eval_plan = plan_parts(held, docs.length, docs.categories, num_bins=1, purpose="eval-", **common)
    if train.empty_parts and config.strict:
        largest = int(np.bincount(train.seq_category).max())
        raise UserInputError(
            f"--num_spliced_dataset_bins {config.num_bins}: bin {train.empty_parts[0]} would be empty in every "
            f"category (the largest category has {largest} rows); use fewer bins, or --skip_invalid to write only "
            f"the non-empty parts")
    if held is None:
        return train, None, 0
    return train, eval_plan, sum(len(d) for d in held)


def _write(plan: Plan, writer: PartWriter, arrow_dir: Path, jsonl_dir: Path, prefix: str = "") -> list[WrittenPart]:
    return [writer.write(plan, k, rows, arrow_dir, jsonl_dir / f"{prefix}{part_name(k)}.jsonl") for k, rows in plan.parts]


def _entries(parts: list[WrittenPart]) -> list[PartEntry]:
    return [PartEntry(p.name, p.bin, p.num_sequences, p.num_tokens, p.per_category) for p in parts]


# ------------------------------------------------------------------------------------------ entry points
def _prepare(config: PrepConfig, template: ChatTemplate | None) -> PrepSummary:
    clock = _StageClock()
    tokenizer = template.tokenizer if template is not None else _load_fast_tokenizer(config.tokenizer_dir)
    found = input_files(config.input_dirs)  # before touching the output
    files = found.files
    if template is None:
        function, fn_kwargs = tokenize_pretrain_batch, {"tokenizer": tokenizer}
    else:
        function = tokenize_sft_batch
        fn_kwargs = {"template": template, "max_length": config.max_length, "files": [str(f) for f in files],
                     "strict": config.strict}
    with OutputRun(config, files) as run:
        read = ReadLog(files, files_ignored=len(found.ignored))
        builder = TokenCacheBuilder(run.work_dir, config.kind, function, fn_kwargs, config.num_proc)
        with clock("read+tokenize"):
            cache = builder.build(read_batches(read, config.kind, config.strict, config.shard), files)
        if read.documents == 0:
            cache.close()
            where = ", ".join(str(p) for p in files)
            detail = f" ({sum(read.skipped.values())} rows skipped)" if read.skipped else ""
            shard = f" for shard {config.shard.index} of {config.shard.count}" if config.shard.count > 1 else ""
            raise UserInputError(f"{where}: no valid rows{shard}{detail}")
        with clock("plan"):
            train, held, eval_documents = _plans(cache.docs, config)
        with clock("write"), tqdm(total=int(cache.docs.length.sum(dtype=np.int64)), desc="write", unit=" tokens",
                                  unit_scale=True, mininterval=1.0) as bar:
            writer = PartWriter(cache, tokenizer, config.max_length, config.mirror_text, bar)
            parts = _write(train, writer, run.stage("arrow"), run.stage("jsonl"))
            eval_parts = [] if held is None else _write(held, writer, run.stage(EVAL_DIR), run.stage("jsonl"),
                                                        prefix=f"{EVAL_DIR}-")
        counts = count_tokens(read, cache.docs, parts, eval_parts, eval_documents, kind=config.kind,
                              max_length=config.max_length, empty_bins=train.empty_bins,
                              empty_parts=train.empty_parts)
        manifest = Manifest(
            kind=config.kind, tokenizer_dir=str(config.tokenizer_dir.resolve()),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=len(tokenizer),
            max_length=config.max_length, num_bins=config.num_bins, seed=config.seed, parts=_entries(parts),
            counts=counts, chat_template=template.to_manifest() if template is not None else None,
            packing=config.packs, shard_index=config.shard.index, num_shards=config.shard.count,
            holdout_fraction=config.holdout_fraction, eval_dir=EVAL_DIR if eval_parts else None,
            eval_parts=_entries(eval_parts), inputs=InputFiles.of(files, config.input_dirs),
        )
        pids = cache.tokenize_pids
        cache.close()
        run.publish(manifest)
    summary = PrepSummary(config.output.manifest, config.output.arrow_dir, manifest, clock.seconds, pids)
    for line in summary.lines():
        logger.info(line)
    return summary


def _load_fast_tokenizer(path: Path):
    tokenizer = load_tokenizer(path)
    if not tokenizer.is_fast:
        raise UserInputError(f"{path}: a fast (tokenizer.json / convertible) tokenizer is required")
    return tokenizer


def prepare_pretrain(config: PretrainPrepConfig) -> PrepSummary:
    """Tokenise ``{source, target, category}`` documents and pack them losslessly; see module docstring."""
    return _prepare(config, None)


def prepare_sft(config: SFTPrepConfig) -> PrepSummary:
    """Template conversations (labels on assistant turns), truncate to whole exchanges; one per row or packed."""
    tokenizer = _load_fast_tokenizer(config.tokenizer_dir)
    return _prepare(config, get_chat_template(config.chat_template, tokenizer, config.system_message))


__all__ = ["OutputLayout", "PrepSummary", "prepare_pretrain", "prepare_sft"]
