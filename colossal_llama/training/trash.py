"""Deleting folders of ``--save_dir`` without making the other ranks wait.

Rank 0 deletes old checkpoints (``--keep_last_k``), the earlier run (``--overwrite``) and half-written saves of a
crashed run while every other rank waits for it in the next collective. A 70B run's checkpoint is about a
terabyte of files; deleting it on a shared filesystem can take longer than NCCL lets a collective wait (10
minutes by default), and the whole job would abort at a checkpoint. So a folder is renamed aside at once (one
atomic step: from then on it is no part of the run, and a crash leaves a ``<prefix>deleting-*`` folder that the
next run removes as a leftover) and deleted by one background thread while training goes on. :meth:`Trash.wait`,
called after the last collective, blocks until everything is gone.
"""
from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Optional, Set

log = logging.getLogger(__name__)


def _remove_tree(path: Path) -> None:
    """The deletion itself (a seam: tests slow it down to prove that nobody waits for it)."""
    shutil.rmtree(path)


class Trash:
    """Folders renamed to ``<prefix>deleting-<random>-<name>`` beside themselves, then deleted in order by one
    daemon thread (started on first use). Errors are logged, never raised: what is left is a leftover."""

    def __init__(self, prefix: str):
        self.aside_prefix = prefix + "deleting-"  # what a folder set aside is called: <this><random>-<its name>
        self._queue: "queue.Queue[Optional[Path]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._held: Set[Path] = set()  # renamed, not yet deleted
        self._lock = threading.Lock()
        self.deleted = 0

    def holds(self, path: Path) -> bool:
        with self._lock:
            return path in self._held

    def discard(self, path: Path) -> Optional[Path]:
        """Rename ``path`` aside now and delete it in the background; returns the name it now has (None when it
        did not exist). A path this trash already holds is left as it is; one already aside is not renamed again
        (a run that crashes again and again while deleting must not grow the name)."""
        if self.holds(path) or not path.exists():
            return None
        aside = path
        if not path.name.startswith(self.aside_prefix):  # one a crashed run left aside keeps its name
            aside = path.with_name(f"{self.aside_prefix}{uuid.uuid4().hex[:8]}-{path.name}")
            path.rename(aside)
        with self._lock:
            self._held.add(aside)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="save-dir-trash", daemon=True)
            self._thread.start()
        self._queue.put(aside)
        return aside

    def _work(self) -> None:
        while True:
            path = self._queue.get()
            if path is None:
                return
            started = time.monotonic()
            try:
                _remove_tree(path)
                self.deleted += 1
                log.info("deleted %s in the background (%.1f s)", path.name, time.monotonic() - started)
            except OSError as err:
                log.warning("could not delete %s (%s); the next run removes it", path, err)
            with self._lock:
                self._held.discard(path)

    def wait(self) -> None:
        """Block until every discarded folder is deleted (call it after the last collective)."""
        if self._thread is None:
            return
        with self._lock:
            pending = len(self._held)
        if pending:
            log.info("waiting for %d folders to be deleted in the background", pending)
        self._queue.put(None)
        self._thread.join()
        self._thread = None
