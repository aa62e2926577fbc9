"""Work spread over the processes of ``torchrun`` / ``colossalai run`` (evaluation, generation from a prompts file):
each does its share of the batches, and the shares are combined.

Every process forms the batches exactly as a single process does (same order, same rows) and rank r takes
batches r, r + N, r + 2N, ... So each batch gives what a one-process run gives: counts, predictions and replies
come out identical, sums differ only by the order of a float64 sum. Callers sort their batches longest first, so
dealing them out in turn also balances the work.

The combining goes through a gloo process group: a few numbers (or one dict of results) per run, on the host, so
it needs no GPU of its own and works the same on CPU and GPU machines.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from colossal_llama.utils.errors import UserInputError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ``size`` processes of a launcher (a world of one without one)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # its index on its machine: which GPUs it takes
    local_size: int = 1  # the launcher's processes on its machine

    @classmethod
    def join(cls, environ=os.environ) -> "Ranks":
        """Join the launcher's processes (``WORLD_SIZE`` > 1: torchrun / ``colossalai run``), else a world of one."""
        try:
            size = int(environ.get("WORLD_SIZE", "1"))
            local_rank = int(environ.get("LOCAL_RANK", "0"))
            local_size = int(environ.get("LOCAL_WORLD_SIZE", size))
        except ValueError:
            raise UserInputError(f"WORLD_SIZE={environ.get('WORLD_SIZE')!r} LOCAL_RANK={environ.get('LOCAL_RANK')!r} "
                                 f"LOCAL_WORLD_SIZE={environ.get('LOCAL_WORLD_SIZE')!r}: not integers") from None
        if size <= 1:
            return cls()
        if "MASTER_ADDR" not in environ or "MASTER_PORT" not in environ:
            raise UserInputError(f"WORLD_SIZE={size} without MASTER_ADDR/MASTER_PORT: launch with torchrun or "
                                 "colossalai run")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, local_size)

    @property
    def is_main(self) -> bool:
        """The process that prints the report and writes ``--output``."""
        return self.rank == 0

    def share(self, batches: Sequence[T]) -> List[T]:
        """This process's batches: ``batches[rank::size]`` (every batch goes to exactly one process)."""
        return list(batches[self.rank::self.size])

    def share_batches(self, items: Sequence[T], batch_size: int) -> List[Sequence[T]]:
        """``items`` cut into batches of ``batch_size`` in order (the last one shorter), then :meth:`share`."""
        return self.share([items[i: i + batch_size] for i in range(0, len(items), batch_size)])

    def rounds(self, items: Sequence[T], batch_size: int) -> Iterator[Tuple[Sequence[T], List[Sequence[T]]]]:
        """:meth:`share_batches` a round at a time: ``(the round's items, this process's batches of them)``, a round
        being one batch per process. The batches are the same; a caller's progress bar counts whole rounds."""
        per_round = batch_size * self.size
        for start in range(0, len(items), per_round):
            round_ = items[start: start + per_round]
            yield round_, self.share_batches(round_, batch_size)

    def sum(self, values: Sequence[float]) -> List[float]:
        """Element-wise sum over the processes (float64)."""
        if self.size == 1:
            return [float(v) for v in values]
        total = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(total)
        return total.tolist()

    def per_process(self, count: int) -> List[int]:
        """Every process's ``count`` (e.g. the batches it did), in rank order: what each one's share really was."""
        if self.size == 1:
            return [int(count)]
        counts = torch.zeros(self.size, dtype=torch.int64)
        counts[self.rank] = int(count)
        dist.all_reduce(counts)
        return counts.tolist()

    def exchange_int32(self, part: np.ndarray) -> List[np.ndarray]:
        """Every process's 1-D int32 array (lengths may differ), in rank order, on every process: two all-gathers
        of raw tensors (the lengths, then the arrays padded to the longest), nothing pickled."""
        if self.size == 1:
            return [part]
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(lengths, torch.tensor([len(part)], dtype=torch.int64))
        longest = max(int(n) for n in lengths)
        padded = torch.zeros(longest, dtype=torch.int32)
        padded[:len(part)] = torch.from_numpy(np.ascontiguousarray(part, dtype=np.int32))
        parts = [torch.empty(longest, dtype=torch.int32) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return [p[:int(n)].numpy() for p, n in zip(parts, lengths)]

    def merge(self, part: Dict[int, T]) -> Dict[int, T]:
        """The union of every process's ``{index: value}`` (each index comes from one process)."""
        if self.size == 1:
            return dict(part)
        parts: List[Dict[int, T]] = [{} for _ in range(self.size)]
        dist.all_gather_object(parts, part)
        return {k: v for p in parts for k, v in p.items()}

    def gather(self, part: Dict[int, T]) -> Dict[int, T]:
        """On the main process the union of every process's ``{index: value}``; elsewhere ``{}`` (bounds memory
        where only rank 0 writes)."""
        if self.size == 1:
            return dict(part)
        parts: Optional[List[Dict[int, T]]] = [{} for _ in range(self.size)] if self.is_main else None
        dist.gather_object(part, parts, dst=0)
        return {k: v for p in parts for k, v in p.items()} if self.is_main else {}

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (after every process is done with it)."""
        if self.size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
