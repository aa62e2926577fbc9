"""Typed configuration of a data-preparation run: options, output layout, and which shard of the input."""
from __future__ import annotations

import heapq
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Sequence

from colossal_llama.utils.cli import flag
from colossal_llama.utils.errors import UserInputError

SHARD_DIR_FORMAT = "shard-{index:05d}-of-{count:05d}"
SHARD_DIR = re.compile(r"shard-(\d{5})-of-(\d{5})")  # group 1: index, group 2: count


WHOLE_FILES_BALANCE = 1.25  # whole files per shard when the largest shard's bytes are within 25 % of the mean


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``. When the inputs split evenly into whole files (:meth:`whole_files`), it reads
    its own files only; else it owns line ``line`` of input file number ``file`` (in the sorted file list) when
    ``(file + line) % count == index``, which spreads consecutive lines evenly but makes every shard read every
    file (64 machines each scanning 400 GB of JSON lines to tokenise a 64th of it). Both rules depend only on the
    inputs (their order and sizes), never on the machines, so the union of all shards is exactly the input."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1:
            raise UserInputError(f"--num_shards {self.count}: must be at least 1")
        if not 0 <= self.index < self.count:
            raise UserInputError(f"--shard_index {self.index}: must be in 0..{self.count - 1} (--num_shards {self.count})")

    def owns(self, file: int, line: int) -> bool:
        return (file + line) % self.count == self.index

    def whole_files(self, sizes: Sequence[int]) -> Optional[frozenset]:
        """Indices of the input files (of ``sizes`` bytes, in input order) this shard reads whole, or None where
        they do not split evenly: fewer files than shards, or the largest shard over :data:`WHOLE_FILES_BALANCE`
        times the mean (then :meth:`owns` splits by line). Files go largest first to the shard with the fewest
        bytes so far (ties: the earlier file, the lower shard), so every shard computes the same assignment."""
        if len(sizes) < self.count:
            return None
        loads = [(0, shard) for shard in range(self.count)]
        mine = []
        for file in sorted(range(len(sizes)), key=lambda f: (-sizes[f], f)):
            load, shard = heapq.heappop(loads)
            heapq.heappush(loads, (load + sizes[file], shard))
            if shard == self.index:
                mine.append(file)
        if max(load for load, _ in loads) > WHOLE_FILES_BALANCE * sum(sizes) / self.count:
            return None
        return frozenset(mine)

    @property
    def dir_name(self) -> str:
        return SHARD_DIR_FORMAT.format(index=self.index, count=self.count)

    @classmethod
    def from_launcher(cls, num_shards: int | None, shard_index: int | None, environ=os.environ) -> "Shard":
        """Explicit flags, else ``WORLD_SIZE``/``RANK`` as set by ``torchrun`` / ``colossalai run``, else 1 shard."""
        if num_shards is None and shard_index is None:
            if "WORLD_SIZE" not in environ or "RANK" not in environ:
                return cls()
            try:
                return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]))
            except ValueError:
                raise UserInputError(f"WORLD_SIZE={environ['WORLD_SIZE']!r} RANK={environ['RANK']!r}: "
                                     "not integers (give --num_shards and --shard_index)") from None
        if shard_index is None and num_shards == 1:
            return cls()
        if num_shards is None or shard_index is None:
            raise UserInputError("give both --num_shards and --shard_index (or neither, to take WORLD_SIZE and RANK)")
        return cls(shard_index, num_shards)


def check_one_run_per_folder(root: Path, shard: Shard, single_output: str, shard_entry: re.Pattern,
                             flag: str) -> None:
    """``root`` holds either the output of a 1-shard run (``single_output`` in it) or the shards of one N-shard run
    (entries whose whole name matches ``shard_entry``, its group 2 the shard count), never a mix: readers take
    everything under it, so a mix would use some data twice. ``flag`` names the output option in the errors."""
    if not root.is_dir():
        return
    if shard.count > 1 and (root / single_output).exists():
        raise UserInputError(f"{root}: holds the output of a 1-shard run; a {shard.count}-shard run cannot write its "
                             f"shards beside it (remove it or choose another {flag})")
    for entry in sorted(root.iterdir()):
        match = shard_entry.fullmatch(entry.name)
        if match and int(match.group(2)) != shard.count:
            raise UserInputError(f"{entry}: a shard of a {int(match.group(2))}-shard run; this run writes "
                                 f"{shard.count} shard(s) (remove it or choose another {flag})")


