"""Process-group start-up and shut-down for ranks launched by ``torchrun`` / ``colossalai run``."""
from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from colossal_llama.utils.errors import UserInputError

T = TypeVar("T")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_collective_timeout(minutes: Optional[float]) -> None:
    """Every process group made after this waits at most ``minutes`` in a collective (None: torch's defaults).

    colossalai makes the world group and its plugins' tp/pp/dp groups without a timeout, and torch then takes the
    default from ``distributed_c10d``'s module globals, read when each group is made; so those are set here, before
    any group exists (a ``timeout`` given to the world group alone would leave the plugins' groups at 10 minutes)."""
    if minutes is None:
        return
    from torch.distributed import distributed_c10d

    timeout = timedelta(minutes=minutes)
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def init_distributed(seed: int, timeout_minutes: Optional[float] = None) -> bool:
    """Join the process group (nccl on CUDA, gloo on CPU) and seed python/numpy/torch; returns ``cuda``.

    A plain ``python train.py`` (no launcher) runs as a world of one on localhost. ``timeout_minutes``: see
    :func:`set_collective_timeout`.
    """
    set_collective_timeout(timeout_minutes)

    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise UserInputError("MASTER_PORT is not set: launch with torchrun or colossalai run")
        os.environ["MASTER_PORT"] = str(_free_port())
    cuda = torch.cuda.is_available()
    if not cuda:  # colossalai's CPU accelerator lacks what zero2 and 3d call (RNG by device, streams)
        from colossal_llama.training import cpu_compat

        cpu_compat.apply()
    _join_process_group("nccl" if cuda else "gloo")
    from colossalai.accelerator import get_accelerator
    from colossalai.utils import set_seed

    accelerator = get_accelerator()
    if accelerator.support_set_device:
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    set_seed(seed)
    torch._dynamo.config.optimize_ddp = dist.get_world_size() > 1  # as colossalai's launch sets it
    return cuda


def _join_process_group(backend: str) -> None:
    """``init_process_group`` (what ``colossalai.launch_from_torch`` does, and then device and seed), on the
    launcher's store under a prefix of this incarnation of the workers: torchrun ``--max_restarts`` starts the ranks
    again on the *same* store, and without the prefix the new ranks read the dead ones' addresses from it and fail
    to connect ("Gloo connectFullMesh failed ... Connection refused")."""
    from torch.distributed import distributed_c10d

    # the store waits as long as the collectives (--dist_timeout_minutes, else torch's default for the backend)
    timeout = distributed_c10d._get_default_timeout(backend)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"colossal_llama/attempt-{attempt}", store), rank=rank,
                            world_size=world_size, timeout=timeout)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def launched_by_torchrun() -> bool:
    """torchrun (and ``colossalai run``, which calls it) sets TORCHELASTIC_RUN_ID for every worker."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def stop_with_launcher() -> bool:
    """Make this rank die with its launcher (torchrun): a rank whose launcher was killed must not keep training
    and writing checkpoints beside a restarted run. Returns whether the guard is on.

    Linux: the kernel sends SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``). Elsewhere a daemon thread
    polls the parent pid. A plain ``python train.py`` (no launcher) is left alone: its parent is a shell, and
    ``nohup python train.py &`` must survive the shell.
    """
    if not launched_by_torchrun():
        return False
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        import threading
        import time

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
    if os.getppid() == 1:  # the launcher died before the guard was set (we were re-parented to init)
        os._exit(1)
    return True


def setup_logging() -> None:
    """INFO on rank 0, warnings only elsewhere; every line carries the rank."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def shutdown() -> None:
    """Destroy the process group (colossalai's ZeRO otherwise sometimes aborts at interpreter exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down while a peer still talks to it
        dist.destroy_process_group()


def on_rank0(fn: Callable[[], T], shared: bool = False) -> Optional[T]:
    """Collective: run ``fn`` on global rank 0 only; a :class:`UserInputError` there is raised on every rank with
    the same message (so all ranks stop together with one clear line instead of hanging in the next collective),
    any other exception on rank 0 itself and as a RuntimeError naming it on the others.
    Returns ``fn``'s result on rank 0 and None elsewhere; ``shared``: rank 0's result on every rank (pickled), for
    what every rank must see alike (on a shared filesystem another machine's listing of a folder may lag)."""
    result, message, failure = None, None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except UserInputError as err:
            message = str(err)
        except Exception as err:  # noqa: BLE001 - e.g. an OSError: raised here, and said to the other ranks
            failure, message = err, f"rank 0 failed: {type(err).__name__}: {err}"
    box = [message, failure is not None, result if shared else None]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[1]:
        raise RuntimeError(box[0])
    if box[0] is not None:
        raise UserInputError(box[0])
    return box[2] if shared else result


def host_memory_peaks_gib(device: torch.device) -> tuple[float, int, float]:
    """Collective: (largest peak resident memory of any rank so far in GiB, that rank, the smallest peak).

    Linux reports ``ru_maxrss`` in KiB. Building the model is where a process's host memory peaks before training
    (the whole model unless it is built lazily, or read straight onto the GPU), so this is logged once the model
    is ready."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peaks = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, torch.tensor([peak], dtype=torch.float64, device=device))
    values = [float(p) for p in peaks]
    largest = max(range(len(values)), key=values.__getitem__)
    return values[largest], largest, min(values)
