"""Vocabulary expansion: pieces mined from the corpus versus a dictionary word list (the README's table).

Base: the real Mistral-7B SentencePiece tokenizer (LLaMA-2 layout, 32,000 pieces). Text: the real Chinese
corpora of the data folder (People's Daily news + product reviews). The last ``--held_out`` rows of each file are
held out: pieces are mined from the other rows only, and every figure is measured on the held-out rows (plus
the last 64 passages of the English novel, which no row of the mining corpus contains either).

Rows of the table:
- the base tokenizer;
- ``mine_pieces.py --corpus`` (SentencePiece BPE trained on the mining rows), the first pieces in model order
  taken so that the expanded vocabulary is ``--target_vocab`` (69,104: Colossal-LLaMA-2's size);
- ``mine_pieces.py --from_wordlist jieba_dict.txt --top_k N`` for each N of ``--jieba_words``.
Columns: vocabulary after expansion (and what was added: requested pieces + single characters + bridge
sub-words, see ``init_tokenizer``), tokens per character and average tokens per sample on the held-out Chinese
rows, tokens per character on the held-out English passages, and whether sentencepiece and the converted HF
tokenizer agree on every held-out row.

    python benchmarks/vocab_expansion.py                     # ~2 minutes on 2 CPU cores
    python benchmarks/vocab_expansion.py --target_vocab 40000 --jieba_words 3000 --held_out 200   # quick
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from colossal_llama.tokenizer.init_tokenizer import expand_tokenizer
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.tokenizer.mine_pieces import MineConfig, mine_pieces
from colossal_llama.utils.paths import data_root, mistral_tokenizer_model

ZH_FILES = ("zh_news_peoples_daily_199801.jsonl", "zh_reviews.jsonl")
EN_FILE = "en_novel_botchan.jsonl"
EN_HELD_OUT = 64


@dataclass
class Row:
    name: str
    vocab: int
    pieces: int = 0
    chars: int = 0
    bridges: int = 0
    zh_tokens_per_char: float = 0.0
    zh_tokens_per_sample: float = 0.0
    en_tokens_per_char: float = 0.0
    agree: str = ""
    seconds: float = 0.0


def split_corpus(pretrain: Path, held_out: int, work: Path) -> tuple:
    """Write the mining rows to ``work/mine/`` and the held-out rows to ``work/held_out_*.jsonl``; return
    ``(mine_dir, zh_texts, en_texts, held_out_files)``."""
    mine = work / "mine"
    mine.mkdir(parents=True)
    zh_rows = []
    for name in ZH_FILES:
        lines = (pretrain / name).read_text(encoding="utf-8").splitlines()
        if len(lines) <= 2 * held_out:
            raise SystemExit(f"{pretrain / name}: {len(lines)} rows, too few to hold out {held_out}")
        (mine / name).write_text("\n".join(lines[:-held_out]) + "\n", encoding="utf-8")
        zh_rows += lines[-held_out:]
    en_rows = (pretrain / EN_FILE).read_text(encoding="utf-8").splitlines()[-EN_HELD_OUT:]
    files = []
    for lang, rows in (("zh", zh_rows), ("en", en_rows)):
        files.append(work / f"held_out_{lang}.jsonl")
        files[-1].write_text("\n".join(rows) + "\n", encoding="utf-8")
    texts = [[t for t in (json.loads(r)["target"] for r in rows) if t.strip()] for rows in (zh_rows, en_rows)]
    return mine, texts[0], texts[1], files


def tokens(tokenizer, texts: List[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def measure(name: str, folder: Path, zh: List[str], en: List[str], report=None, seconds: float = 0.0) -> Row:
    tok = load_tokenizer(folder)
    zh_tokens = tokens(tok, zh)
    row = Row(name, len(tok), zh_tokens_per_char=zh_tokens / sum(map(len, zh)),
              zh_tokens_per_sample=zh_tokens / len(zh), en_tokens_per_char=tokens(tok, en) / sum(map(len, en)),
              seconds=seconds)
    if report is not None:
        row.pieces, row.chars, row.bridges = report.pieces_added, report.component_chars_added, report.bridge_pieces_added
        row.agree = f"{report.check_identical}/{report.check_total}"
    return row


def expand(base: Path, out: Path, pieces: List[str], held_out_files: List[Path]):
    return expand_tokenizer(base, out, pieces, overwrite=True, report_files=held_out_files,
                            report_max_chars=10 ** 7)


def mined_row(base: Path, mine_dir: Path, work: Path, target_vocab: int, mine_vocab: int, zh, en, files) -> Row:
    """Corpus-mined pieces, the first ``k`` in model order, ``k`` adjusted until the vocabulary hits the target."""
    started = time.monotonic()
    pieces, _ = mine_pieces(MineConfig(output=work / "mined.jsonl", corpus=[mine_dir], base_tokenizer_dir=base,
                                       vocab_size=mine_vocab, max_sentences=10 ** 7))
    before = len(load_tokenizer(base))
    count, report = min(len(pieces), target_vocab - before), None
    for _ in range(6):  # single characters (and bridges, if any) added by expansion shift the size a little
        report = expand(base, work / "tok_mined", pieces[:count], files)
        if report.vocab_after == target_vocab or (report.vocab_after < target_vocab and count == len(pieces)):
            break
        count = min(len(pieces), count + target_vocab - report.vocab_after)
    name = f"corpus-mined, SentencePiece BPE (first {count:,} of {len(pieces):,} pieces)"
    return measure(name, work / "tok_mined", zh, en, report, time.monotonic() - started)


def wordlist_row(base: Path, wordlist: Path, work: Path, top_k: int, zh, en, files) -> Row:
    started = time.monotonic()
    pieces, _ = mine_pieces(MineConfig(output=work / f"jieba_{top_k}.jsonl", from_wordlist=wordlist,
                                       base_tokenizer_dir=base, top_k=top_k))
    report = expand(base, work / f"tok_jieba_{top_k}", pieces, files)
    return measure(f"jieba word list, {top_k:,} most frequent words", work / f"tok_jieba_{top_k}", zh, en, report,
                   time.monotonic() - started)


def format_table(rows: List[Row], held_zh: int, held_en: int) -> str:
    lines = [f"held out: {held_zh} Chinese rows, {held_en} English passages (not in the mining corpus)", "",
             "| new pieces from | vocabulary | added: pieces + characters + bridges | zh tokens/char | "
             "zh tokens/sample | en tokens/char | sp = HF | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        added = f"{r.pieces:,} + {r.chars:,} + {r.bridges:,}" if r.agree else "-"
        lines.append(f"| {r.name} | {r.vocab:,} | {added} | {r.zh_tokens_per_char:.3f} | "
                     f"{r.zh_tokens_per_sample:.1f} | {r.en_tokens_per_char:.3f} | {r.agree or '-'} | "
                     f"{r.seconds:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", type=Path, default=None, help="data folder (default: data_root())")
    p.add_argument("--held_out", type=int, default=1000, help="last rows of each Chinese file held out")
    p.add_argument("--target_vocab", type=int, default=69104, help="vocabulary of the corpus-mined row")
    p.add_argument("--mine_vocab_size", type=int, default=45000, help="SentencePiece vocabulary to train")
    p.add_argument("--jieba_words", type=int, nargs="*", default=[3000, 40000], help="word-list rows (top_k)")
    args = p.parse_args(argv)
    data = args.data_dir or data_root()
    base = mistral_tokenizer_model().parent if args.data_dir is None else data / "tokenizers" / "mistral-7b-v0.1"
    with tempfile.TemporaryDirectory(prefix="vocab_expansion-") as tmp:
        work = Path(tmp)
        mine_dir, zh, en, files = split_corpus(data / "pretrain", args.held_out, work)
        rows = [measure("none (Mistral-7B / LLaMA-2 layout)", base, zh, en)]
        rows.append(mined_row(base, mine_dir, work, args.target_vocab, args.mine_vocab_size, zh, en, files))
        for top_k in args.jieba_words:
            rows.append(wordlist_row(base, data / "vocab" / "jieba_dict.txt", work, top_k, zh, en, files))
    print(format_table(rows, len(zh), len(en)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
