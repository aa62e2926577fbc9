"""Inputs as users bring them, on the real corpora: compressed files read streaming (and cut or corrupt ones
refused in one line naming the file and the last good line), rows without text skipped by default, every
token of the whole real pre-training corpora accounted for, and every file of an input folder either read (JSON
lines by name, in any case) or named in a warning and counted."""
from __future__ import annotations

import bz2
import gzip
import json
import logging
import os
import zlib
from pathlib import Path

import pyarrow as pa
import pytest
import sentencepiece as spm
import zstandard

from colossal_llama.dataset import records
from colossal_llama.dataset.cli import pretrain_main
from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig, Shard
from colossal_llama.dataset.pipeline import prepare_pretrain
from colossal_llama.dataset.prepared import load_part, part_dirs
from colossal_llama.dataset.records import ReadLog, read_batches
from colossal_llama.utils.errors import DataError
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
    assert any(m.startswith("pretrain: 291 documents written from 292 rows, skipped 1 {'empty_text': 1}")
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


# ------------------------------------------------------------------------------------------ the fast reader
def _read_all(files, strict=True, shard=Shard(), exact=False, monkeypatch=None):
    """Every row read (file, line, category, source, target), the log, and the rows that came by the fast path."""
    if exact:
        monkeypatch.setattr(records, "_pretrain_columns", lambda file_index, lines: None)
    log, rows, fast = ReadLog(list(files)), [], 0
    for batch in read_batches(log, "pretrain", strict, shard):
        columns = [batch.category, batch.fields["source"], batch.fields["target"]]
        fast += len(batch) if isinstance(batch.category, pa.Array) else 0
        columns = [c.to_pylist() if isinstance(c, pa.Array) else c for c in columns]
        rows += [(batch.file, line, *values) for line, *values in zip(batch.line, *columns)]
    if exact:
        monkeypatch.undo()
    return rows, log, fast


@pytest.mark.parametrize("shard", [Shard(), Shard(1, 3)])
def test_the_fast_reader_reads_the_real_corpora_as_the_exact_one_does(data_dir, monkeypatch, shard):
    """Arrow's one-go parse and the line-by-line path give the same rows of the real corpora, and the fast path
    really read nearly all of them (only the batch holding the novel's empty row went line by line)."""
    files = sorted((data_dir / "pretrain").glob("*.jsonl"))
    fast_rows, fast_log, fast = _read_all(files, shard=shard)
    exact_rows, exact_log, none = _read_all(files, shard=shard, exact=True, monkeypatch=monkeypatch)
    assert none == 0 and fast >= 0.95 * len(fast_rows)
    assert fast_rows == exact_rows and len(fast_rows) > 10_000 // shard.count
    owns = records._line_rule(files, shard)  # by line here: the corpora do not split evenly into whole files
    assert all(owns(file, line) for file, line, *_ in fast_rows)  # this shard's lines only
    assert (fast_log.lines_read, fast_log.documents, fast_log.skipped) == \
           (exact_log.lines_read, exact_log.documents, exact_log.skipped)


BAD_LINES = {  # line -> (text, reason under --skip_invalid)
    3: ('{"source": "", "target": "x", "category": "news", "extra": 1}', "extra_field"),
    250: ('{"source": 5, "target": "x", "category": "news"}', "wrong_type"),
    999: ('{"source": "", "target": null, "category": "news"}', "wrong_type"),
    1000: ('{"source": "", "target": "x"}', "missing_field"),
    1001: ('{"source": "", "target": "a", "category": "news"} {"source": "", "target": "b", "category": "news"}',
           "invalid_json"),
    1200: (b'{"source": "", "target": "\xff", "category": "news"}', "not_utf8"),
    2201: ('{"source": "", "target": "\\u3000\\u001c", "category": "news"}', "empty_text"),
    1400: ('{"source": "q", "target": " ", "category": "news"}', "empty_target"),
    1401: ('{"source": "", "target": "x", "category": "\\u2029"}', "empty_category"),
    1402: ('["a list"]', "wrong_type"),
}


def test_a_bad_line_costs_only_itself_and_is_named_as_before(tmp_path, data_dir, monkeypatch):
    """Bad lines among real ones: the fast path hands their batches to the exact path, so each is skipped (or,
    under --strict, named by file:line) exactly as the line-by-line reader does, and every good line is kept."""
    news = (data_dir / "pretrain" / NEWS).read_bytes().splitlines(keepends=True)[:3500]
    for line, (text, _) in BAD_LINES.items():
        news[line - 1] = (text if isinstance(text, bytes) else text.encode()) + b"\n"
    path = tmp_path / NEWS
    path.write_bytes(b"".join(news))
    rows, log, fast = _read_all([path], strict=False)
    exact_rows, exact_log, _ = _read_all([path], strict=False, exact=True, monkeypatch=monkeypatch)
    assert rows == exact_rows and log.skipped == exact_log.skipped
    expected = {}
    for _, reason in BAD_LINES.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert log.skipped == expected and log.documents == 3500 - len(BAD_LINES)
    assert [r[1] for r in rows] == [n for n in range(1, 3501) if n not in BAD_LINES]
    assert fast == 500  # lines 3001-3500, the one batch without a bad line, went the fast way
    with pytest.raises(DataError, match=rf"^{path}:3: extra: unexpected field"):
        _read_all([path])


def test_a_batch_whose_only_fault_is_a_blank_category_is_read_as_the_exact_path_reads_it(tmp_path):
    """The fast path checks the category as the exact path does: a batch otherwise clean with one blank category is
    refused under --strict, and that row alone skipped and counted with --skip_invalid."""
    lines = [json.dumps({"source": "", "target": f"text {n}", "category": "news"}) for n in range(1, 6)]
    lines[2] = json.dumps({"source": "", "target": "text 3", "category": "\u2029"})
    path = tmp_path / NEWS
    path.write_text("\n".join(lines) + "\n")
    rows, log, fast = _read_all([path], strict=False)
    assert [r[1] for r in rows] == [1, 2, 4, 5] and log.skipped == {"empty_category": 1} and fast == 0
    with pytest.raises(DataError, match=rf"^{path}:3: category: empty category"):
        _read_all([path])


def test_an_sft_row_is_messages_and_an_optional_non_empty_category_and_nothing_else():
    from colossal_llama.dataset.records import FieldError, validate_sft_row

    messages = [{"from": "human", "content": "hi"}, {"from": "assistant", "content": "hello"}]
    assert validate_sft_row({"messages": messages}) == ("default", (messages,))
    assert validate_sft_row({"messages": messages, "category": "chat"}) == ("chat", (messages,))
    for row, field, reason in (({"messages": messages, "lang": "zh"}, "lang", "extra_field"),
                               ({"messages": messages, "category": "ai", "lang": "zh"}, "lang", "extra_field"),
                               ({"messages": messages, "category": " "}, "category", "empty_category"),
                               ({"messages": [{"from": "system", "content": "Be kind."}]}, "messages",
                                "empty_messages")):
        with pytest.raises(FieldError) as err:
            validate_sft_row(row)
        assert (err.value.field, err.value.reason) == (field, reason), row


def test_skipped_rows_are_all_counted_and_the_first_10_of_each_reason_named():
    log = ReadLog([])
    for line in range(1, 13):
        log.skip(DataError(Path("news.jsonl"), line, "target", "empty target"), "empty_target")
    log.skip(DataError(Path("news.jsonl"), 20, None, "invalid JSON"), "invalid_json")
    assert log.skipped == {"empty_target": 12, "invalid_json": 1}
    assert log.skipped_examples == [f"news.jsonl:{line}: target: empty target" for line in range(1, 11)] + [
        "news.jsonl:20: invalid JSON"]


def test_the_mirror_is_json_of_the_rows_also_for_awkward_file_names(tmp_path, data_dir, mistral_dir):
    """The jsonl mirror is formatted without json.dumps per piece: still exactly its JSON, with the file name
    escaped (a quote, a backslash, non-ASCII) and every piece named by file:line."""
    folder = tmp_path / 'in "quoted" \\ 新闻'
    folder.mkdir()
    lines = (data_dir / "pretrain" / NEWS).read_text(encoding="utf-8").splitlines()[:300]
    (folder / NEWS).write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare_pretrain(PretrainPrepConfig(input_dirs=[folder], tokenizer_dir=mistral_dir, max_length=512,
                                        output=OutputLayout.under(tmp_path / "out"), num_bins=2))
    named = []
    for part in sorted((tmp_path / "out" / "jsonl").glob("part-*.jsonl")):
        for line in part.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            assert line == json.dumps(row, ensure_ascii=False)
            assert row["num_tokens"] == sum(p["tokens"] for p in row["pieces"])
            named += [p["doc"] for p in row["pieces"]]
    assert sorted(named, key=lambda n: int(n.rsplit(":", 1)[1])) == [f"{folder / NEWS}:{n}" for n in range(1, 301)]


def test_arrow_and_python_agree_on_what_is_blank():
    """The fast path's emptiness test (Arrow's Unicode whitespace) is exactly ``not text.strip()``."""
    import sys

    characters = [c for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000]  # surrogates are not UTF-8
    texts = [chr(c) for c in characters if chr(c).isspace() or c % 97 == 0]
    texts += ["", " a ", "\u3000\u001c", "\u200b", "\ufeff"]
    assert records._blank(pa.array(texts)).to_pylist() == [not t.strip() for t in texts]


# ------------------------------------------------------------------------------------------ BOM and long lines
BOM = b"\xef\xbb\xbf"


def test_a_bom_is_accepted_at_the_start_of_a_file_only_whatever_the_batch(tmp_path, data_dir, monkeypatch):
    """A UTF-8 BOM that starts a file (what editors write) is not part of line 1; one starting any other line is
    invalid JSON, as Python's parser says. The fast path (Arrow skips BOMs) used to accept both, the exact path
    neither, so a line's fate hung on whether some other line of its 1,000-line batch was dirty."""
    news = (data_dir / "pretrain" / NEWS).read_bytes().splitlines(keepends=True)[:2500]
    clean = [BOM + news[0], *news[1:1000], BOM + news[1000], *news[1001:]]  # Arrow skips a BOM opening a batch
    dirty = list(clean)
    for line in (500, 1500):  # one bad line in each of the first two batches sends them the exact way
        dirty[line - 1] = BAD_LINES[3][0].encode() + b"\n"
    results = {}
    for name, lines in (("clean", clean), ("dirty", dirty)):
        path = tmp_path / name / NEWS
        path.parent.mkdir()
        path.write_bytes(b"".join(lines))
        results[name] = _read_all([path], strict=False)
    (clean_rows, clean_log, clean_fast), (dirty_rows, dirty_log, dirty_fast) = results["clean"], results["dirty"]
    assert (clean_fast, dirty_fast) == (1500, 500)  # the batches without a bad line or a BOM inside went fast
    assert [r[1:] for r in clean_rows if r[1] not in (500, 1500)] == [r[1:] for r in dirty_rows]
    first = json.loads(news[0])
    assert clean_rows[0][1:] == (1, first["category"], first["source"], first["target"])
    assert 1001 not in [r[1] for r in clean_rows]
    assert clean_log.skipped == {"invalid_json": 1} and dirty_log.skipped == {"invalid_json": 1, "extra_field": 2}
    path = tmp_path / "clean" / NEWS
    with pytest.raises(DataError, match=rf"^{path}:1001: invalid JSON \(Unexpected UTF-8 BOM .*column 1\)$"):
        _read_all([path])


@pytest.mark.parametrize("kind", ["", "gz", "zst"])
def test_a_line_over_the_cap_is_one_located_error_or_a_counted_skip(kind, tmp_path, data_dir, monkeypatch):
    """No line is held whole past MAX_LINE_BYTES (64 MiB; here a few KiB): a longer one is ``file:line: line
    longer than N bytes`` (a traceback, ``OverflowError: value too large to convert to int32_t``, when a batch
    passed 2 GiB), or under --skip_invalid a counted skip, the lines after it read as usual."""
    from colossal_llama.utils import jsonl

    news = (data_dir / "pretrain" / NEWS).read_bytes().splitlines(keepends=True)[:1500]
    cap = max(map(len, news))
    row = json.loads(news[41])
    news[41] = json.dumps({**row, "target": row["target"] * (cap // len(row["target"]) + 1)}).encode() + b"\n"
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", cap)
    path = tmp_path / (NEWS + (f".{kind}" if kind else ""))
    path.write_bytes(_compress(kind, b"".join(news)) if kind else b"".join(news))
    rows, log, _ = _read_all([path], strict=False)
    assert log.skipped == {"line_too_long": 1} and [r[1] for r in rows] == [n for n in range(1, 1501) if n != 42]
    assert log.skipped_examples == [f"{path}:42: line longer than {cap} bytes"]
    with pytest.raises(DataError, match=rf"^{path}:42: line longer than {cap} bytes$"):
        _read_all([path])


def _lines_and_peak(path: Path):
    """``iter_lines(path)`` as (line number, the line or an overlong line's length), and the peak of memory
    allocated meanwhile (bytes)."""
    import tracemalloc

    tracemalloc.start()
    try:
        lines = [(n, raw if isinstance(raw, bytes) else len(raw)) for n, raw in iter_lines(path)]
        return lines, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["", "gz", "zst"])
def test_a_line_over_the_cap_is_never_held_whole(kind, tmp_path, monkeypatch):
    """A 16 MiB line under a 1 MiB cap is read past in pieces: the reader's memory peak stays near the cap. (Text
    of a text's compressibility; a line that compresses 32,000 to 1: the test below.)"""
    from colossal_llama.utils import jsonl

    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1 << 20)
    data = b'{"source": "", "target": "' + os.urandom(8 << 20).hex().encode() + b'", "category": "c"}\n{"a": 1}\n'
    path = tmp_path / ("long.jsonl" + (f".{kind}" if kind else ""))
    path.write_bytes(_compress(kind, data) if kind else data)
    del data
    lines, peak = _lines_and_peak(path)
    assert lines == [(1, (16 << 20) + 46), (2, b'{"a": 1}\n')]
    assert peak < 4 << 20


def _write_compressed(path: Path, pieces) -> None:
    """``pieces`` (bytes) streamed into ``path`` (``.gz`` or ``.zst``), never all in memory."""
    with (gzip.open(path, "wb") if path.suffix == ".gz" else
          zstandard.ZstdCompressor().stream_writer(open(path, "wb"), closefd=True)) as out:
        for piece in pieces:
            out.write(piece)


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_a_compressible_line_over_the_cap_is_never_held_whole(kind, tmp_path, monkeypatch):
    """A run of one byte (padding, a blank-filled field) compresses about 32,000 to 1 in .zst, so one 128 KiB read
    of it expanded to 4 GiB: a 96 MiB line under a 1 MiB cap was held whole, and a longer one exhausted memory
    before the cap could refuse it. Decompressed in small steps, the peak stays near the cap (measured by hand with
    the real 64 MiB cap, a 512 MiB line: 655 MiB peak RSS before, as for plain and .gz files now)."""
    from colossal_llama.utils import jsonl

    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1 << 20)
    path = tmp_path / f"padded.jsonl.{kind}"
    run = b" " * (1 << 20)
    _write_compressed(path, [b'{"source": "", "target": "x', *[run] * 96, b'", "category": "c"}\n{"a": 1}\n'])
    assert path.stat().st_size < 1 << 20
    lines, peak = _lines_and_peak(path)
    assert lines == [(1, (96 << 20) + 47), (2, b'{"a": 1}\n')]
    assert peak < 16 << 20, f"{peak:,} bytes"


def test_fast_batches_are_cut_by_bytes_too(tmp_path, data_dir, monkeypatch):
    """Arrow's JSON reader takes less than 2 GiB at once: a batch of BATCH_LINES lines is cut once it reaches
    BATCH_BYTES (256 MiB; here 64 KiB), and the rows read are the same."""
    import pyarrow.json as pa_json

    files = [data_dir / "pretrain" / NEWS]
    whole, _, _ = _read_all(files)
    sizes, read_json = [], pa_json.read_json
    monkeypatch.setattr(pa_json, "read_json", lambda data, **kw: sizes.append(len(data.getvalue())) or
                        read_json(data, **kw))
    monkeypatch.setattr(records, "BATCH_BYTES", 64 << 10)
    rows, _, fast = _read_all(files)
    longest = max(map(len, files[0].read_bytes().splitlines(keepends=True)))
    assert rows == whole and fast == len(rows) and len(sizes) > 1
    assert max(sizes) < (64 << 10) + longest


# ------------------------------------------------------------------------------------------ which files are read
SUFFIXES = ".jsonl, .jsonl.gz, .jsonl.zst, .json, .json.gz, .json.zst"


def _real_lines(data_dir, name: str, n: int) -> bytes:
    return b"".join((data_dir / "pretrain" / name).read_bytes().splitlines(keepends=True)[:n])


@pytest.mark.parametrize("kind", ["GZ", "Zst"])
def test_suffixes_in_any_case_pick_their_decompressor(kind, tmp_path, data_dir):
    plain = _real_lines(data_dir, NOVEL, 40)
    path = tmp_path / f"novel.JSONL.{kind}"
    path.write_bytes(_compress(kind.lower(), plain))
    assert b"".join(raw for _, raw in iter_lines(path)) == plain


def test_every_file_of_an_input_folder_is_read_or_named_as_ignored(tmp_path, data_dir, mistral_dir, caplog):
    """A folder as users fill it: jsonl names in any case are read (b.JSONL, e.JSONL.GZ); other names are not,
    and a warning names them and the summary and manifest count them; a hidden file (.DS_Store) goes unmentioned."""
    folder = tmp_path / "corpus" / "mixed"
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_bytes(_real_lines(data_dir, NEWS, 50))
    (folder / "b.JSONL").write_bytes(_real_lines(data_dir, "zh_reviews.jsonl", 40))
    (folder / "e.JSONL.GZ").write_bytes(_compress("gz", _real_lines(data_dir, NOVEL, 30)))
    (folder / "c.jsonl.bz2").write_bytes(bz2.compress(_real_lines(data_dir, NOVEL, 30)))
    (folder / "d.jsonl.txt").write_bytes(_real_lines(data_dir, NEWS, 20))
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with caplog.at_level(logging.INFO):
        assert pretrain_main(["--data_input_dirs", str(folder), "--tokenizer_dir", str(mistral_dir),
                              "--data_output_dirs", str(tmp_path / "out"), "--num_spliced_dataset_bins", "1"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"]["files"] == 3
    assert (manifest["counts"]["lines_read"], manifest["counts"]["files_ignored"]) == (50 + 40 + 30, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{folder}: 2 files ignored, not JSON lines by name ({SUFFIXES}): c.jsonl.bz2, d.jsonl.txt"]
    assert "input files ignored, not JSON lines by name: 2 (named in the warning above)" in caplog.messages


def test_a_folder_without_a_jsonl_file_is_one_line_naming_what_it_holds(tmp_path, mistral_dir, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in ("notes.txt", "rows.jsonl.bz2", "sub/a.csv", "sub/b.csv", "sub/c.csv", "sub/d.csv", ".hidden.txt"):
        (folder / name).write_text("x\n")
    with pytest.raises(SystemExit) as exc:
        pretrain_main(["--data_input_dirs", str(folder), "--tokenizer_dir", str(mistral_dir),
                       "--data_output_dirs", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {folder}: no jsonl files (looked for {SUFFIXES}; 6 other files ignored: notes.txt, rows.jsonl.bz2, "
        "sub/a.csv, sub/b.csv, sub/c.csv and 1 more)"]


def test_mining_pieces_reads_and_reports_corpus_files_alike(tmp_path, data_dir, caplog):
    """tokenizer/mine_pieces.py finds its --corpus files the same way: any case read, the rest named and counted."""
    from colossal_llama.tokenizer.mine_pieces import MineConfig, mine_pieces

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "novel.JSONL.GZ").write_bytes(_compress("gz", _real_lines(data_dir, NOVEL, 200)))
    (corpus / "novel.jsonl.bak").write_bytes(_real_lines(data_dir, NOVEL, 200))
    with caplog.at_level(logging.WARNING):
        _, report = mine_pieces(MineConfig(output=tmp_path / "pieces.jsonl", corpus=[corpus], vocab_size=300,
                                           max_sentences=200))
    assert (report.files, report.sentences, report.files_ignored) == (1, 200, 1)
    assert caplog.messages == [f"{corpus}: 1 file ignored, not JSON lines by name ({SUFFIXES}): novel.jsonl.bak"]
    assert "corpus files ignored, not JSON lines by name: 1 (named in the warning above)" in report.format()
