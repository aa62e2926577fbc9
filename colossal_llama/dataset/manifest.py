"""``manifest.json``: the one description of a prepared output, shared by the writer and every reader.

It is written last (atomically): its presence means the output is complete. Readers get a :class:`Manifest`
(attributes, not string keys) or a one-line :class:`~colossal_llama.utils.errors.UserInputError`.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from colossal_llama.dataset.accounting import PrepCounts
from colossal_llama.dataset.chat_templates import JINJA_SHA256
from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.json_files import read_json, write_json

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: before shards and the held-out split (same meaning for every field it has)
EVAL_DIR = "eval"
# What every manifest of one training run must agree on (bucket k is the union of part k of all of them).
AGREEMENT_FIELDS = ("kind", "tokenizer_fingerprint", "max_length", "num_bins")


@dataclass
class PartEntry:
    """One written part: bin ``bin`` of every category (the held-out split has one part, bin 0)."""

    name: str
    bin: int
    num_sequences: int
    num_tokens: int
    per_category: dict  # category -> {"sequences": n, "tokens": t}

    def to_json(self) -> dict:
        return {"name": self.name, "bin": self.bin, "num_sequences": self.num_sequences,
                "num_tokens": self.num_tokens, "per_category": dict(sorted(self.per_category.items()))}


@dataclass(frozen=True)
class InputFiles:
    """The input files a preparation read, in their order: the shards of one output must all have read the same,
    since each takes whole files or the lines ``(file index + line) % num_shards == shard index`` of them by
    their order and sizes (:class:`~colossal_llama.dataset.config.Shard`)."""

    files: int
    bytes: int
    fingerprint: str  # sha256 of each file's name (within its --data_input_dirs entry) and size, in order
    # sha256 of each file's first and last SAMPLE_BYTES, in order (None: an output older than this record). Names
    # and sizes alone are the same for entries swapped (a/x.jsonl, b/x.jsonl of one size given as a,b then b,a);
    # a same-size edit inside a larger file's middle still goes unseen (hashing every byte would read it twice).
    contents: str | None = None

    def to_json(self) -> dict:
        return {"files": self.files, "bytes": self.bytes, "fingerprint": self.fingerprint, "contents": self.contents}

    @classmethod
    def of(cls, files: list[Path], input_dirs: list[Path]) -> "InputFiles":
        digest, contents, total = hashlib.sha256(), hashlib.sha256(), 0
        for path in files:
            size = path.stat().st_size
            digest.update(f"{_name_within(path, input_dirs)}\t{size}\n".encode())
            contents.update(_sample_digest(path, size))
            total += size
        return cls(len(files), total, digest.hexdigest(), contents.hexdigest())

    def mismatch(self, other: "InputFiles") -> str | None:
        """How ``other`` differs from these inputs (``None``: the same files, as far as both records tell)."""
        if (self.files, self.bytes, self.fingerprint) != (other.files, other.bytes, other.fingerprint):
            return "names or sizes differ"
        if None not in (self.contents, other.contents) and self.contents != other.contents:
            return "the same names and sizes, other contents: --data_input_dirs folders swapped, or files edited"
        return None

    def describe(self) -> str:
        return f"{self.files} files, {self.bytes:,} bytes"


SAMPLE_BYTES = 64 << 10


def _sample_digest(path: Path, size: int) -> bytes:
    """sha256 of the first and last :data:`SAMPLE_BYTES` of ``path`` (all of it when smaller): two reads per file,
    whatever its size."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            fh.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            digest.update(fh.read(SAMPLE_BYTES))
    return digest.digest()


def missing_manifest(path: Path) -> UserInputError:
    """The one-line error for an output without its manifest (``path``), which is written last."""
    return UserInputError(f"{path}: manifest missing (data preparation did not finish: prepare it again, with "
                          "--overwrite; or the path is not OUT/arrow/part-*)")


def _name_within(path: Path, input_dirs: list[Path]) -> str:
    """``path`` relative to the --data_input_dirs entry it was found under (its name when it was given itself): a
    machine may hold the same files under another folder."""
    for folder in input_dirs:
        with contextlib.suppress(ValueError):
            return path.relative_to(folder).as_posix() if path != Path(folder) else path.name
    return path.name


