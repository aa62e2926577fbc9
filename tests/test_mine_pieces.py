"""Mining new vocabulary pieces from the real Chinese news corpus and from jieba's real word list."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from colossal_llama.tokenizer.base_vocab import SP_SPACE, bpe_vocab_texts, load_sp_proto, text_to_sp_piece
from colossal_llama.tokenizer.init_tokenizer import expand_tokenizer
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.tokenizer.mine_pieces import ASCII_WORD_REASON, MineConfig, has_ascii_alnum, main, mine_pieces
from colossal_llama.tokenizer.pieces import read_pieces_file
from colossal_llama.utils.errors import DataError, UserInputError


@pytest.fixture(scope="module")
def mistral_src(tmp_path_factory, mistral_sp_model) -> Path:
    src = tmp_path_factory.mktemp("mistral_src")
    shutil.copy(mistral_sp_model, src / "tokenizer.model")
    return src


def corpus_config(data_dir, base, output, **overrides) -> MineConfig:
    kwargs = dict(
        output=output, corpus=[data_dir / "pretrain" / "zh_news_peoples_daily_199801.jsonl"],
        base_tokenizer_dir=base, vocab_size=6000, max_sentences=2000,
    )
    return MineConfig(**{**kwargs, **overrides})


def test_corpus_mining_keeps_only_pieces_absent_from_the_sp_base_and_is_deterministic(tmp_path, data_dir, mistral_src):
    first, report = mine_pieces(corpus_config(data_dir, mistral_src, tmp_path / "a.jsonl"))
    second, _ = mine_pieces(corpus_config(data_dir, mistral_src, tmp_path / "b.jsonl"))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert first == second == read_pieces_file(tmp_path / "a.jsonl").pieces
    assert len(first) > 1000 and report.written == len(first)
    base = {p.piece for p in load_sp_proto(mistral_src / "tokenizer.model").pieces}
    assert not any(text_to_sp_piece(p) in base for p in first)
    assert report.dropped["already in the base vocabulary"] > 0
    assert all(SP_SPACE not in p and len(p.strip()) >= 2 for p in first)
    assert "中国" in first[:50]  # the news corpus' most frequent word, CJK pieces lose the '▁' marker
    assert report.sentences == 2000 and report.sentences_unused >= 1000  # the news file has >= 3,000 lines
    assert report.candidates == report.written + sum(report.dropped.values())


def test_mined_pieces_expand_the_base_and_agree(tmp_path, data_dir, mistral_src):
    pieces, _ = mine_pieces(corpus_config(data_dir, mistral_src, tmp_path / "p.jsonl", top_k=1500))
    assert len(pieces) == 1500
    report = expand_tokenizer(
        mistral_src, tmp_path / "tok", pieces,
        report_files=[data_dir / "pretrain" / "zh_news_peoples_daily_199801.jsonl"], report_max_chars=30_000,
    )
    assert report.pieces_added == 1500 and report.pieces_already_present == 0
    assert report.check_identical == report.check_total > 0
    assert report.chars_per_token["zh"]["after"] > 1.2 * report.chars_per_token["zh"]["before"]


def test_corpus_mining_for_a_byte_level_bpe_base_drops_pieces_with_ascii_letters(tmp_path, data_dir, smollm2_dir):
    """Reviews mention "XP", "VISTA": as added tokens of a BPE base they would be cut out of English words
    ("xp" out of "expect"), so they are dropped and English encodes exactly as before the expansion."""
    reviews = data_dir / "pretrain" / "zh_reviews.jsonl"
    pieces, report = mine_pieces(MineConfig(output=tmp_path / "bpe.jsonl", base_tokenizer_dir=smollm2_dir,
                                            corpus=[reviews], vocab_size=6000, max_sentences=3000))
    assert report.dropped[ASCII_WORD_REASON] > 0 and not any(has_ascii_alnum(p) for p in pieces)
    assert report.candidates == report.written + sum(report.dropped.values())
    expansion = expand_tokenizer(smollm2_dir, tmp_path / "tok", pieces, report_max_chars=20_000,
                                 report_files=[data_dir / "pretrain" / "en_novel_botchan.jsonl", reviews])
    assert expansion.chars_per_token["en"]["after"] == expansion.chars_per_token["en"]["before"]
    assert expansion.chars_per_token["zh"]["after"] > 1.3 * expansion.chars_per_token["zh"]["before"]


def test_wordlist_mining_against_bpe_base_uses_decoded_vocab(tmp_path, data_dir, smollm2_dir, capsys):
    out = tmp_path / "w.jsonl"
    assert main([
        "--from_wordlist", str(data_dir / "vocab" / "jieba_dict.txt"), "--base_tokenizer_dir", str(smollm2_dir),
        "--output", str(out), "--top_k", "800", "--min_freq", "500", "--min_piece_chars", "1",
    ]) == 0
    pieces = read_pieces_file(out).pieces
    assert len(pieces) == 800
    decoded = bpe_vocab_texts(load_tokenizer(smollm2_dir))
    assert "的" in decoded and "的" not in pieces  # common characters SmolLM2 already has are dropped
    assert not any(p in decoded for p in pieces)
    stdout = capsys.readouterr().out
    assert "already in the base vocabulary" in stdout and "wrote 800 pieces" in stdout


def test_wordlist_order_is_by_frequency_then_file_order(tmp_path, data_dir):
    freq = {}
    for line in (data_dir / "vocab" / "jieba_dict.txt").read_text(encoding="utf-8").splitlines():
        word, count, _ = line.split()
        freq.setdefault(word, int(count))
    pieces, report = mine_pieces(MineConfig(
        output=tmp_path / "w.jsonl", from_wordlist=data_dir / "vocab" / "jieba_dict.txt", top_k=300, min_freq=1000,
    ))
    counts = [freq[p] for p in pieces]
    assert counts == sorted(counts, reverse=True) and min(counts) >= 1000
    assert all(len(p) >= 2 for p in pieces)
    lines = (data_dir / "vocab" / "jieba_dict.txt").read_text(encoding="utf-8").splitlines()
    assert report.dropped["frequency below --min_freq 1000"] == sum(int(ln.split()[1]) < 1000 for ln in lines)


def test_bad_wordlist_line_names_file_line_and_field(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("中国 100 ns\n天气 many n\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{words}:2: freq: not an integer"):
        mine_pieces(MineConfig(output=tmp_path / "o.jsonl", from_wordlist=words))
    words.write_text("中国\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{words}:1: freq: missing"):
        mine_pieces(MineConfig(output=tmp_path / "o.jsonl", from_wordlist=words))


def test_exactly_one_source_and_one_line_cli_errors(tmp_path, data_dir, capsys):
    with pytest.raises(UserInputError, match="exactly one of --corpus or --from_wordlist"):
        mine_pieces(MineConfig(output=tmp_path / "o.jsonl"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--corpus", str(data_dir / "pretrain" / "zh_reviews.jsonl"), "--vocab_size", "500", "--output", str(tmp_path / "o.jsonl")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: sentencepiece training failed") and "vocab_size" in err[-1]
