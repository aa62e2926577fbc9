"""Typed configuration of a data-preparation run and the summary it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from colossal_llama.utils.errors import UserInputError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class OutputLayout:
    """Where a run writes. ``manifest`` sits beside ``arrow_dir`` (training finds it as ``part.parent.parent``)."""

    cache_dir: Path
    jsonl_dir: Path
    arrow_dir: Path

    @property
    def manifest(self) -> Path:
        return self.arrow_dir.parent / "manifest.json"

    @classmethod
    def under(cls, out_dir) -> "OutputLayout":
        """The standard layout ``OUT/{cache,jsonl,arrow}`` of ``--data_output_dirs OUT``."""
        out = Path(out_dir)
        return cls(out / "cache", out / "jsonl", out / "arrow")


@dataclass
class PrepConfig:
    """Options shared by pre-training and SFT preparation."""

    kind: ClassVar[str] = "base"
    input_dirs: list[Path]
    tokenizer_dir: Path
    output: OutputLayout
    max_length: int = 4096
    num_bins: int = 10
    seed: int = 42
    num_proc: int = 1
    strict: bool = True          # False = --skip_invalid: bad rows and empty parts are counted, not fatal
    overwrite: bool = False

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


@dataclass
class PretrainPrepConfig(PrepConfig):
    """Pre-training: documents ``{source, target, category}`` packed into sequences of <= max_length."""

    kind: ClassVar[str] = "pretrain"


@dataclass
class SFTPrepConfig(PrepConfig):
    """SFT: conversations, one per row, templated with ``chat_template`` and truncated to whole exchanges."""

    chat_template: str = "llama2"
    system_message: str | None = None
    kind: ClassVar[str] = "sft"


@dataclass
class PrepSummary:
    """What a run did, in numbers; the same data as ``manifest.json`` plus the output location."""

    manifest_path: Path
    arrow_dir: Path
    manifest: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)  # wall time per stage (not in the manifest: it must be reproducible)

    @property
    def counts(self) -> dict:
        return self.manifest["counts"]

    @property
    def part_dirs(self) -> list[Path]:
        return [self.arrow_dir / p["name"] for p in self.manifest["parts"]]
