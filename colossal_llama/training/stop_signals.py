"""Stopping a run cleanly on a signal: the SIGTERM a scheduler sends before it kills a job (preemption,
``scancel``, a Kubernetes eviction, a spot machine reclaimed) or a user's SIGUSR1.

A handler only records the signal. The training loop acts at the end of the step in flight once the ranks agree:
every step's last all-reduce carries each rank's vote, so a signal that reached any one rank (one node of many
preempted) stops every rank at the same step, with no collective of its own. They save a checkpoint there and exit
with 128 + the signal's number, the code of a process the signal killed: a scheduler or a wrapper script sees a
stopped job, not a finished one, and ``--load_checkpoint latest`` goes on from that sample.

Signals after the first are ignored: ``pkill -TERM -f train.py`` reaches a rank twice (once
itself, once forwarded by torchrun), and the second must not kill it in the middle of the save.

The signal may also be torchrun stopping the ranks because one of them died: then the ranks can never agree, and
a :class:`~colossal_llama.training.peer_watch.PeerWatch` makes each leave at once (same exit code, no checkpoint)
when a rank gives no sign of life, instead of waiting out the collective's timeout. Without a signal (the dead
rank was on another machine) they leave the same way with :data:`EX_TEMPFAIL`, a failure that ``torchrun
--max_restarts`` restarts (from the newest checkpoint with ``--load_checkpoint latest``).
"""
from __future__ import annotations

import functools
import os
import signal
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from colossal_llama.training.peer_watch import PeerWatch, Silence

EX_TEMPFAIL = 75  # sysexits.h: a temporary failure, try again (a rank died: the run can go on from a checkpoint)


class StoppedBySignal(Exception):
    """Raised on every rank once the ranks agreed to stop (after the checkpoint, if any, is saved)."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class StopRequest:
    """The first of ``signal_names`` this process received, once :meth:`install` has put its handlers in place.

    ``vote`` is what this rank puts into the step's all-reduce (1.0 once a signal came); the methods marked
    collective must be called by every rank."""

    def __init__(self, signal_names: List[str], peers: Optional[PeerWatch] = None):
        self.signals = [signal.Signals[name] for name in signal_names]
        self.peers = peers  # a dead rank makes this one leave at once
        self._previous_wakeup_fd: Optional[int] = None
        self.received: Optional[signal.Signals] = None
        self.received_at = 0.0
        self._previous: Dict[signal.Signals, object] = {}

    def install(self) -> None:
        """Main thread only (Python runs handlers there, between bytecodes: a blocking collective finishes first)."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        if self.peers is None:
            return
        self.peers.listen(self.signals, functools.partial(leave_on_silence, self.peers))
        if self.signals:  # Python writes each signal's number there at once, even mid-collective
            self._previous_wakeup_fd = signal.set_wakeup_fd(self.peers.signal_fd, warn_on_full_buffer=False)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self.peers is not None:  # the ranks now leave one by one: none is judged any more
            self.peers.stop_listening()
        if self._previous_wakeup_fd is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            self._previous_wakeup_fd = None

    def _record(self, signum: int, _frame) -> None:
        if self.received is not None:
            return
        self.received, self.received_at = signal.Signals(signum), time.monotonic()
        # os.write, not logging: the handler may interrupt a logging call that holds the handler's lock
        rank = os.environ.get("RANK", "0")
        os.write(2, f"[rank {rank}] received {self.received.name}: the run stops at the end of the step in flight, "
                    "once every rank knows, and saves a checkpoint there\n".encode())

    @property
    def vote(self) -> float:
        return 0.0 if self.received is None else 1.0

    def agreed(self, device: torch.device) -> bool:
        """Collective: whether any rank received a stop signal (after work that may outlast a signal: validation,
        a checkpoint save; every step carries the vote in its own all-reduce instead)."""
        votes = torch.tensor([self.vote], dtype=torch.float64, device=device)
        dist.all_reduce(votes)
        return bool(votes.item() > 0)

    def stopped(self, step: int, device: torch.device) -> tuple[StoppedBySignal, float]:
        """Collective, once the ranks agreed to stop: the exception every rank raises (the largest signal number
        any rank received: the same exit code everywhere) and the seconds since the first rank received it."""
        since = time.monotonic() - self.received_at if self.received is not None else 0.0
        facts = torch.tensor([float(self.received or 0), since], dtype=torch.float64, device=device)
        dist.all_reduce(facts, op=dist.ReduceOp.MAX)
        signum, seconds = facts.tolist()
        return StoppedBySignal(int(signum), step), seconds


def leave_on_silence(peers: PeerWatch, silence: Silence) -> None:
    """The watch's callback (its thread): a rank fell silent, or the launcher's store, so the step in flight can
    never finish. One line, from the rank that found it, then exit at once: with the stop signal's code when one
    came, else with :data:`EX_TEMPFAIL`."""
    if silence.rank is None:
        why = (f"the launcher's store has not answered for {peers.silence_s:g} s (the launcher that holds it died, "
               "or its machine is lost)")
    else:
        why = f"rank {silence.rank} gave no sign of life for {peers.silence_s:g} s (dead, or its machine hangs)"
    if silence.signum:
        code = 128 + silence.signum
        line = (f"error: stopped by {signal.Signals(silence.signum).name}: {why}, so the step in flight can never "
                f"finish: leaving without a checkpoint of it, exit code {code}; resume with --load_checkpoint latest")
    else:
        code = EX_TEMPFAIL
        line = (f"error: {why}, so the next collective can never finish: every rank leaves now instead of waiting "
                f"out the collective timeout, exit code {code}; torchrun --max_restarts restarts the run (from its "
                "newest checkpoint with --load_checkpoint latest), else resume with --load_checkpoint latest")
    try:
        if silence.seen_here:
            os.write(2, f"\n[rank {peers.rank}] {line}\n".encode())  # \n: after a progress bar's \r
    finally:  # whatever writing did (a closed stderr): this process must not wait out the collective
        os._exit(code)
