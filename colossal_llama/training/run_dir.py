"""One run per ``--save_dir``: an exclusive lock for the life of the run, no silent restart over an earlier run,
and removal of leftovers of crashed runs.

The lock is ``save_dir/.lock``, held by global rank 0 with ``fcntl.flock``: the kernel releases it when that
process dies, however it dies, so a lock left by a dead run is simply taken over (with a warning naming it).
The file records who holds it (host, pid, start time) for the refusal message of a second run.

While the lock is held no other run can be writing to ``save_dir``, so every ``.tmp-*`` folder found there is a
leftover of a crashed save and is removed. Folders are removed through the run's :class:`Trash` (renamed aside at
once, deleted in the background): the other ranks do not wait for it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist

from colossal_llama.training.checkpoint import (ABANDONED_DIR, CHECKPOINT_RE, FINAL_MODEL, TMP_PREFIX, LoadTarget,
                                                complete_checkpoints, is_checkpoint_of)
from colossal_llama.training.metrics import EVAL_LOG, LOSS_LOG
from colossal_llama.training.mixture import split_dataset_weight
from colossal_llama.training.trash import Trash
from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.output import lies_in

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RUN_CONFIG = "train_config.json"


@dataclass
class SaveDirLock:
    """An acquired lock; :meth:`release` (or process death) frees it."""

    path: Path
    fd: int

    def release(self) -> None:
        os.close(self.fd)  # closing the descriptor drops the flock


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {since})"


def acquire_lock(save_dir: Path) -> SaveDirLock:
    """Take ``save_dir/.lock`` or raise a one-line error naming the run that holds it."""
    save_dir.mkdir(parents=True, exist_ok=True)
    path = save_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserInputError(f"--save_dir {save_dir}: another training run is using it: {_describe(_holder(path))}; "
                             "wait for it to end or stop it, or choose another --save_dir") from None
    previous = _holder(path)
    if previous:  # its process is gone (else the flock would have failed): a crashed or killed run
        log.warning("%s: took over the lock left by %s, which is no longer running", path, _describe(previous))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return SaveDirLock(path, fd)


def release_lock(lock: SaveDirLock) -> None:
    """Clear the holder record (a clean end leaves no 'stale lock' warning), then unlock."""
    os.ftruncate(lock.fd, 0)
    lock.release()


def earlier_run_evidence(save_dir: Path) -> Optional[Path]:
    """The newest file or folder showing that a run already trained in ``save_dir`` (None when fresh)."""
    checkpoints = complete_checkpoints(save_dir)
    if checkpoints:
        return checkpoints[-1]
    for name in (FINAL_MODEL, LOSS_LOG):
        if (save_dir / name).exists():
            return save_dir / name
    return None


@dataclass(frozen=True)
class SaveDirRequest:
    """How a run means to use its ``--save_dir``, as rank 0 resolved it before taking the lock."""

    load_checkpoint: Optional[str]  # --load_checkpoint as given
    target: Optional[LoadTarget]  # what it resolved to (None: nothing to load)
    restarted: bool = False  # a torchrun restart of a job that claimed this save dir before (:func:`claimed_before`)
    inputs: Sequence[tuple[str, Path]] = ()  # (flag, path) of what the run reads: never deleted by --overwrite


def run_inputs(cfg) -> list[tuple[str, Path]]:
    """The paths a run reads (``cfg``: a TrainConfig), with the flag that named each (dataset weights stripped)."""
    named = [("--pretrained", cfg.pretrained)]
    if cfg.load_checkpoint not in (None, "latest"):
        named.append(("--load_checkpoint", cfg.load_checkpoint))
    named += [(flag, split_dataset_weight(arg)[0]) for flag, args in (("--dataset", cfg.dataset),
                                                                     ("--eval_dataset", cfg.eval_dataset))
              for arg in args]
    return [(flag, Path(path)) for flag, path in named]


def continues_its_run(save_dir: Path, request: SaveDirRequest) -> bool:
    """Whether the run goes on with the run already in ``save_dir``, which is then neither refused nor removed: a
    resume from one of its own checkpoints (``latest`` found one, or one named), any torchrun restart of a job that
    claimed it before (whatever the command names, what the save dir holds is the job's own), and ``latest`` finding no
    checkpoint where no final ``modeling/`` shows a finished run (a crash before the first checkpoint: its
    ``losses.jsonl`` is started over). A resume from another folder's checkpoint would mix two runs."""
    if request.restarted:  # whatever the command names: --overwrite would delete the job's own progress
        return True
    target = request.target
    if target is not None and target.kind == "resume":
        return is_checkpoint_of(target.path, save_dir)
    return request.load_checkpoint == "latest" and not (save_dir / FINAL_MODEL).exists()


def check_not_clobbering(save_dir: Path, request: SaveDirRequest, overwrite: bool, trash: Trash) -> None:
    """Refuse a run that does not continue the earlier run in ``save_dir`` (:func:`continues_its_run`) unless
    ``overwrite``; with it, remove that run first (its folders through ``trash``). Never removed, even with
    ``overwrite``: an entry that holds one of the run's inputs (refused before anything is touched)."""
    evidence = earlier_run_evidence(save_dir)
    if evidence is None or continues_its_run(save_dir, request):
        return
    if not overwrite:
        raise UserInputError(_refusal(save_dir, evidence, request))
    removed = [p for p in save_dir.iterdir() if p.name != LOCK_FILE and _belongs_to_a_run(p) and not trash.holds(p)]
    _check_inputs_kept(save_dir, removed, request.inputs)
    for path in removed:
        if path.is_dir():
            trash.discard(path)
        else:
            path.unlink()
    log.warning("--overwrite: removed the earlier run in %s (%d entries: %s)", save_dir, len(removed),
                ", ".join(sorted(p.name for p in removed)))


def _check_inputs_kept(save_dir: Path, removed: Sequence[Path], inputs: Sequence[tuple[str, Path]]) -> None:
    """A one-line error when an input lies in an entry that starting afresh would delete (links resolved)."""
    for flag, given in inputs:
        for entry in removed:
            if lies_in(given, entry):
                raise UserInputError(f"{flag} {given}: lies in {entry}, part of the earlier run in --save_dir "
                                     f"{save_dir}, which starting afresh there (--overwrite) deletes; copy it out "
                                     "of the save dir first, or choose another --save_dir")


def _refusal(save_dir: Path, evidence: Path, request: SaveDirRequest) -> str:
    """Why a run that does not continue the earlier run in ``save_dir`` is refused, and the ways on."""
    target = request.target
    if target is not None and target.kind == "resume" and target.path.parent.resolve() == \
            (save_dir / ABANDONED_DIR).resolve():
        return (f"--load_checkpoint {target.path}: a checkpoint --save_dir {save_dir} set aside; move it back first "
                f"(mv {target.path} {save_dir}/) and resume it there, which sets the newer ones aside in turn")
    if target is not None and target.kind == "resume":
        return (f"--save_dir {save_dir}: holds an earlier run ({evidence}), and --load_checkpoint {target.path} is "
                "not one of its checkpoints: resuming it there would mix the two runs' checkpoints and losses; "
                "choose another --save_dir, or pass --overwrite to delete the earlier run first")
    if request.load_checkpoint == "latest":
        return (f"--save_dir {save_dir}: --load_checkpoint latest found no checkpoint to continue, but the save dir "
                f"holds a finished run ({evidence}): pass --overwrite to delete it and train afresh, or choose "
                "another --save_dir")
    return (f"--save_dir {save_dir}: holds an earlier run ({evidence}); continue it with --load_checkpoint latest, "
            "or pass --overwrite to delete it and start afresh")


def _belongs_to_a_run(path: Path) -> bool:
    return (bool(CHECKPOINT_RE.match(path.name)) or path.name.startswith(TMP_PREFIX)
            or path.name in (FINAL_MODEL, LOSS_LOG, EVAL_LOG, RUN_CONFIG, ABANDONED_DIR))


def remove_leftovers(save_dir: Path, trash: Trash) -> list[str]:
    """Remove ``.tmp-*`` folders (half-written saves and unfinished deletions of crashed runs) through ``trash``;
    call only while holding the lock."""
    removed = sorted(p.name for p in save_dir.glob(TMP_PREFIX + "*") if not trash.holds(p))
    for name in removed:
        trash.discard(save_dir / name)
    if removed:
        log.info("%s: removed %d half-written folders of an interrupted run: %s", save_dir, len(removed),
                 ", ".join(removed))
    return removed


def claim_save_dir(save_dir: Path, request: SaveDirRequest, overwrite: bool, trash: Trash) -> SaveDirLock:
    """Rank 0, before anything is written: lock, refuse or clear an earlier run, remove leftovers."""
    lock = acquire_lock(save_dir)
    try:
        check_not_clobbering(save_dir, request, overwrite, trash)
        remove_leftovers(save_dir, trash)
    except BaseException:
        release_lock(lock)
        raise
    return lock


# ---------------------------------------------------------------------------------------------- torchrun restarts
JOB_CLAIM_KEY = "colossal_llama/claimed_save_dir"  # in the launcher's store: the save dir this job set up


def job_store(environ=os.environ):
    """Rank 0: a client of the store torchrun keeps for the whole job, across restarts of the workers
    (``MASTER_ADDR:MASTER_PORT``); None outside torchrun, or when it cannot be reached: a restart is then checked
    as a first start (it may be refused, and resumes from what the command names), though it never sets the
    job's newer checkpoints aside (:func:`~colossal_llama.training.loop.newer_checkpoints_go_aside`)."""
    if "TORCHELASTIC_RUN_ID" not in environ:
        return None
    try:
        return dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=60))
    except Exception as err:  # noqa: BLE001 - a store refused or gone: the run itself may still go on
        log.warning("the launcher's store (%s:%s) did not answer (%s): a torchrun restart cannot tell what an "
                    "earlier incarnation of this job did", environ.get("MASTER_ADDR"), environ.get("MASTER_PORT"), err)
        return None


