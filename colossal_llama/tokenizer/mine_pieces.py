"""Mine candidate vocabulary pieces for tokenizer expansion, from a domain corpus or a word list.

Corpus mode trains a SentencePiece model (the ``sentencepiece`` trainer) on the text fields of jsonl files and
keeps its pieces, in model order (most useful first), that the base tokenizer does not already have. Word-list
mode reads ``word freq [pos]`` lines (e.g. jieba's dictionary) and keeps the most frequent absent words. Both
write ``{"piece": ...}`` jsonl for ``init_tokenizer.py`` and are deterministic: a single training thread, frequency
ties broken by file order, and a fixed sample of the corpus.

The sample is ``--max_sentences`` lines drawn from every file, not the first lines of the first files: each file
gives its first lines, as many as its share of the corpus' bytes on disk (what a file that runs out leaves goes to
the files after it, in order). Only those lines are read, so mining a 100 GB corpus reads about as much as mining a
small one; a corpus with fewer lines than ``--max_sentences`` is used whole, in file order.

The ``'▁'`` word-start marker is stripped sensibly: for pieces holding CJK characters (scripts written without
spaces, where a marker would only match after a space) the marker is dropped; for other pieces a leading
marker becomes a leading space (``'▁the'`` -> ``' the'``), which ``init_tokenizer`` spells back as ``'▁the'`` for
SentencePiece bases and which matches the decoded ``'Ġthe'`` entry of byte-level BPE bases.

For byte-level BPE bases (SmolLM2, LLaMA-3) new pieces become *added tokens*, matched anywhere in the raw text,
so pieces holding ASCII letters or digits are dropped (counted): ``xp`` mined from "Windows XP" would otherwise
be cut out of "expect" and English would encode worse.
"""
from __future__ import annotations

import io
import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from tqdm import tqdm

from colossal_llama.tokenizer.base_vocab import SP_SPACE, base_vocab_texts
from colossal_llama.tokenizer.pieces import write_pieces_file
from colossal_llama.utils.apportion import largest_remainder
from colossal_llama.utils.cli import OneLineErrorParser, add_flags, config_from, flag
from colossal_llama.utils.errors import DataError, UserInputError, cli_entry
from colossal_llama.utils.jsonl import FoundFiles, iter_jsonl, scan_jsonl_files

MAX_SENTENCE_BYTES = 8192  # longer lines are cut into chunks (counted), never silently dropped by the trainer
TEXT_FIELDS = ("text", "source", "target", "content")


@dataclass
class MiningReport:
    """Counts of a mining run: candidates in, each drop reason, pieces written."""

    mode: str  # "corpus" or "wordlist"
    candidates: int = 0
    dropped: Counter = field(default_factory=Counter)
    written: int = 0
    sentences: int = 0  # corpus mode: lines given to the trainer
    files: int = 0  # corpus mode: files of the corpus
    files_whole: int = 0  # corpus mode: files read to their end (the others gave their first lines)
    files_ignored: int = 0  # corpus mode: files of the --corpus folders not read (not JSON lines by name)
    chunked_lines: int = 0  # corpus mode, records read: lines longer than MAX_SENTENCE_BYTES, cut into chunks
    records_without_text: int = 0  # corpus mode, records read

    def format(self) -> str:
        lines = [f"mining ({self.mode}): {self.candidates} candidates -> {self.written} pieces written"]
        if self.mode == "corpus":
            lines.append(
                f"trainer input: {self.sentences} lines from {self.files} files ({self.files_whole} read to the end, "
                f"the others' first lines in proportion to their size; {self.chunked_lines} long lines cut into "
                f"chunks, {self.records_without_text} records without text)"
            )
        if self.files_ignored:
            lines.append(f"corpus files ignored, not JSON lines by name: {self.files_ignored} (named in the warning "
                         "above)")
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"dropped {n}: {reason}")
        return "\n".join(lines)


# ---------------------------------------------------------------- candidates from a corpus


