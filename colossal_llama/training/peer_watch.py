"""Telling a dead rank from a slow one once a run was asked to stop.

When a rank dies (a GPU fault, the kernel's OOM killer, a machine lost), torchrun stops the other ranks with
SIGTERM: the signal a scheduler sends to preempt a job, on which ``--stop_signals`` makes every rank finish the step
in flight and save a checkpoint. With a rank dead, that step's collectives never complete: NCCL waits out its
timeout (``--dist_timeout_minutes``, 10 minutes by default) and torchrun waits for its ranks as long as
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` allows (900 s in ``train.example.sh``), so a ``--max_restarts`` restart, or the
job's end, would come 10 minutes late.

So every rank beats a heartbeat into the launcher's store: a counter of its own, raised every ``silence / 12``
seconds (5 s at most) by a background thread, which runs while the main thread waits in a collective or writes a
checkpoint (torch.save and safetensors release the GIL while they write). Once a stop signal came, the thread also
reads every rank's counter at each beat (one ``multi_get``): a rank whose counter has not moved for
``--rank_silence_s`` seconds is dead or frozen, the stop can never be agreed, and the callback given to
:meth:`PeerWatch.listen` is called (it leaves the process). A slow rank (a long step, a long save) keeps beating
and is waited for.

The thread learns of the signal itself: a rank blocked in a collective runs no Python code, so Python's handler
(which runs between bytecodes of the main thread) would only run once the collective returned. Python's C-level
handler also writes the signal's number to a file descriptor (:func:`signal.set_wakeup_fd`) at once; the thread
waits on that descriptor between beats.
"""
from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MAX_BEAT_S = 5.0  # seconds between two beats of a rank, at most (silence / 12 below that)
STORE_TIMEOUT = timedelta(seconds=30)

OnSilent = Callable[[int, List[int]], None]  # (the signal's number, the silent ranks; [] when the store is gone)
Listening = Tuple[frozenset, OnSilent]  # the signal numbers listened for, and what to call


@dataclass
class _Armed:
    """What the watch's thread observes once a stop signal came."""

    signum: int
    listening: Listening  # the listen() it came under: another listen() starts afresh
    answered_at: float  # when the store last answered (time.monotonic)
    last: Dict[int, Tuple[bytes, float]] = field(default_factory=dict)  # rank -> (counter, first seen at that value)


