"""Test launcher for ``torchrun``: optionally inject a crash, then run train.py.

    torchrun --nproc_per_node 2 tests/support/train_entry.py <train.py flags>

Fault injection (tests of crash safety), read from the environment:
- ``CL_TEST_KILL_DURING_SAVE_STEP=S``: rank 0 SIGKILLs itself inside the checkpoint save of step S, after every
  rank wrote its shards into the ``.tmp-`` dir and just before the rename that would publish it.
- ``CL_TEST_HOLD_AT_STEP=S``: rank 0 stops for good right after logging step S (before that step's checkpoint,
  if any); the other ranks wait for it in the next collective. A run that stays alive as long as a test needs.
- ``CL_TEST_DIE_AT_STEP=S``: rank 1 SIGKILLs itself right after step S, in torchrun's first incarnation of the
  workers only (``TORCHELASTIC_RESTART_COUNT`` 0): a crash that ``torchrun --max_restarts`` recovers from.
- ``CL_TEST_FREEZE_AT_STEP=S``: rank 1 stops itself (SIGSTOP: every thread, its heartbeat too) right after step
  S, in torchrun's first incarnation of the workers only: what a rank whose peer died sees under NCCL (the
  collective never completes), or a machine that hangs.
- ``CL_TEST_PUBLISH_LATE=1``: every checkpoint is published at the next save (or the run's end), as with
  ``--async_save``, its files written plainly (colossalai's background writer needs CUDA).
- ``CL_TEST_STALE_LISTING=1``: every rank but 0 sees the save dir as it was long ago: its oldest complete
  checkpoint is the newest (a shared filesystem's cached listing on another machine).
- ``CL_TEST_SIGNAL_AFTER_STEP=S``: rank 1 sends itself SIGTERM right after logging step S, in torchrun's first
  incarnation only: the ranks agree to stop in step S + 1's all-reduce (a scheduler's signal, at a known step).
- ``CL_TEST_SIGNAL_IN_STEP=S``: rank 1 sends itself SIGTERM once step S has begun (its forward and backward
  passes ahead), in torchrun's first incarnation only: a signal that lands in the middle of a step.
- ``CL_TEST_SLOW_STEP_S=T``: every rank waits T seconds after logging each step (time for a test to send a signal
  between a step and what follows it: validation, a checkpoint save, the next step).
- ``CL_TEST_SLOW_DELETE_S=T``: every folder deletion of the save dir's trash takes T seconds more (the deletion of
  a terabyte checkpoint on a shared filesystem, in small).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: ``tests.support`` importable



def _install_kill_during_save(step: int) -> None:
    from colossal_llama.training import checkpoint

    publish = checkpoint._publish

    def publish_or_die(tmp: Path, final: Path, trash) -> int:
        if final.name.endswith(f"_step-{step}"):
            os.kill(os.getpid(), signal.SIGKILL)  # mid-save: shards on disk, not yet renamed into place
        return publish(tmp, final, trash)

    checkpoint._publish = publish_or_die


def _after_each_step(action) -> None:
    """Call ``action(step)`` on every rank right after the step is logged (``RunMetrics.record``)."""
    from colossal_llama.training import metrics

    record = metrics.RunMetrics.record

    def record_then_act(self, stats) -> None:
        record(self, stats)
        action(stats.step)

    metrics.RunMetrics.record = record_then_act


def _install_hold_at_step(step: int) -> None:
    import time

    def hold(done: int) -> None:
        if done == step and os.environ.get("RANK", "0") == "0":
            time.sleep(3600)

    _after_each_step(hold)


def _install_die_at_step(step: int) -> None:
    def die(done: int) -> None:
        if done == step and os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            print(f"CL_TEST_DIE_AT_STEP: rank 1 SIGKILLs itself after step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    _after_each_step(die)


def _install_freeze_at_step(step: int) -> None:
    def freeze(done: int) -> None:
        if done == step and os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os.kill(os.getpid(), signal.SIGSTOP)

    _after_each_step(freeze)


def _install_signal_after_step(step: int) -> None:
    def terminate(done: int) -> None:
        if done == step and os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os.kill(os.getpid(), signal.SIGTERM)

    _after_each_step(terminate)


def _install_signal_in_step(step: int) -> None:
    from colossal_llama.training.step import Stepper

    run_step = Stepper.step

    def signalled_step(self, micro_batches, number, *args, **kwargs):
        if number == step and os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os.kill(os.getpid(), signal.SIGTERM)  # the step has begun: its arguments are evaluated
        return run_step(self, micro_batches, number, *args, **kwargs)

    Stepper.step = signalled_step


def _install_publish_late() -> None:
    from colossal_llama.training import checkpoint

    init, save_optimizer = checkpoint.Checkpointer.__init__, checkpoint.Checkpointer._save_optimizer

    def init_late(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        self.async_save = True

    def save_optimizer_plainly(self, directory: Path) -> None:
        self.async_save = False
        try:
            save_optimizer(self, directory)
        finally:
            self.async_save = True

    checkpoint.Checkpointer.__init__ = init_late
    checkpoint.Checkpointer._save_optimizer = save_optimizer_plainly


def _install_stale_listing() -> None:
    from colossal_llama.training import checkpoint

    if os.environ.get("RANK", "0") != "0":
        checkpoint.latest_checkpoint = lambda save_dir: next(iter(checkpoint.complete_checkpoints(save_dir)), None)


def _install_slow_steps(seconds: float) -> None:
    import time

    _after_each_step(lambda _done: time.sleep(seconds))


def _install_slow_delete(seconds: float) -> None:
    import time

    from colossal_llama.training import trash

    remove_tree = trash._remove_tree

    def slow_remove_tree(path: Path) -> None:
        time.sleep(seconds)
        remove_tree(path)

    trash._remove_tree = slow_remove_tree


def main() -> None:
    from colossal_llama.training.cli import main as train_main, quiet_library_warnings

    quiet_library_warnings()
    if os.environ.get("CL_TEST_KILL_DURING_SAVE_STEP"):
        _install_kill_during_save(int(os.environ["CL_TEST_KILL_DURING_SAVE_STEP"]))
    if os.environ.get("CL_TEST_HOLD_AT_STEP"):
        _install_hold_at_step(int(os.environ["CL_TEST_HOLD_AT_STEP"]))
    if os.environ.get("CL_TEST_DIE_AT_STEP"):
        _install_die_at_step(int(os.environ["CL_TEST_DIE_AT_STEP"]))
    if os.environ.get("CL_TEST_FREEZE_AT_STEP"):
        _install_freeze_at_step(int(os.environ["CL_TEST_FREEZE_AT_STEP"]))
    if os.environ.get("CL_TEST_SIGNAL_AFTER_STEP"):
        _install_signal_after_step(int(os.environ["CL_TEST_SIGNAL_AFTER_STEP"]))
    if os.environ.get("CL_TEST_SIGNAL_IN_STEP"):
        _install_signal_in_step(int(os.environ["CL_TEST_SIGNAL_IN_STEP"]))
    if os.environ.get("CL_TEST_PUBLISH_LATE"):
        _install_publish_late()
    if os.environ.get("CL_TEST_STALE_LISTING"):
        _install_stale_listing()
    if os.environ.get("CL_TEST_SLOW_STEP_S"):
        _install_slow_steps(float(os.environ["CL_TEST_SLOW_STEP_S"]))
    if os.environ.get("CL_TEST_SLOW_DELETE_S"):
        _install_slow_delete(float(os.environ["CL_TEST_SLOW_DELETE_S"]))

    train_main(sys.argv[1:])


if __name__ == "__main__":
    main()
