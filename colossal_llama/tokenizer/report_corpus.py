"""A bounded, deterministic sample of real text split into Chinese and English lines, for tokenizer reports.

Files are read round-robin, one text at a time, so every file contributes; a text goes to the ``zh`` sample
when at least 30% of its non-space characters are CJK ideographs, to ``en`` when at least 50% are ASCII
letters, otherwise it is counted as ``other`` and not used. Each language stops at ``max_chars`` characters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from colossal_llama.utils.errors import DataError, UserInputError
from colossal_llama.utils.jsonl import is_jsonl_name, iter_jsonl, open_text
from colossal_llama.utils.paths import data_root

LANGUAGES = ("zh", "en")


@dataclass
class TextSample:
    """Sampled texts per language (``zh``/``en``), plus how many texts were left out as neither."""

    texts: dict[str, list[str]] = field(default_factory=lambda: {lang: [] for lang in LANGUAGES})
    n_chars: dict[str, int] = field(default_factory=lambda: {lang: 0 for lang in LANGUAGES})
    other: int = 0
    files: list[Path] = field(default_factory=list)

    def add(self, lang: str, text: str) -> None:
        self.texts[lang].append(text)
        self.n_chars[lang] += len(text)

    def all_texts(self) -> list[str]:
        return [t for lang in LANGUAGES for t in self.texts[lang]]


def default_report_files() -> list[Path]:
    """The bundled real pretraining corpora (Chinese news + reviews, English novel), when present."""
    pretrain = data_root() / "pretrain"
    return sorted(pretrain.glob("*.jsonl")) if pretrain.is_dir() else []


def language_of(text: str) -> str:
    """``"zh"``, ``"en"`` or ``"other"`` by the share of CJK ideographs / ASCII letters (see module doc)."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return "other"
    cjk = sum("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in chars)
    if cjk >= 0.3 * len(chars):
        return "zh"
    latin = sum(c.isascii() and c.isalpha() for c in chars)
    return "en" if latin >= 0.5 * len(chars) else "other"


def _texts_of(path: Path) -> Iterator[str]:
    """Texts of a jsonl file (``source + target`` or ``text``) or of a plain text file (one per line)."""
    if is_jsonl_name(path.name):
        for line_no, record in iter_jsonl(path):
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                yield record["text"]
            elif isinstance(record, dict) and isinstance(record.get("target"), str):
                source = record.get("source") or ""
                if not isinstance(source, str):
                    raise DataError(path, line_no, "source", f"must be a string, got {type(source).__name__}")
                yield source + record["target"]
            else:
                raise DataError(path, line_no, "target", "missing: expected a string 'target' (with 'source') or 'text'")
    else:
        with open_text(path) as fh:
            for line in fh:
                if line.strip():
                    yield line.rstrip("\n")


def sample_texts(files: list[Path], max_chars: int) -> TextSample:
    """Round-robin over ``files`` until each language holds ``max_chars`` characters or files run out."""
    if max_chars <= 0:
        raise UserInputError(f"--report_max_chars must be positive, got {max_chars}")
    for path in files:
        if not Path(path).is_file():
            raise UserInputError(f"{path}: report corpus file does not exist")
    sample = TextSample(files=[Path(p) for p in files])
    streams = [_texts_of(Path(p)) for p in files]
    while streams and any(sample.n_chars[lang] < max_chars for lang in LANGUAGES):
        for stream in list(streams):
            text = next(stream, None)
            if text is None:
                streams.remove(stream)
                continue
            lang = language_of(text)
            if lang == "other":
                sample.other += 1
            elif sample.n_chars[lang] < max_chars:
                sample.add(lang, text)
    return sample


def chars_per_token(texts: list[str], encode: Callable[[list[str]], list[list[int]]]) -> float:
    """Characters per token of ``texts`` under a batch ``encode`` (no special tokens); NaN for no tokens."""
    if not texts:
        return float("nan")
    n_tokens = sum(len(ids) for ids in encode(texts))
    return sum(len(t) for t in texts) / n_tokens if n_tokens else float("nan")
