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
when a rank gives no sign of life, instead of waiting out the collective's timeout.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from colossal_llama.training.peer_watch import PeerWatch


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
        self.peers = peers  # once a signal came, a dead rank makes this one leave at once
        self._previous_wakeup_fd: Optional[int] = None
        self.received: Optional[signal.Signals] = None
        self.received_at = 0.0
        self._previous: Dict[signal.Signals, object] = {}

    def install(self) -> None:
        """Main thread only (Python runs handlers there, between bytecodes: a blocking collective finishes first)."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        if self.peers is not None:  # Python writes each signal's number there at once, even mid-collective
            self.peers.listen(self.signals, self._leave_now)
            self._previous_wakeup_fd = signal.set_wakeup_fd(self.peers.signal_fd, warn_on_full_buffer=False)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self.peers is not None and self._previous_wakeup_fd is not None:
            self.peers.stop_listening()
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

    def _leave_now(self, signum: int, silent: List[int]) -> None:
        """The watch's callback (its thread): ranks fell silent (or the launcher's store is gone) after signal
        ``signum``, so the stop can never be agreed. One line, from the lowest live rank, then exit at once with
        the signal's code."""
        peers, name, code = self.peers, signal.Signals(signum).name, 128 + signum
        if silent:
            named = ", ".join(str(r) for r in silent[:8]) + (f" and {len(silent) - 8} more" if len(silent) > 8 else "")
            why = (f"rank{'s' if len(silent) > 1 else ''} {named} gave no sign of life for {peers.silence_s:g} s "
                   "(dead, or its machine hangs)")
        else:
            why = "the launcher's store is unreachable (the launcher died)"
        try:
            if not silent or peers.rank == min(set(range(peers.world_size)) - set(silent)):
                os.write(2, f"error: stopped by {name}: {why}, so the step in flight can never finish: leaving "
                            f"without a checkpoint of it, exit code {code}; resume with --load_checkpoint "
                            "latest\n".encode())
        finally:  # whatever writing did (a closed stderr): this process must not wait out the collective
            os._exit(code)

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
