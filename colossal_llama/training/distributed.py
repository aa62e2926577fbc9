"""Process-group start-up and shut-down for ranks launched by ``torchrun`` / ``colossalai run``."""
from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist

from colossal_llama.utils.errors import UserInputError


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(seed: int) -> bool:
    """Join the process group (nccl on CUDA, gloo on CPU) and seed python/numpy/torch; returns ``cuda``.

    A plain ``python train.py`` (no launcher) runs as a world of one on localhost.
    """
    import colossalai

    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise UserInputError("MASTER_PORT is not set: launch with torchrun or colossalai run")
        os.environ["MASTER_PORT"] = str(_free_port())
    cuda = torch.cuda.is_available()
    colossalai.launch_from_torch(backend="nccl" if cuda else "gloo", seed=seed, verbose=False)
    return cuda


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