class PeerWatch:
    """This rank's heartbeat and, once a stop signal came, the check of every other rank's (module docstring).

    ``connect()`` returns a c10d store shared by the ranks of this incarnation of the workers (keys: rank numbers);
    it is called again to reconnect after the store stopped answering."""

    def __init__(self, connect: Callable[[], object], rank: int, world_size: int, silence_s: float):
        self.connect, self.rank, self.world_size, self.silence_s = connect, rank, world_size, silence_s
        self.beat_s = min(MAX_BEAT_S, silence_s / 12)
        self.store = connect()
        self.store.add(str(rank), 1)  # the first beat, before any rank can read it (multi_get waits for keys)
        self._signals_read, self.signal_fd = os.pipe()  # signal.set_wakeup_fd(signal_fd): Python writes signals there
        os.set_blocking(self.signal_fd, False)
        # (signal numbers, callback) while listening; set and cleared by one assignment (atomic), no lock
        self._listening: Optional[Listening] = None
        self._stopped = False
        self._fds_lock, self._fds_open = threading.Lock(), True
        self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)

    @classmethod
    def start(cls, silence_s: float, device, environ=os.environ) -> Optional["PeerWatch"]:
        """Collective: the watch of every rank launched by torchrun / ``colossalai run``, beating from now on; None
        on every rank in a world of one, with ``silence_s`` 0, or when any rank could not reach the store (a rank
        that never beats would be taken for dead). Each has its own connection to the launcher's store
        (``MASTER_ADDR:MASTER_PORT``), under the prefix of this incarnation of the workers
        (``TORCHELASTIC_RESTART_COUNT``): a restarted rank never reads the counters of the dead ones."""
        world_size = int(environ.get("WORLD_SIZE", "1"))
        if world_size <= 1 or silence_s <= 0:
            return None
        prefix = f"colossal_llama/attempt-{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/alive"

        def connect():
            client = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), is_master=False,
                                   timeout=STORE_TIMEOUT)
            return dist.PrefixStore(prefix, client)

        watch, problem = None, ""
        try:
            watch = cls(connect, int(environ["RANK"]), world_size, silence_s)
        except Exception as err:  # noqa: BLE001 - no TCP store, no fds...: this rank must still join the all-reduce
            problem = str(err)
        everyone = torch.tensor([0 if watch is None else 1], dtype=torch.int32, device=device)
        dist.all_reduce(everyone, op=dist.ReduceOp.MIN)
        if not everyone.item():
            if problem:
                log.warning("no heartbeat between the ranks (%s): a stop after a rank died waits out the collective "
                            "timeout", problem)
            if watch is not None:
                watch.close()
            return None
        watch.begin()
        return watch

    def begin(self) -> None:
        """Start beating (a daemon thread); :meth:`start` does it for the ranks of a launcher."""
        self._thread.start()

    def listen(self, signals: Iterable[int], on_silent: OnSilent) -> None:
        """From now on, once one of ``signals`` has been written to :attr:`signal_fd`, call ``on_silent(signal,
        ranks)`` (in the watch's thread) when other ranks fall silent, or the store stays unreachable as long."""
        self._listening = (frozenset(int(s) for s in signals), on_silent)

    def stop_listening(self) -> None:
        self._listening = None

    def close(self) -> None:
        """No more beats: the thread ends (woken at once) and the pipe is closed, by the thread itself when it is
        still waiting for the store (it then ends at its next wake-up)."""
        self._listening, self._stopped = None, True
        if self._thread.is_alive():
            with contextlib.suppress(OSError):  # a full pipe wakes it as well
                os.write(self.signal_fd, b"\0")
            self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._close_fds()

    def _close_fds(self) -> None:
        with self._fds_lock:
            if self._fds_open:
                self._fds_open = False
                for fd in (self._signals_read, self.signal_fd):
                    os.close(fd)

    def _run(self) -> None:
        try:
            self._watch()
        finally:
            if self._stopped:  # close() may have given up waiting for this thread
                self._close_fds()

    def _watch(self) -> None:
        armed: Optional[_Armed] = None
        while not self._stopped:
            if armed is not None and self._listening is not armed.listening:
                armed = None  # stopped listening (the run ended), or listening again
            silent = self._beat(armed)
            if self._stopped:
                return
            if silent is not None and self._listening is armed.listening:
                armed.listening[1](armed.signum, silent)
                return
            ready, _, _ = select.select([self._signals_read], [], [], self.beat_s)
            listening = self._listening  # read after the wait: a signal may come right after listen()
            if ready:
                for signum in os.read(self._signals_read, 64):
                    if listening is not None and armed is None and signum in listening[0]:
                        armed = _Armed(signum, listening, time.monotonic())

    def _beat(self, armed: Optional[_Armed]) -> Optional[List[int]]:
        """Raise this rank's counter; once armed, the other ranks silent for ``silence_s`` (None: none, or not
        armed; [] when the store has not answered for ``silence_s``). A store that failed is connected again."""
        try:
            self.store.add(str(self.rank), 1)
            if armed is None:
                return None
            armed.answered_at = time.monotonic()
            silent = self._silent_ranks(armed.last)
        except Exception:  # noqa: BLE001 - the store did not answer (the launcher gone, or a network blip)
            if self._stopped:
                return None
            try:
                self.store = self.connect()
            except Exception:  # noqa: BLE001 - still unreachable: tried again at the next beat
                pass
            if armed is not None and time.monotonic() - armed.answered_at >= self.silence_s:
                return []
            return None
        return silent or None

    def _silent_ranks(self, last: Dict[int, Tuple[bytes, float]]) -> List[int]:
        """The other ranks whose counter has not moved for ``silence_s`` seconds of this observation; ``last``:
        rank -> (its counter, when it was first seen at that value), updated."""
        now = time.monotonic()
        counts = self.store.multi_get([str(r) for r in range(self.world_size)])  # every rank beat once (start)
        for rank, count in enumerate(counts):
            if rank not in last or last[rank][0] != count:
                last[rank] = (count, now)
        return [r for r, (_count, since) in last.items() if r != self.rank and now - since >= self.silence_s]
