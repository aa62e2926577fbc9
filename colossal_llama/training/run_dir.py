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
from pathlib import Path
from typing import Optional

from colossal_llama.training.checkpoint import CHECKPOINT_RE, FINAL_MODEL, TMP_PREFIX, complete_checkpoints
from colossal_llama.training.metrics import EVAL_LOG, LOSS_LOG
from colossal_llama.training.trash import Trash
from colossal_llama.utils.errors import UserInputError

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


def check_not_clobbering(save_dir: Path, resuming: bool, overwrite: bool, trash: Trash) -> None:
    """Refuse to start afresh over an earlier run unless ``overwrite``; with it, remove that run first (its folders
    through ``trash``)."""
    evidence = earlier_run_evidence(save_dir)
    if evidence is None or resuming:
        return
    if not overwrite:
        raise UserInputError(f"--save_dir {save_dir}: holds an earlier run ({evidence}); continue it with "
                             "--load_checkpoint latest, or pass --overwrite to delete it and start afresh")
    removed = [p for p in save_dir.iterdir() if p.name != LOCK_FILE and _belongs_to_a_run(p) and not trash.holds(p)]
    for path in removed:
        if path.is_dir():
            trash.discard(path)
        else:
            path.unlink()
    log.warning("--overwrite: removed the earlier run in %s (%d entries: %s)", save_dir, len(removed),
                ", ".join(sorted(p.name for p in removed)))


def _belongs_to_a_run(path: Path) -> bool:
    return (bool(CHECKPOINT_RE.match(path.name)) or path.name.startswith(TMP_PREFIX)
            or path.name in (FINAL_MODEL, LOSS_LOG, EVAL_LOG, RUN_CONFIG))


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


def claim_save_dir(save_dir: Path, resuming: bool, overwrite: bool, trash: Trash) -> SaveDirLock:
    """Rank 0, before anything is written: lock, refuse or clear an earlier run, remove leftovers."""
    lock = acquire_lock(save_dir)
    try:
        check_not_clobbering(save_dir, resuming, overwrite, trash)
        remove_leftovers(save_dir, trash)
    except BaseException:
        release_lock(lock)
        raise
    return lock
