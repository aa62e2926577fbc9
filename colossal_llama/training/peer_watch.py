"""Telling a dead rank from a slow one, so that the others need not wait out the collective timeout.

A rank that dies (a GPU fault, the kernel's OOM killer, a machine lost) leaves the others waiting in their next
collective: under NCCL until its timeout (``--dist_timeout_minutes``, 10 minutes by default). torchrun stops the
ranks of its own machine with SIGTERM (on which ``--stop_signals`` makes every rank finish the step in flight, which
cannot finish now), and waits for them as long as ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` allows (900 s in
``train.example.sh``); the torchrun of another machine learns nothing at all under static rendezvous (what
``colossalai run`` uses). Either way a ``--max_restarts`` restart, or the job's end, came 10 minutes late.

So every rank beats a heartbeat into the launcher's store: a counter of its own, raised every ``silence / 12``
seconds (5 s at most) by a background thread, which runs while the main thread waits in a collective or writes a
checkpoint (torch.save and safetensors release the GIL while they write). Each rank also watches one other, the
next one in a ring (rank r watches r + 1, the last rank watches rank 0): a constant number of store requests per
rank and beat, whatever the number of ranks, and whenever some ranks are dead and some alive, a live rank watches a
dead one. A rank whose watched counter has not moved for ``--rank_silence_s`` seconds, while its own training has
not moved for as long either (:meth:`PeerWatch.progressed`, after every micro-batch: a dead rank holds every rank
in the step's all-reduce, while a rank whose heartbeat merely cannot reach the store trains on), writes that rank's
number into the store (:data:`VERDICT`) and calls the callback given to :meth:`PeerWatch.listen`; every other rank
reads the verdict at its next beat and calls its own. A slow rank (a long step, a long save) keeps beating and is
waited for. Silence is measured by this thread's own readings: when the thread itself could not run for half the
silence (the whole job suspended with SIGSTOP, then continued), it starts its observation afresh. A store that has
not answered for the silence while this rank's training stood still counts too: the launcher that holds it died,
or its machine was lost.

The callback leaves with the stop signal's code once one came. The thread learns of the signal itself: a rank
blocked in a collective runs no Python code, so Python's handler (which runs between bytecodes of the main thread)
would only run once the collective returned. Python's C-level handler also writes the signal's number to a file
descriptor (:func:`signal.set_wakeup_fd`) at once; the thread waits on that descriptor between beats.
"""
from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MAX_BEAT_S = 5.0  # seconds between two beats of a rank, at most (silence / 12 below that)
STORE_TIMEOUT = timedelta(seconds=30)
VERDICT = "silent"  # the store's key for the number of a rank found silent (set once, by the rank that watched it)


@dataclass(frozen=True)
class Silence:
    """What :meth:`PeerWatch.listen`'s callback is told."""

    signum: int  # the stop signal that came before it (0: none)
    rank: Optional[int]  # the silent rank; None: the launcher's store did not answer
    seen_here: bool  # this rank found it; False: it read the verdict of the rank that did


OnSilent = Callable[[Silence], None]
Listening = Tuple[frozenset, OnSilent]  # the stop signals' numbers, and what to call


@dataclass
class Sighting:
    """This thread's readings of the watched rank's counter."""

    count: Optional[bytes] = None
    since: float = 0.0  # when the counter was first read at this value (time.monotonic)
    read_at: float = float("-inf")

    def silent_for(self, count: bytes, now: float, max_gap: float) -> float:
        """Seconds the counter has stood still, read ``count`` at ``now``; after more than ``max_gap`` seconds
        without a reading (this thread could not run) the observation starts afresh."""
        if count != self.count or now - self.read_at > max_gap:
            self.count, self.since = count, now
        self.read_at = now
        return now - self.since