@dataclass(frozen=True)
class OutputLayout:
    """Where a run writes. ``manifest`` sits beside ``arrow_dir`` (training finds it as ``part.parent.parent``);
    the held-out split, when asked for, is ``eval_dir`` beside ``arrow_dir``."""

    cache_dir: Path
    jsonl_dir: Path
    arrow_dir: Path

    @property
    def manifest(self) -> Path:
        return self.arrow_dir.parent / "manifest.json"

    @property
    def eval_dir(self) -> Path:
        return self.arrow_dir.parent / "eval"

    @classmethod
    def under(cls, out_dir, shard: Shard = Shard()) -> "OutputLayout":
        """``OUT/{cache,jsonl,arrow}`` of ``--data_output_dirs OUT``; ``OUT/shard-IIIII-of-NNNNN/...`` for a shard
        of a run split over several."""
        out = Path(out_dir)
        if shard.count > 1:
            out = out / shard.dir_name
        return cls(out / "cache", out / "jsonl", out / "arrow")


@dataclass
class PrepConfig:
    """Options shared by pre-training and SFT preparation."""

    kind: ClassVar[str] = "base"
    input_dirs: list[Path]
    tokenizer_dir: Path
    output: OutputLayout
    max_length: int = flag(4096, help="tokens per sequence at most")
    num_bins: int = flag(10, name="num_spliced_dataset_bins",
                         help="bins (arrow parts) per output: each category is divided over all of them, so bucket "
                              "k of training holds every category")
    seed: int = flag(42, help="seeds the packing order and the held-out choice")
    num_proc: int = flag(1, help="tokenizer worker processes")
    strict: bool = True          # False = --skip_invalid: bad rows and empty parts are counted, not fatal
    overwrite: bool = flag(False, help="replace an existing prepared output")
    shard: Shard = Shard()
    holdout_fraction: float = flag(0.0, help="fraction of each category's documents (whole, seeded) written to "
                                             "OUT/eval as held-out data")
    mirror_text: bool = flag(False, help="add the decoded text of every sequence to the jsonl mirror (costs about a "
                                         "tokenisation)")

    def __post_init__(self):
        self.input_dirs = [Path(p) for p in self.input_dirs]
        self.tokenizer_dir = Path(self.tokenizer_dir)
        if not self.input_dirs:
            raise UserInputError("--data_input_dirs: no input directories given")
        if self.max_length < 2:
            raise UserInputError(f"--max_length {self.max_length}: must be at least 2")
        if self.num_bins < 1:
            raise UserInputError(f"--num_spliced_dataset_bins {self.num_bins}: must be at least 1")
        if self.num_proc < 1:
            raise UserInputError(f"--num_proc {self.num_proc}: must be at least 1")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise UserInputError(f"--holdout_fraction {self.holdout_fraction}: must be in [0, 1)")
        if self.holdout_fraction and self.output.eval_dir in (self.output.arrow_dir, self.output.jsonl_dir):
            raise UserInputError(f"{self.output.eval_dir}: the held-out split cannot share its folder with the output")

    @property
    def packs(self) -> bool:
        """Whether documents are packed several to a sequence (always for pre-training)."""
        return True


@dataclass
class PretrainPrepConfig(PrepConfig):
    """Pre-training: documents ``{source, target, category}`` packed into sequences of <= max_length."""

    kind: ClassVar[str] = "pretrain"


@dataclass
class SFTPrepConfig(PrepConfig):
    """SFT: conversations templated with ``chat_template`` and truncated to whole exchanges; one per row, or
    several whole conversations per row with ``packing``."""

    chat_template: str = "llama2"
    system_message: Optional[str] = flag(None, help="system message of conversations that do not start with their "
                                                    "own {\"from\": \"system\"}")
    packing: bool = flag(False, help="pack whole conversations into sequences of <= --max_length (position_ids "
                                     "restart per conversation)")
    kind: ClassVar[str] = "sft"

    @property
    def packs(self) -> bool:
        return self.packing