@dataclass
class Manifest:
    kind: str                          # "pretrain" | "sft"
    tokenizer_dir: str
    tokenizer_fingerprint: str
    vocab_size: int
    max_length: int
    num_bins: int
    seed: int
    parts: list[PartEntry]
    counts: PrepCounts = field(default_factory=PrepCounts)
    chat_template: dict | None = None  # SFT: the template block copied next to trained models
    packing: bool = True               # several documents per row (always for pre-training)
    shard_index: int = 0
    num_shards: int = 1
    holdout_fraction: float = 0.0
    eval_dir: str | None = None        # folder (beside arrow/) of the held-out parts, when there are any
    eval_parts: list[PartEntry] = field(default_factory=list)
    inputs: InputFiles | None = None   # what was read (None: an output older than this record)
    format_version: int = FORMAT_VERSION

    def split_parts(self, split: str) -> list[PartEntry]:
        """The parts of ``"train"`` (arrow/) or ``"eval"`` (the held-out split)."""
        return self.eval_parts if split == "eval" else self.parts

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version, "kind": self.kind, "tokenizer_dir": self.tokenizer_dir,
            "tokenizer_fingerprint": self.tokenizer_fingerprint, "vocab_size": self.vocab_size,
            "max_length": self.max_length, "num_bins": self.num_bins, "seed": self.seed,
            "chat_template": self.chat_template, "packing": self.packing,
            "shard_index": self.shard_index, "num_shards": self.num_shards,
            "holdout_fraction": self.holdout_fraction, "eval_dir": self.eval_dir,
            "parts": [p.to_json() for p in self.parts], "eval_parts": [p.to_json() for p in self.eval_parts],
            "counts": self.counts.to_json(), "inputs": self.inputs.to_json() if self.inputs else None,
        }

    def write(self, path: Path) -> None:
        """Atomically: its presence means the output is complete."""
        write_json(path, self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls, data, path: Path) -> "Manifest":
        if not isinstance(data, dict):
            raise UserInputError(f"{path}: expected a JSON object")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise UserInputError(f"{path}: format_version: {version} (this version reads "
                                 f"{', '.join(map(str, READABLE_VERSIONS))})")
        for key in ("kind", "tokenizer_fingerprint", "vocab_size", "max_length", "parts"):
            if key not in data:
                raise UserInputError(f"{path}: {key}: missing")
        try:
            parts = [PartEntry(**p) for p in data["parts"]]
            eval_parts = [PartEntry(**p) for p in data.get("eval_parts", [])]
        except TypeError as err:
            raise UserInputError(f"{path}: parts: malformed entry ({err})") from None
        try:
            inputs = InputFiles(**data["inputs"]) if data.get("inputs") else None
        except TypeError as err:
            raise UserInputError(f"{path}: inputs: malformed ({err})") from None
        return cls(
            kind=data["kind"], tokenizer_dir=data.get("tokenizer_dir", ""),
            tokenizer_fingerprint=data["tokenizer_fingerprint"], vocab_size=data["vocab_size"],
            max_length=data["max_length"], num_bins=data.get("num_bins", len(parts)), seed=data.get("seed", 0),
            parts=parts, counts=PrepCounts.from_json(data.get("counts", {})),
            chat_template=data.get("chat_template"), packing=data.get("packing", data["kind"] == "pretrain"),
            shard_index=data.get("shard_index", 0), num_shards=data.get("num_shards", 1),
            holdout_fraction=data.get("holdout_fraction", 0.0), eval_dir=data.get("eval_dir"),
            eval_parts=eval_parts, inputs=inputs, format_version=version,
        )

    @classmethod
    def read(cls, path) -> "Manifest":
        """The manifest at ``path``. One-line errors (missing: the preparation did not finish)."""
        path = Path(path)
        if not path.is_file():
            raise missing_manifest(path)
        return cls.from_json(read_json(path), path)

    def disagreement(self, other: "Manifest") -> str | None:
        """The first of :data:`AGREEMENT_FIELDS` (then the chat template) on which ``other`` differs."""
        for name in AGREEMENT_FIELDS:
            if getattr(self, name) != getattr(other, name):
                return name
        return None if _same_template(self.chat_template, other.chat_template) else "chat_template"


def _same_template(mine: dict | None, theirs: dict | None) -> bool:
    """Chat-template blocks alike, but for the Jinja hash where one of them predates it (older data of the same
    template mixed with newer is no mix of templates)."""
    if mine is None or theirs is None or (JINJA_SHA256 in mine) == (JINJA_SHA256 in theirs):
        return mine == theirs
    return ({k: v for k, v in mine.items() if k != JINJA_SHA256}
            == {k: v for k, v in theirs.items() if k != JINJA_SHA256})