def _record_texts(record) -> Iterator[str]:
    """String text fields of a jsonl record, including ``messages[].content``."""
    if not isinstance(record, dict):
        return
    for key in TEXT_FIELDS:
        if isinstance(record.get(key), str):
            yield record[key]
    for message in record.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            yield message["content"]


def _records(path: Path) -> Iterator[tuple[bool, list[str], int]]:
    """Per record of ``path``: (has text, its trainer lines in order, lines cut into chunks)."""
    for _, record in iter_jsonl(path):
        texts = [t for t in _record_texts(record) if t.strip()]
        pieces = [_chunks(line) for text in texts for line in text.splitlines() if line.strip()]
        yield bool(texts), [chunk for chunks in pieces for chunk in chunks], sum(len(c) > 1 for c in pieces)


@dataclass
class _FileSample:
    """The lines taken from one file: always its first ones."""

    path: Path
    lines: list[str] = field(default_factory=list)
    records_counted: int = 0  # its records already in the report's counts (a second read counts no record twice)
    exhausted: bool = False  # read to its end


def _take(sample: _FileSample, want: int, report: MiningReport, bar) -> None:
    """Take up to ``want`` more lines from ``sample.path`` (after those already taken); stops reading when done."""
    if want <= 0 or sample.exhausted:
        return
    skip = len(sample.lines)
    for index, (has_text, lines, chunked) in enumerate(_records(sample.path)):
        if index >= sample.records_counted:
            report.records_without_text += not has_text
            report.chunked_lines += chunked
            sample.records_counted = index + 1
        new = lines[skip:][:want]
        skip = max(0, skip - len(lines))
        sample.lines.extend(new)
        bar.update(len(new))
        want -= len(new)
        if want == 0:
            return
    sample.exhausted = True


def corpus_lines(files: list[Path], max_sentences: int, report: MiningReport) -> list[str]:
    """At most ``max_sentences`` non-blank lines of the corpus' text fields (long lines chunked; all of them when the
    corpus has fewer), sampled as the module docstring says: file f gives its first lines, its share of the bytes
    first, then what other files left over."""
    samples = [_FileSample(path) for path in files]
    with tqdm(total=max_sentences, desc="reading corpus", unit="line") as bar:
        sizes = np.array([max(path.stat().st_size, 1) for path in files], dtype=np.float64)
        for sample, share in zip(samples, largest_remainder(sizes / sizes.sum(), max_sentences)):
            _take(sample, int(share), report, bar)
        taken = sum(len(sample.lines) for sample in samples)
        for sample in samples:  # what files that ran out left over, in file order
            before = len(sample.lines)
            _take(sample, max_sentences - taken, report, bar)
            taken += len(sample.lines) - before
    report.files, report.files_whole = len(files), sum(s.exhausted for s in samples)
    lines = [line for sample in samples for line in sample.lines]
    report.sentences = len(lines)
    return lines


def _chunks(line: str) -> list[str]:
    """Cut ``line`` into pieces of at most MAX_SENTENCE_BYTES UTF-8 bytes (at character boundaries)."""
    if len(line.encode("utf-8")) <= MAX_SENTENCE_BYTES:
        return [line]
    step = MAX_SENTENCE_BYTES // 4  # a character is at most 4 bytes
    return [line[i : i + step] for i in range(0, len(line), step)]


def train_sp_pieces(lines: list[str], vocab_size: int, model_type: str = "bpe", character_coverage: float = 0.9995) -> list[str]:
    """Train SentencePiece on ``lines``; its normal pieces in model order (SP spelling, with ``'▁'``)."""
    import sentencepiece as spm

    if not lines:
        raise UserInputError("the corpus has no text to train on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, hard_vocab_limit=False, num_threads=1, bos_id=-1, eos_id=-1,
            max_sentence_length=MAX_SENTENCE_BYTES, split_digits=True, minloglevel=2,
        )
    except RuntimeError as err:
        raise UserInputError(f"sentencepiece training failed: {str(err).splitlines()[0]}") from None
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return [
        processor.id_to_piece(i)
        for i in range(processor.get_piece_size())
        if not (processor.is_control(i) or processor.is_unknown(i) or processor.is_byte(i) or processor.is_unused(i))
    ]


