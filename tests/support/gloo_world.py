"""A function run on several real processes joined in a gloo group, from inside a test (no launcher, no files
to write): ``run_in_gloo_world(fn, 2, *args)`` returns what ``fn(ranks, *args)`` returned on each rank."""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable, List

import torch.distributed as dist
import torch.multiprocessing as mp

from colossal_llama.utils.ranks import Ranks
from tests.support.launch import free_port


def _rank_main(rank: int, fn: Callable, size: int, port: int, args: tuple, out_dir: str, join: bool) -> None:
    os.environ.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    if not join:  # the environment torchrun gives its workers: fn joins the group itself (env:// rendezvous)
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        result = fn(Ranks(rank, size), *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank-{rank}.pkl").write_bytes(pickle.dumps(result))


def run_in_gloo_world(fn: Callable, size: int, *args, join: bool = True) -> List:
    """``fn(Ranks(rank, size), *args)`` on ``size`` spawned processes (``fn`` a module-level function, its
    arguments and result picklable); their results in rank order. A rank that raises fails the call.
    ``join=False``: the processes get torchrun's environment instead, and ``fn`` joins the group (train.py's
    ``init_distributed``), which must still be up when it returns."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(fn, size, free_port(), args, out_dir, join), nprocs=size, join=True)
        return [pickle.loads(Path(out_dir, f"rank-{rank}.pkl").read_bytes()) for rank in range(size)]
