"""Telling a dead rank from a slow one once a run was asked to stop.

When a rank dies (a GPU fault, the kernel's OOM killer, a machine lost), torchrun stops the other ranks with
SIGTERM: the signal a scheduler sends to preempt a job, on which ``--stop_signals`` makes every rank finish the step
in flight and save a checkpoint. With a rank dead, that step's collectives never complete: NCCL waits out its
timeout (``--dist_timeout_minutes``, 10 minutes by default) and torchrun waits for its ranks as long as
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` allows (900 s in ``train.example.sh``), so a ``--max_restarts`` restart, or the
job's end, would come 10 minutes late.

So every rank beats a heartbeat into the launcher's store: a counter of its own, raised every :data:`BEAT_S`
seconds by a background thread, which runs while the main thread waits in a collective or writes a checkpoint.
Once a stop signal came, the thread also reads every rank's counter at each beat: a rank whose counter has not
moved for :data:`SILENT_S` seconds is dead or frozen, the stop can never be agreed, and the callback given to
:meth:`PeerWatch.listen` is called (it leaves the process). A slow rank (a long step, a long save) keeps beating
and is waited for.

The thread learns of the signal itself: a rank blocked in a collective runs no Python code, so Python's handler
(which runs between bytecodes of the main thread) would only run once the collective returned. Python's C-level
handler also writes the signal's number to a file descriptor (:func:`signal.set_wakeup_fd`) at once; the thread
waits on that descriptor between beats.
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Dict, Iterable, List, Optional, Tuple

log = logging.getLogger(__name__)

BEAT_S = 5.0  # seconds between two beats of a rank
SILENT_S = 60.0  # a rank whose counter has not moved this long, once a stop signal came, is taken for dead

OnSilent = Callable[[int, List[int]], None]  # (the signal's number, the silent ranks; [] when the store is gone)


@dataclass
class _Armed:
    """What the watch's thread observes once a stop signal came."""

    signum: int
    on_silent: OnSilent
    answered_at: float  # when the store last answered (time.monotonic)
    last: Dict[int, Tuple[int, float]] = field(default_factory=dict)  # rank -> (counter, first seen at that value)


class PeerWatch:
    """This rank's heartbeat and, once a stop signal came, the check of every other rank's (module docstring).

    ``store``: a c10d store shared by the ranks of this incarnation of the workers (keys: rank numbers)."""

    def __init__(self, store, rank: int, world_size: int, beat_s: float = BEAT_S, silent_s: float = SILENT_S):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.beat_s, self.silent_s = beat_s, silent_s
        self._signals_read, self.signal_fd = os.pipe()  # signal.set_wakeup_fd(signal_fd): Python writes signals there
        os.set_blocking(self.signal_fd, False)
        # (signal numbers, callback) while listening; set and cleared by one assignment (atomic), no lock
        self._listening: Optional[Tuple[frozenset, OnSilent]] = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)

    @classmethod
    def start(cls, environ=os.environ) -> Optional["PeerWatch"]:
        """The watch of a rank launched by torchrun / ``colossalai run`` (None in a world of one), beating from now
        on. It has its own connection to the launcher's store (``MASTER_ADDR:MASTER_PORT``), under the prefix of
        this incarnation of the workers (``TORCHELASTIC_RESTART_COUNT``): a restarted rank never reads the counters
        of the dead ones."""
        import torch.distributed as dist

        world_size = int(environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return None
        try:
            client = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), is_master=False,
                                   timeout=timedelta(seconds=30))
        except (KeyError, ValueError, RuntimeError) as err:  # a launcher without a TCP store: train without it
            log.warning("no heartbeat between the ranks (%s): a stop after a rank died waits out the collective "
                        "timeout", err)
            return None
        attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"colossal_llama/attempt-{attempt}/alive", client)
        watch = cls(store, int(environ["RANK"]), world_size, BEAT_S, SILENT_S)
        watch.begin()
        return watch

    def begin(self) -> None:
        """Start beating (a daemon thread)."""
        self._thread.start()

    def listen(self, signals: Iterable[int], on_silent: OnSilent) -> None:
        """From now on, once one of ``signals`` has been written to :attr:`signal_fd`, call ``on_silent(signal,
        ranks)`` (in the watch's thread) when other ranks fall silent, or the store stays unreachable as long."""
        self._listening = (frozenset(int(s) for s in signals), on_silent)

    def stop_listening(self) -> None:
        self._listening = None

    def stop(self) -> None:
        """No more beats (the thread ends at its next wake-up)."""
        self._listening, self._stopped = None, True

    def _run(self) -> None:
        armed: Optional[_Armed] = None
        while not self._stopped:
            listening = self._listening
            if listening is None:
                armed = None
            silent = self._beat(armed)
            if silent is not None and self._listening is listening:
                armed.on_silent(armed.signum, silent)
                return
            ready, _, _ = select.select([self._signals_read], [], [], self.beat_s)
            if ready:
                for signum in os.read(self._signals_read, 64):
                    if listening is not None and armed is None and signum in listening[0]:
                        armed = _Armed(signum, listening[1], time.monotonic())

    def _beat(self, armed: Optional[_Armed]) -> Optional[List[int]]:
        """Raise this rank's counter; once armed, the other ranks silent for ``silent_s`` (None: none, or not
        armed; [] when the store has not answered for ``silent_s``)."""
        try:
            self.store.add(str(self.rank), 1)
            if armed is None:
                return None
            armed.answered_at = time.monotonic()
            silent = self._silent_ranks(armed.last)
        except Exception:  # noqa: BLE001 - the store did not answer (the launcher gone, or a network blip)
            if armed is not None and time.monotonic() - armed.answered_at >= self.silent_s:
                return []
            return None
        return silent or None

    def _silent_ranks(self, last: Dict[int, Tuple[int, float]]) -> List[int]:
        """The other ranks whose counter has not moved for ``silent_s`` seconds of this observation; ``last``:
        rank -> (its counter, when it was first seen at that value), updated."""
        now = time.monotonic()
        for rank in range(self.world_size):
            count = self.store.add(str(rank), 0)  # reads without changing it (and never waits for the key)
            if rank not in last or last[rank][0] != count:
                last[rank] = (count, now)
        return [r for r, (_count, since) in last.items() if r != self.rank and now - since >= self.silent_s]