def has_cjk(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in text)


def piece_text(sp_piece: str) -> str:
    """SP piece -> text for a pieces file (module doc): CJK pieces lose the marker, others get a space."""
    body = sp_piece.lstrip(SP_SPACE).replace(SP_SPACE, " ")
    if has_cjk(body) or not sp_piece.startswith(SP_SPACE):
        return body
    return " " + body


# ---------------------------------------------------------------- candidates from a word list


def read_wordlist(path: Path, min_freq: int, report: MiningReport) -> list[str]:
    """Words of ``word freq [pos]`` lines with ``freq >= min_freq``, most frequent first (ties: file order)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: word list does not exist")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise DataError(path, line_no, "freq", "missing: expected 'word freq [pos]'")
            try:
                freq = int(fields[1])
            except ValueError:
                raise DataError(path, line_no, "freq", f"not an integer: {fields[1]!r}") from None
            if freq < min_freq:
                report.dropped[f"frequency below --min_freq {min_freq}"] += 1
                continue
            rows.append((-freq, line_no, fields[0]))
    rows.sort()
    return [word for _, _, word in rows]


def top_cjk_words(path: Path, count: int, min_chars: int = 2, max_chars: Optional[int] = None) -> list[str]:
    """The ``count`` most frequent words of a ``word freq [pos]`` list made only of CJK characters, with
    ``min_chars``..``max_chars`` characters (demo and test vocabularies, e.g. from jieba_dict.txt)."""
    words = read_wordlist(path, min_freq=1, report=MiningReport(mode="wordlist"))
    fits = (w for w in words if len(w) >= min_chars and (max_chars is None or len(w) <= max_chars)
            and all(has_cjk(c) for c in w))
    return list(itertools.islice(fits, count))


# ---------------------------------------------------------------- selection


ASCII_WORD_REASON = "holds ASCII letters or digits (byte-level BPE base: an added token would be cut out of English words)"


def has_ascii_alnum(text: str) -> bool:
    return any(c.isascii() and c.isalnum() for c in text)


def select_pieces(
    candidates: list[str], base_texts: Optional[set[str]], min_piece_chars: int, top_k: Optional[int], report: MiningReport,
    drop_ascii_words: bool = False,
) -> list[str]:
    """Candidates (text spelling, in priority order) minus short ones, base-vocabulary ones and repeats; top_k kept.

    ``drop_ascii_words`` (byte-level BPE bases) also drops pieces holding ASCII letters or digits: new pieces
    become added tokens there, matched anywhere in the text, so ``xp`` would be cut out of ``expect``.
    """
    report.candidates += len(candidates)
    kept: list[str] = []
    seen: set[str] = set()
    for text in candidates:
        if len(text.strip()) < min_piece_chars:
            report.dropped[f"shorter than --min_piece_chars {min_piece_chars}"] += 1
        elif drop_ascii_words and has_ascii_alnum(text):
            report.dropped[ASCII_WORD_REASON] += 1
        elif base_texts is not None and text in base_texts:
            report.dropped["already in the base vocabulary"] += 1
        elif text in seen:
            report.dropped["duplicate after stripping the '▁' marker"] += 1
        elif top_k is not None and len(kept) >= top_k:
            report.dropped[f"beyond --top_k {top_k}"] += 1
        else:
            seen.add(text)
            kept.append(text)
    report.written = len(kept)
    return kept


# ---------------------------------------------------------------- library entry point + CLI


@dataclass
class MineConfig:
    """What to mine and how (this class *is* the command line)."""

    output: Path = flag(help='jsonl of {"piece": ...} (never one of the inputs)')
    overwrite: bool = flag(False, help="replace --output if it exists")
    corpus: list[Path] = flag([], help="jsonl files or dirs (text fields are used)")
    from_wordlist: Optional[Path] = flag(None, help="'word freq [pos]' lines, e.g. jieba_dict.txt")
    base_tokenizer_dir: Optional[Path] = flag(None, help="drop pieces this tokenizer already has")
    vocab_size: int = flag(8000, help="SentencePiece vocabulary to train (corpus mode)")
    max_sentences: int = flag(200_000, help="corpus lines to train on: each file's first lines, in proportion to its "
                                            "size")
    min_piece_chars: int = flag(2, help="shortest piece kept (characters, marker excluded)")
    top_k: Optional[int] = flag(None, help="keep at most this many pieces")
    min_freq: int = flag(1, help="word-list mode: lowest frequency kept")
    model_type: str = flag("bpe", choices=("bpe", "unigram"), help="SentencePiece model type (corpus mode)")
    character_coverage: float = flag(0.9995, help="share of characters the trained model must cover (vocab_size "
                                                  "must exceed the chars kept)")


def mine_pieces(cfg: MineConfig) -> tuple[list[str], MiningReport]:
    """Mine pieces per ``cfg`` (exactly one of ``corpus`` / ``from_wordlist``), write ``cfg.output``."""
    if bool(cfg.corpus) == (cfg.from_wordlist is not None):
        raise UserInputError("give exactly one of --corpus or --from_wordlist")
    for name in ("vocab_size", "max_sentences", "min_piece_chars"):
        if getattr(cfg, name) < 1:
            raise UserInputError(f"--{name} must be positive, got {getattr(cfg, name)}")
    found = scan_jsonl_files(cfg.corpus) if cfg.corpus else FoundFiles()
    corpus_files = found.files
    _check_output(cfg, corpus_files)
    base_kind, base_texts = None, None
    if cfg.base_tokenizer_dir is not None:
        base_kind, base_texts = base_vocab_texts(cfg.base_tokenizer_dir)
    if cfg.corpus:
        report = MiningReport(mode="corpus", files_ignored=len(found.ignored))
        lines = corpus_lines(corpus_files, cfg.max_sentences, report)
        candidates = [piece_text(p) for p in train_sp_pieces(lines, cfg.vocab_size, cfg.model_type, cfg.character_coverage)]
    else:
        report = MiningReport(mode="wordlist")
        candidates = read_wordlist(cfg.from_wordlist, cfg.min_freq, report)
    pieces = select_pieces(candidates, base_texts, cfg.min_piece_chars, cfg.top_k, report,
                           drop_ascii_words=base_kind == "bpe")
    write_pieces_file(cfg.output, pieces)
    return pieces, report


def _check_output(cfg: MineConfig, corpus_files: list[Path]) -> None:
    """Before any work: ``cfg.output`` is never an input (not even with ``--overwrite``: mining would replace the
    corpus it reads), and an existing file is replaced only with ``--overwrite``."""
    inputs = list(corpus_files) + [p for p in (cfg.from_wordlist,) if p is not None]
    if cfg.base_tokenizer_dir is not None and Path(cfg.base_tokenizer_dir).is_dir():
        inputs += [p for p in Path(cfg.base_tokenizer_dir).iterdir() if p.is_file()]
    output = cfg.output.resolve()
    for given in inputs:
        if Path(given).resolve() == output:
            raise UserInputError(f"{cfg.output}: --output is one of the inputs ({given}); choose another file")
    if cfg.output.is_dir():
        raise UserInputError(f"{cfg.output}: --output is a directory")
    if cfg.output.exists() and not cfg.overwrite:
        raise UserInputError(f"{cfg.output}: --output already exists (pass --overwrite to replace it)")


def parse_args(argv=None) -> MineConfig:
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    add_flags(p, MineConfig)
    return config_from(p.parse_args(argv), MineConfig)


@cli_entry
def main(argv=None) -> int:
    cfg = parse_args(argv)
    pieces, report = mine_pieces(cfg)
    print(report.format())
    print(f"wrote {len(pieces)} pieces to {cfg.output}")
    return 0


if __name__ == "__main__":
    main()
