"""Mining new vocabulary pieces from the real Chinese news corpus and from jieba's real word list."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tqdm import tqdm

from colossal_llama.tokenizer.base_vocab import SP_SPACE, bpe_vocab_texts, load_sp_proto, text_to_sp_piece
from colossal_llama.tokenizer.init_tokenizer import expand_tokenizer
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.tokenizer.mine_pieces import (ASCII_WORD_REASON, MineConfig, MiningReport, _FileSample, _take,
                                                  corpus_lines, has_ascii_alnum, main, mine_pieces)
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
    assert report.sentences == 2000 and (report.files, report.files_whole) == (1, 0)  # the news has >= 3,000 lines
    assert report.candidates == report.written + sum(report.dropped.values())


def _all_lines(path: Path) -> list:
    return corpus_lines([path], 10 ** 9, MiningReport(mode="corpus"))


def test_the_sample_takes_every_file_s_first_lines_in_proportion_to_its_size(data_dir):
    """Not the first lines of the first file: a corpus of law/ then finance/ must not be mined from law alone."""
    files = [data_dir / "pretrain" / name for name in ("zh_news_peoples_daily_199801.jsonl", "zh_reviews.jsonl")]
    report = MiningReport(mode="corpus")
    lines = corpus_lines(files, 3000, report)
    news, reviews = (_all_lines(f) for f in files)
    sizes = [f.stat().st_size for f in files]
    news_share = round(3000 * sizes[0] / sum(sizes))
    assert len(lines) == report.sentences == 3000 and 0 < news_share < 3000
    assert lines == news[:news_share] + reviews[:3000 - news_share]  # each file's first lines, in file order
    assert (report.files, report.files_whole) == (2, 0)


def test_what_a_file_that_runs_out_leaves_goes_to_the_files_after_it(data_dir):
    # the novel is 2.5 % of the bytes but has few, long lines; with a large sample it runs out first
    files = [data_dir / "pretrain" / name for name in ("en_novel_botchan.jsonl", "zh_reviews.jsonl")]
    novel, reviews = (_all_lines(f) for f in files)
    want = 40 * len(novel)
    assert want * files[0].stat().st_size / (files[0].stat().st_size + files[1].stat().st_size) > len(novel)
    report = MiningReport(mode="corpus")
    assert corpus_lines(files, want, report) == novel + reviews[:want - len(novel)]
    assert (report.files, report.files_whole) == (2, 1)
    whole = MiningReport(mode="corpus")  # a sample larger than the corpus: all of it, in file order
    assert corpus_lines(files, 10 ** 9, whole) == novel + reviews and whole.files_whole == 2


def test_a_file_read_again_for_the_leftover_counts_each_record_once(tmp_path):
    corpus = tmp_path / "c.jsonl"
    rows = [{"text": ""}, {"text": "长" * 5000}, {"text": "一\n二"}, {"source": " "}, {"text": "三" * 3000}]
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    once = MiningReport(mode="corpus")
    lines = corpus_lines([corpus], 10, once)
    # 15,000 and 9,000 UTF-8 bytes: cut into 3 and 2 chunks of at most 2,048 characters
    assert len(lines) == 3 + 2 + 2 and (once.records_without_text, once.chunked_lines) == (2, 2)
    twice, sample = MiningReport(mode="corpus"), _FileSample(corpus)
    with tqdm(disable=True) as bar:
        _take(sample, 2, twice, bar)  # stops inside the long line's chunks
        _take(sample, 10, twice, bar)
    assert sample.lines == lines and sample.exhausted
    assert (twice.records_without_text, twice.chunked_lines) == (2, 2)


def test_reading_stops_at_each_file_s_share(tmp_path, data_dir):
    """Mining a 100 GB corpus must not read 100 GB: lines beyond a file's share are never read (here the file is
    cut off half way, which a full read would report)."""
    news = (data_dir / "pretrain" / "zh_news_peoples_daily_199801.jsonl").read_text(encoding="utf-8").splitlines()
    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    whole.write_text("\n".join(news[:2000]) + "\n", encoding="utf-8")
    cut.write_text("\n".join(news[:2000]) + "\n" + news[2000][: len(news[2000]) // 2], encoding="utf-8")
    with pytest.raises(DataError, match=rf"{cut}:2001: invalid JSON"):  # the damage is there
        _all_lines(cut)
    assert corpus_lines([cut], 500, MiningReport(mode="corpus")) == _all_lines(whole)[:500]


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


def test_an_existing_output_needs_overwrite_and_an_input_is_never_the_output(tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("中国 100 ns\n天气 50 n\n", encoding="utf-8")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "中国天气"}\n', encoding="utf-8")
    out = tmp_path / "pieces.jsonl"
    out.write_text("the user's file\n", encoding="utf-8")
    for argv in (["--from_wordlist", str(words), "--output", str(out)],
                 ["--from_wordlist", str(words), "--output", str(words), "--overwrite"],
                 ["--corpus", str(tmp_path), "--output", str(corpus), "--overwrite"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out}: --output already exists (pass --overwrite to replace it)",
                   f"error: {words}: --output is one of the inputs ({words}); choose another file",
                   f"error: {corpus}: --output is one of the inputs ({corpus}); choose another file"]
    assert out.read_text(encoding="utf-8") == "the user's file\n"
    assert words.read_text(encoding="utf-8").startswith("中国 100") and corpus.read_text(encoding="utf-8") != ""
    assert main(["--from_wordlist", str(words), "--output", str(out), "--overwrite"]) == 0
    assert read_pieces_file(out).pieces == ["中国", "天气"]
