"""Inputs as users bring them, on the real corpora: compressed files read streaming (and cut or corrupt ones
refused in one line naming the file and the last good line), rows without text skipped by default, and every
token of the whole real pre-training corpora accounted for."""
from __future__ import annotations

import gzip
import json
import logging
import zlib
from pathlib import Path

import pytest
import sentencepiece as spm
import zstandard

from colossal_llama.dataset.cli import pretrain_main
from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig
from colossal_llama.dataset.pipeline import prepare_pretrain
from colossal_llama.dataset.prepared import load_part, part_dirs
from colossal_llama.utils.jsonl import CompressedInputError, iter_lines

NEWS = "zh_news_peoples_daily_199801.jsonl"
NOVEL = "en_novel_botchan.jsonl"


def _compress(kind: str, data: bytes, pieces: int = 1) -> bytes:
    """``data`` as ``pieces`` concatenated gzip members / zstd frames (what pigz / pzstd / ``cat`` produce); zstd
    frames carry a checksum, as the zstd command line writes them."""
    size = -(-len(data) // pieces)
    chunks = [data[i: i + size] for i in range(0, len(data), size)]
    if kind == "gz":
        return b"".join(gzip.compress(c) for c in chunks)
    return b"".join(zstandard.ZstdCompressor(write_checksum=True).compress(c) for c in chunks)


def _complete_lines_before_the_cut(kind: str, cut: bytes) -> int:
    """Lines that the decompressible prefix of a cut file holds whole (computed without the library's reader)."""
    if kind == "gz":
        decoder = zlib.decompressobj(wbits=31)
        prefix = decoder.decompress(cut)
        assert not decoder.eof  # really cut: the gzip end-of-stream marker is missing
    else:
        decoder = zstandard.ZstdDecompressor().decompressobj()
        prefix = decoder.decompress(cut)
        assert not decoder.eof  # really cut: the last zstd frame does not end
    return prefix.count(b"\n")


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_compressed_inputs_stream_every_line_of_every_member(kind, tmp_path, data_dir):
    plain = (data_dir / "pretrain" / NEWS).read_bytes()
    path = tmp_path / f"news.jsonl.{kind}"
    path.write_bytes(_compress(kind, plain, pieces=3))
    lines = list(iter_lines(path))
    assert [n for n, _ in lines] == list(range(1, plain.count(b"\n") + 1))
    assert b"".join(raw for _, raw in lines) == plain


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_a_cut_compressed_input_is_one_line_naming_the_file_and_the_last_good_line(kind, tmp_path, data_dir,
                                                                                    mistral_dir, capsys):
    whole = _compress(kind, (data_dir / "pretrain" / NEWS).read_bytes())
    cut = whole[: len(whole) // 3]
    good = _complete_lines_before_the_cut(kind, cut)
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / f"news.jsonl.{kind}"
    path.write_bytes(cut)
    # streaming: the lines before the cut are read (and could be used) before the cut is met
    reader = iter_lines(path)
    assert next(reader)[0] == 1
    with pytest.raises(CompressedInputError):
        list(reader)
    for mode in ([], ["--skip_invalid"]):  # a damaged file is never a row to skip
        with pytest.raises(SystemExit) as exc:
            pretrain_main(["--data_input_dirs", str(tmp_path / "in"), "--tokenizer_dir", str(mistral_dir),
                           "--data_output_dirs", str(tmp_path / "out"), *mode])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (f"error: {path}: truncated .{kind} file: the compressed data ends early; "
                           f"last good line: {good}")
        assert not (tmp_path / "out").exists()


def test_a_corrupt_zst_input_names_the_file(tmp_path, data_dir):
    damaged = bytearray(_compress("zst", (data_dir / "pretrain" / NOVEL).read_bytes()))
    damaged[len(damaged) // 2] ^= 0xFF
    path = tmp_path / "novel.jsonl.zst"
    path.write_bytes(bytes(damaged))
    with pytest.raises(CompressedInputError, match=rf"^{path}: corrupt \.zst file: .*; (last good line: \d+|no line)"):
        list(iter_lines(path))


def test_a_row_without_text_is_skipped_and_listed_by_default(tmp_path, data_dir, mistral_dir, caplog):
    """The real novel ends with a row whose source and target are both empty: not malformed, so the default
    --strict run goes on, and counts and lists it."""
    (tmp_path / "in").mkdir()
    novel = tmp_path / "in" / NOVEL
    novel.write_bytes((data_dir / "pretrain" / NOVEL).read_bytes())
    assert json.loads(novel.read_text().splitlines()[291]) == {"source": "", "target": "", "category": "novel"}
    with caplog.at_level(logging.INFO):
        assert pretrain_main(["--data_input_dirs", str(tmp_path / "in"), "--tokenizer_dir", str(mistral_dir),
                              "--data_output_dirs", str(tmp_path / "out"), "--num_spliced_dataset_bins", "2"]) == 0
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]
    assert counts["skipped"] == {"empty_text": 1} and counts["documents_in"] == 291
    assert counts["skipped_examples"] == [f"{novel}:292: no text (source and target are empty)"]
    assert f"  skipped {novel}:292: no text (source and target are empty)" in caplog.messages
    assert any(m.startswith("pretrain: 291 documents from 292 rows, skipped 1 {'empty_text': 1}")
               for m in caplog.messages)


def test_every_token_of_the_real_corpora_is_written(tmp_path, data_dir, mistral_dir, mistral_sp_model):
    """All three real corpora (3.9 M tokens): tokens in == tokens out == an independent SentencePiece count."""
    sp = spm.SentencePieceProcessor(model_file=str(mistral_sp_model))
    expected_tokens, expected_docs = 0, 0
    for path in sorted((data_dir / "pretrain").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["source"].strip() or row["target"].strip():
                texts = [t for t in (row["source"], row["target"]) if t]
                expected_tokens += 2 + sum(len(ids) for ids in sp.encode(texts))  # BOS + texts + EOS
                expected_docs += 1
    summary = prepare_pretrain(PretrainPrepConfig(
        input_dirs=[data_dir / "pretrain"], tokenizer_dir=mistral_dir, output=OutputLayout.under(tmp_path / "out"),
        max_length=4096, num_bins=10))
    counts = summary.counts
    written = sum(sum(map(len, load_part(p)["input_ids"])) for p in part_dirs(tmp_path / "out" / "arrow"))
    assert counts.tokens_in == counts.tokens_out == written == expected_tokens > 500_000  # 3.9 M in ../shared/data
    assert counts.documents_in == expected_docs and counts.skipped == {"empty_text": 1}
    assert counts.fill_ratio > 0.98
    assert Path(summary.manifest_path).is_file()
