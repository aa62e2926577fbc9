"""``train.py`` / ``colossal-llama-train``: flags -> :class:`TrainConfig` -> :func:`train`.

Launch with ``torchrun --nproc_per_node N train.py ...`` or ``colossalai run --nproc_per_node N --hostfile H
train.py ...``; a bare ``python train.py`` trains as a single rank.

Errors: a user error (bad flag, data, checkpoint, busy save dir) is usually met by every rank at once. Rank 0
prints it as one line ``error: ...`` and every rank exits with code 2; the other ranks wait a moment first and
are normally stopped by the launcher before they print the same line again. An error met by one rank alone
(a file missing on one node) is still printed by that rank, prefixed with its number.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from typing import List, Optional

from colossal_llama.utils.errors import UserInputError, report_user_error

USER_ERROR_EXIT = 2


def run_cli(argv: Optional[List[str]] = None) -> int:
    from colossal_llama.training.config import parse_config
    from colossal_llama.training.distributed import stop_with_launcher
    from colossal_llama.training.loop import train
    from colossal_llama.training.stop_signals import StoppedBySignal

    stop_with_launcher()
    cfg = parse_config(argv)
    signum = _stopped_job()
    if signum is not None:
        return 128 + signum
    try:
        train(cfg)
    except StoppedBySignal as stopped:  # checkpoint saved: the exit code of a process the signal killed
        return stopped.exit_code
    return 0


def _stopped_job() -> Optional[int]:
    """In a torchrun restart: the signal the job's ranks agreed to stop on before, if they did (then this
    incarnation must not start: the stopped nodes will not join it). Checked before the rendezvous."""
    import signal

    from colossal_llama.training.run_dir import job_store, stopped_before

    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        return None
    signum = stopped_before(job_store())
    if signum is not None:
        print(f"[rank {os.environ.get('RANK', '?')}] this job stopped on {signal.Signals(signum).name} (its checkpoint "
              "is saved): torchrun restarted it, but it does not start again; resume with --load_checkpoint latest",
              file=sys.stderr, flush=True)
    return signum


def quiet_library_warnings() -> None:
    """Import-time advice of colossalai about optional CUDA extras (apex, tensornvme) and a deprecation inside its
    DDP wrapper: printed by every rank, they bury the lines that matter.

    bitsandbytes (imported by colossalai) logs a warning at import on CPUs with AVX512-BF16 when the optional
    ``kernels`` package is missing ("Failed to load CPU gemm_4bit_forward from kernels-community"): about a 4-bit
    CPU kernel that training never uses. Its errors still show."""
    warnings.filterwarnings("ignore", message=r"Please install (the latest tensornvme|apex)", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"`broadcast_buffers` is deprecated", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: Optional[List[str]] = None) -> None:
    """Run, then ``os._exit``: after a clean shutdown, colossalai/gloo threads can still abort at interpreter exit
    ("terminate called without an active exception"), turning a finished run into a failed one."""
    quiet_library_warnings()
    try:
        code = run_cli(argv) or 0
    except UserInputError as err:
        report_user_error(err)
        code = USER_ERROR_EXIT
    except SystemExit as err:  # argparse (2)
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:  # noqa: BLE001 - print it, then exit non-zero so the launcher stops the other ranks
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