def claimed_before(store, save_dir: Path) -> bool:
    """Whether an earlier incarnation of this torchrun job claimed ``save_dir`` and set its resume up
    (:func:`record_claim`): only then are the save dir's checkpoints past the named one this job's own. A restart
    after a refused claim (torchrun restarts any failure) is checked as a first start again."""
    return (store is not None and store.check([JOB_CLAIM_KEY])
            and store.get(JOB_CLAIM_KEY).decode() == str(save_dir.resolve()))


def record_claim(store, save_dir: Path) -> None:
    """Rank 0, once the run has claimed ``save_dir`` and set its resume up (see :func:`claimed_before`)."""
    if store is not None:
        store.set(JOB_CLAIM_KEY, str(save_dir.resolve()))


JOB_STOP_KEY = "colossal_llama/stopped_by"  # in the launcher's store: the signal the job's ranks agreed to stop on


def record_stop(store, signum: int) -> None:
    """Rank 0, once every rank agreed to stop on ``signum``: a torchrun that never got the signal (another node's)
    takes its ranks' exit code for a failure and, with ``--max_restarts``, starts them again; they must not wait
    in the rendezvous for the stopped nodes (up to the collective timeout, for every restart left)."""
    if store is not None:
        store.set(JOB_STOP_KEY, str(signum))


def stopped_before(store) -> Optional[int]:
    """The signal an earlier incarnation of this job stopped on (:func:`record_stop`), or None."""
    if store is None or not store.check([JOB_STOP_KEY]):
        return None
    return int(store.get(JOB_STOP_KEY).decode())