class PeerWatch:
    """This rank's heartbeat and its watch of the next rank's (module docstring).

    ``connect()`` returns a c10d store shared by the ranks of this incarnation of the workers (keys: rank numbers,
    :data:`VERDICT`); it is called again to reconnect after the store stopped answering."""

    def __init__(self, connect: Callable[[], object], rank: int, world_size: int, silence_s: float):
        self.connect, self.rank, self.world_size, self.silence_s = connect, rank, world_size, silence_s
        self.watched = (rank + 1) % world_size
        self.beat_s = min(MAX_BEAT_S, silence_s / 12)
        self.store = connect()
        self.store.add(str(rank), 1)  # the first beat, before any rank reads it (a get waits for its key)
        self._answered_at = self._progressed_at = time.monotonic()
        self._failures, self._failed_at, self._retry_at = 0, 0.0, 0.0  # the store's failures in a row; back-off
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
                log.warning("no heartbeat between the ranks (%s): when a rank dies, the others wait out the collective "
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
        """From now on, call ``on_silent`` (in the watch's thread, once) when another rank found its watched rank
        silent, or when this rank's training has not moved for ``silence_s`` (:meth:`progressed`) and either its
        watched rank or the store has been silent as long. ``signals``: the stop signals, told to ``on_silent`` once
        one has been written to :attr:`signal_fd`. A fresh observation."""
        self._listening = (frozenset(int(s) for s in signals), on_silent)

    def progressed(self) -> None:
        """This rank's training moved on (a micro-batch of a step or of validation done): the main thread calls it."""
        self._progressed_at = time.monotonic()

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
        listened: Optional[Listening] = None  # the listen() the observation below belongs to
        sighting, armed_by = Sighting(), 0  # the watched rank's counter; the stop signal that came (0: none)
        while not self._stopped:
            silence = self._beat(sighting, armed_by if listened is not None else None)
            if self._stopped:
                return
            if silence is not None and self._listening is listened:
                listened[1](silence)
                return
            ready, _, _ = select.select([self._signals_read], [], [], self.beat_s)
            listening = self._listening  # read after the wait: a signal may come right after listen()
            if listening is not listened:  # listening began, ended or began again: observe afresh
                listened, sighting, armed_by = listening, Sighting(), 0
            if ready:
                for signum in os.read(self._signals_read, 64):
                    if listened is not None and not armed_by and signum in listened[0]:
                        armed_by = signum

    def _beat(self, sighting: Sighting, armed_by: Optional[int]) -> Optional[Silence]:
        """Raise this rank's counter; while listening (``armed_by`` not None: the stop signal that came, 0 if none),
        read the verdict and the watched rank's counter. A store that failed is connected again, and asked again
        after a back-off (torch prints a C++ stack trace for each failed call), or at once where its silence would
        decide."""
        now = time.monotonic()
        if now < self._retry_at and not (armed_by is not None and self._store_silent(now) and self._stuck(now)):
            return None
        try:
            self.store.add(str(self.rank), 1)
            now = self._answered_at = time.monotonic()
            if self._failures:
                log.warning("the launcher's store answers again after %.0f s: heartbeat resumed", now - self._failed_at)
                self._failures, self._retry_at = 0, 0.0
            if armed_by is None:
                return None
            if self.store.check([VERDICT]):
                return Silence(armed_by, int(self.store.get(VERDICT)), seen_here=False)
            silent_for = sighting.silent_for(self.store.get(str(self.watched)), now, self.silence_s / 2)
            if silent_for < self.silence_s or not self._stuck(now):
                return None
            self.store.set(VERDICT, str(self.watched))
            return Silence(armed_by, self.watched, seen_here=True)
        except Exception as err:  # noqa: BLE001 - the store did not answer (the launcher gone, or a network blip)
            if self._stopped:
                return None
            self._store_failed(err)
            now = time.monotonic()
            if armed_by is not None and self._store_silent(now) and self._stuck(now):
                return Silence(armed_by, None, seen_here=True)
            return None

    def _store_failed(self, err: Exception) -> None:
        """Connect again (once); when that fails too, ask again after a back-off: twice the last, from two beats
        up to a quarter of the silence."""
        if not self._failures:
            self._failed_at = time.monotonic()
            log.warning("the launcher's store does not answer (%s): heartbeat paused, asked again every %g s at "
                        "most", str(err).splitlines()[0][:200], self.silence_s / 4)
        self._failures += 1
        try:
            self.store = self.connect()
        except Exception:  # noqa: BLE001 - still unreachable: tried again after the back-off
            self._retry_at = time.monotonic() + min(self.silence_s / 4, self.beat_s * 2 ** self._failures)
        else:
            self._retry_at = 0.0  # it answers again: beat at once (a silent counter would look dead)

    def _store_silent(self, now: float) -> bool:
        return now - self._answered_at >= self.silence_s

    def _stuck(self, now: float) -> bool:
        """Whether this rank's training has not moved for ``silence_s``."""
        return now - self._progressed_at >= self.silence_s
