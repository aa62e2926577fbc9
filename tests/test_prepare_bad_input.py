"""Bad input: ``--strict`` (default) stops with one line naming file:line: field; ``--skip_invalid`` skips
and counts by reason. Bad rows are made by damaging real rows of the shipped corpora."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from colossal_llama.dataset.cli import pretrain_main, sft_main


@pytest.fixture(scope="module")
def news(data_dir) -> list[dict]:
    lines = (data_dir / "pretrain" / "zh_news_peoples_daily_199801.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:30]]


@pytest.fixture(scope="module")
def chats(data_dir) -> list[dict]:
    lines = (data_dir / "sft" / "chatterbot_zh.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:30]]


def _dumps(row) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("utf-8")


def _bad_pretrain_lines(news) -> dict[str, tuple[bytes, str]]:
    """reason -> (damaged real line, expected 'field: problem' of the error)."""
    row = news[5]
    cut = _dumps(row)[: -len(' "news"}')]  # ends with '"category":'
    return {
        "invalid_json": (cut, f"invalid JSON (Expecting value, column {len(cut.decode()) + 1})"),
        "missing_field": (_dumps({k: v for k, v in row.items() if k != "category"}), "category: missing field"),
        "extra_field": (_dumps({**row, "id": 7}), "id: unexpected field"),
        "wrong_type": (_dumps({**row, "target": [row["target"]]}), "target: expected str, got list"),
        "empty_target": (_dumps({**row, "source": row["target"], "target": " \n "}),
                         "target: empty target (the source is not empty)"),
        "not_utf8": (json.dumps(row, ensure_ascii=False).encode("gbk"),  # real GBK-encoded Chinese
                     "not valid UTF-8 (invalid continuation byte at byte 26)"),
    }


def _bad_sft_lines(chats) -> dict[str, tuple[bytes, str]]:
    msgs = chats[3]["messages"]
    human, reply = msgs[0], msgs[1]
    return {
        "unknown_role": (_dumps({"messages": [{"from": "user", "content": human["content"]}, reply]}),
                         "messages[0].from: unknown role 'user' (expected 'human' or 'assistant', or 'system' first)"),
        "late_system": (_dumps({"messages": [human, reply, {"from": "system", "content": "Be brief."}, human, reply]}),
                        "messages[2].from: a system message can only be the first message"),
        "wrong_alternation": (_dumps({"messages": [human, human, reply]}),
                              "messages[1].from: expected 'assistant' (turns alternate human, assistant, ...)"),
        "ends_with_human": (_dumps({"messages": [human, reply, human]}),
                            "messages[2].from: conversation must end with an 'assistant' turn"),
        "missing_field": (_dumps({"messages": [human, {"from": "assistant"}]}), "messages[1].content: missing field"),
        "extra_field": (_dumps({"messages": msgs, "category": "ai", "lang": "zh"}), "lang: unexpected field"),
        "wrong_type": (_dumps({"messages": [human, {**reply, "content": 42}]}),
                       "messages[1].content: expected a string, got int"),
        "empty_content": (_dumps({"messages": [human, {**reply, "content": ""}]}),
                          "messages[1].content: empty content"),
        "empty_messages": (_dumps({"messages": []}), "messages: empty conversation"),
    }


def _write(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _run(main, in_dir, tokenizer_dir, out, *extra) -> None:
    main(["--data_input_dirs", str(in_dir), "--tokenizer_dir", str(tokenizer_dir), "--data_output_dirs", str(out),
          "--max_length", "512", "--num_spliced_dataset_bins", "2", *extra])


def _error_line(main, capsys, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        _run(main, *args)
    assert exc.value.code == 2
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()
    assert err[-1].startswith("error: ")
    # one line: no traceback, no other error line (progress bars may come before it)
    assert "Traceback" not in stderr and sum(line.startswith("error") for line in err) == 1, stderr[-2000:]
    return err[-1][len("error: "):]


@pytest.mark.parametrize("reason", ["invalid_json", "missing_field", "extra_field", "wrong_type", "empty_target",
                                    "not_utf8"])
def test_pretrain_strict_error_names_file_line_field(reason, tmp_path, news, mistral_dir, capsys):
    bad, problem = _bad_pretrain_lines(news)[reason]
    path = _write(tmp_path / "in" / "news.jsonl.gz", [_dumps(news[0]), b"", _dumps(news[1]), bad, _dumps(news[2])])
    message = _error_line(pretrain_main, capsys, tmp_path / "in", mistral_dir, tmp_path / "out")
    assert message == f"{path}:4: {problem}"  # the blank line 2 still counts: line numbers are the file's
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("reason", ["unknown_role", "late_system", "wrong_alternation", "ends_with_human",
                                    "missing_field", "extra_field", "wrong_type", "empty_content", "empty_messages"])
def test_sft_strict_error_names_file_line_field(reason, tmp_path, chats, mistral_dir, capsys):
    bad, problem = _bad_sft_lines(chats)[reason]
    path = _write(tmp_path / "in" / "chat.jsonl", [_dumps(chats[0]), _dumps(chats[1]), bad])
    message = _error_line(sft_main, capsys, tmp_path / "in", mistral_dir, tmp_path / "out", "--llama_version", "2")
    assert message == f"{path}:3: {problem}"


def _unwritable_lines(news, chats) -> dict[str, tuple[bytes, str]]:
    """Lines that parse but hold text no file can hold (a JSON escape of half a surrogate pair, as web crawls
    have), or that nest too deeply to parse: before, an encoder's or the parser's traceback, in both modes."""
    row, msgs = news[5], chats[3]["messages"]
    cut = row["target"][:5] + "\ud800" + row["target"][5:]
    reply = {**msgs[1], "content": msgs[1]["content"][:3] + "\udc80"}
    return {
        "pretrain_surrogate": (json.dumps({**row, "target": cut}).encode("ascii"),
                               f"target: a lone surrogate {chr(0xD800)!r} at character 6 (not encodable as UTF-8)"),
        "pretrain_nested": (b"[" * 100_000, "invalid JSON (nested too deeply)"),
        "sft_surrogate": (json.dumps({"messages": [msgs[0], reply]}).encode("ascii"),
                          f"messages[1].content: a lone surrogate {chr(0xDC80)!r} at character "
                          f"{len(msgs[1]['content'][:3]) + 1} (not encodable as UTF-8)"),
    }


@pytest.mark.parametrize("name", ["pretrain_surrogate", "pretrain_nested", "sft_surrogate"])
def test_text_that_cannot_be_written_is_one_located_error_or_a_counted_skip(name, tmp_path, news, chats, mistral_dir,
                                                                            capsys):
    bad, problem = _unwritable_lines(news, chats)[name]
    main, rows, extra = ((sft_main, chats, ["--llama_version", "2"]) if name.startswith("sft") else
                         (pretrain_main, news, []))
    path = _write(tmp_path / "in" / "a.jsonl", [_dumps(rows[0]), _dumps(rows[1]), bad, _dumps(rows[2])])
    assert _error_line(main, capsys, tmp_path / "in", mistral_dir, tmp_path / "out", *extra) == f"{path}:3: {problem}"
    _run(main, tmp_path / "in", mistral_dir, tmp_path / "out", "--skip_invalid", *extra)
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]
    reason = "invalid_json" if name == "pretrain_nested" else "not_utf8"
    assert counts["skipped"] == {reason: 1} and counts["documents_in"] == 3


def test_skip_invalid_counts_every_reason(tmp_path, news, chats, mistral_dir):
    bad_pretrain = _bad_pretrain_lines(news)
    lines = [_dumps(r) for r in news[:10]] + [bad for bad, _ in bad_pretrain.values()] + [_dumps(r) for r in news[10:]]
    _write(tmp_path / "pre" / "news.jsonl", lines)
    _run(pretrain_main, tmp_path / "pre", mistral_dir, tmp_path / "out_pre", "--skip_invalid")
    counts = json.loads((tmp_path / "out_pre" / "manifest.json").read_text())["counts"]
    assert counts["skipped"] == {reason: 1 for reason in bad_pretrain}
    assert counts["documents_in"] == len(news) and counts["lines_read"] == len(news) + len(bad_pretrain)
    assert counts["skipped_examples"][0] == f"{tmp_path / 'pre' / 'news.jsonl'}:11: {bad_pretrain['invalid_json'][1]}"

    bad_sft = _bad_sft_lines(chats)
    reasons = {"ends_with_human": "wrong_alternation", "late_system": "wrong_alternation"}  # broken alternation
    lines = [_dumps(r) for r in chats] + [bad for bad, _ in bad_sft.values()]
    _write(tmp_path / "sft" / "chat.jsonl", lines)
    _run(sft_main, tmp_path / "sft", mistral_dir, tmp_path / "out_sft", "--skip_invalid", "--llama_version", "2")
    counts = json.loads((tmp_path / "out_sft" / "manifest.json").read_text())["counts"]
    expected = {}
    for reason in bad_sft:
        expected[reasons.get(reason, reason)] = expected.get(reasons.get(reason, reason), 0) + 1
    assert counts["skipped"] == expected and counts["documents_in"] == len(chats)


def test_empty_inputs_are_errors(tmp_path, mistral_dir, capsys):
    (tmp_path / "empty").mkdir()
    assert _error_line(pretrain_main, capsys, tmp_path / "empty", mistral_dir, tmp_path / "out") == (
        f"{tmp_path / 'empty'}: no jsonl files (looked for .jsonl, .jsonl.gz, .jsonl.zst, .json, .json.gz, .json.zst)")
    _write(tmp_path / "blank" / "a.jsonl", [b"", b"  "])
    assert _error_line(pretrain_main, capsys, tmp_path / "blank", mistral_dir, tmp_path / "out") == (
        f"{tmp_path / 'blank' / 'a.jsonl'}: no valid rows")
    assert _error_line(pretrain_main, capsys, tmp_path / "missing", mistral_dir, tmp_path / "out") == (
        f"{tmp_path / 'missing'}: input directory does not exist")
    _write(tmp_path / "ok" / "a.jsonl", [b'{"source": "", "target": "x", "category": "c"}'])
    assert _error_line(pretrain_main, capsys, f"{tmp_path / 'ok'},{tmp_path}", mistral_dir, tmp_path / "out") == (
        f"{tmp_path / 'ok' / 'a.jsonl'}: given twice by --data_input_dirs (also as {tmp_path / 'ok' / 'a.jsonl'})")
    assert _error_line(pretrain_main, capsys, tmp_path / "ok", tmp_path / "no_tok", tmp_path / "out") == (
        f"{tmp_path / 'no_tok'}: tokenizer directory does not exist")


def test_empty_part_is_an_error_unless_lenient(tmp_path, news, mistral_dir, capsys):
    """3 short documents pack into 1 sequence: with 2 bins, bin 1 is empty in every category."""
    _write(tmp_path / "in" / "a.jsonl", [_dumps(r) for r in news[:3]])
    _run(pretrain_main, tmp_path / "in", mistral_dir, tmp_path / "out", "--skip_invalid")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (empty,) = manifest["counts"]["empty_parts"]
    assert [p["bin"] for p in manifest["parts"]] == [1 - empty]
    assert manifest["counts"]["empty_bins"] == {"news": [empty]}
    assert sorted(p.name for p in (tmp_path / "out" / "arrow").iterdir()) == [manifest["parts"][0]["name"]]
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert _error_line(pretrain_main, capsys, tmp_path / "in", mistral_dir, tmp_path / "out", "--overwrite") == (
        f"--num_spliced_dataset_bins 2: bin {empty} would be empty in every category (the largest category has "
        "1 rows); use fewer bins, or --skip_invalid to write only the non-empty parts")
    # a failed --overwrite leaves the earlier output exactly as it was (complete), and nothing of its own
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["arrow", "cache", "jsonl", "manifest.json"]


@pytest.mark.parametrize("flags,message", [
    (["--max_length", "1"], "--max_length 1: must be at least 2"),
    (["--num_spliced_dataset_bins", "0"], "--num_spliced_dataset_bins 0: must be at least 1"),
    (["--num_proc", "0"], "--num_proc 0: must be at least 1"),
])
def test_bad_numbers_are_refused(flags, message, tmp_path, news, mistral_dir, capsys):
    _write(tmp_path / "in" / "a.jsonl", [_dumps(r) for r in news[:3]])
    assert _error_line(pretrain_main, capsys, tmp_path / "in", mistral_dir, tmp_path / "out", *flags) == message


# ------------------------------------------------------------------------------------------ paths
@pytest.mark.parametrize("inputs,output,target,given", [
    ("X/jsonl", "X", "X/jsonl", "X/jsonl"),                 # the corpus where the mirror goes
    ("X", "X/out", "X/out/arrow", "X"),                     # a rerun would read the output as input
    ("X/arrow/a.jsonl", "X", "X/arrow", "X/arrow/a.jsonl"),  # one input file inside a replaced folder
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_folder_that_is_or_holds_an_input_is_refused_up_front(inputs, output, target, given, overwrite,
                                                                       tmp_path, news, mistral_dir, capsys):
    """The run replaces OUT/arrow, OUT/jsonl (and OUT/eval): with the corpus in X/jsonl and OUT = X, the first run
    said ``X/jsonl: incomplete output of an earlier run (pass --overwrite ...)`` and following that advice deleted
    the corpus. Now one line, before any work, with or without --overwrite; the corpus untouched."""
    corpus = tmp_path / inputs if inputs.endswith(".jsonl") else tmp_path / inputs / "a.jsonl"
    _write(corpus, [_dumps(r) for r in news[:3]])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    extra = ["--overwrite"] if overwrite else []
    assert _error_line(pretrain_main, capsys, tmp_path / inputs, mistral_dir, tmp_path / output, *extra) == (
        f"{tmp_path / target}: this run writes (and with --overwrite replaces) it, and it is, holds or lies inside "
        f"the input {tmp_path / given}; choose an output folder apart from the inputs")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "X" / "cache").exists() and not (tmp_path / "X" / "out").exists()


def test_an_input_file_name_that_is_not_utf8_is_refused_before_any_work(tmp_path, news, mistral_dir, capsys):
    """``caf\\xe9.jsonl`` (Latin-1) crashed with UnicodeEncodeError once the whole corpus was tokenised (the mirror
    and the manifest name every file); now one line naming it, and nothing is written."""
    _write(tmp_path / "in" / "a.jsonl", [_dumps(r) for r in news[:3]])
    path = _write(tmp_path / "in" / os.fsdecode(b"caf\xe9.jsonl"), [_dumps(r) for r in news[3:6]])
    assert _error_line(pretrain_main, capsys, tmp_path / "in", mistral_dir, tmp_path / "out") == (
        f"{str(path)!r}: the file name is not valid UTF-8 (rename the file)")
    assert not (tmp_path / "out").exists()


NEW_FORM = {"--data_output_dirs": "out"}
OLDER_FORM = {"--data_cache_dir": "c", "--data_jsonl_output_dir": "jsonl", "--data_arrow_output_dir": "arrow"}


@pytest.mark.parametrize("paths,file", [
    (NEW_FORM, "out"), (NEW_FORM, "out/arrow"), (NEW_FORM, "out/jsonl"),
    ({**NEW_FORM, "--data_cache_dir": "cache"}, "cache"),
    ({**NEW_FORM, "--data_cache_dir": "f/cache"}, "f"),  # a folder above it
    (OLDER_FORM, "arrow"), (OLDER_FORM, "jsonl"), (OLDER_FORM, "c"),
])
def test_an_output_path_that_is_a_file_is_one_line(paths, file, tmp_path, news, mistral_dir, capsys):
    """An output, cache, arrow or jsonl path (or a folder above it) that is a file was a NotADirectoryError
    traceback: now one line naming it, the file untouched."""
    _write(tmp_path / "in" / "a.jsonl", [_dumps(r) for r in news[:3]])
    _write(tmp_path / file, [b"mine"])
    argv = ["--data_input_dirs", str(tmp_path / "in"), "--tokenizer_dir", str(mistral_dir),
            *[arg for flag, path in paths.items() for arg in (flag, str(tmp_path / path))]]
    with pytest.raises(SystemExit):
        pretrain_main(argv)
    stderr = capsys.readouterr().err
    assert stderr.strip().splitlines()[-1] == (f"error: {tmp_path / file}: exists and is not a directory (a file "
                                               f"or a broken link); choose another output folder")
    assert "Traceback" not in stderr and (tmp_path / file).read_bytes() == b"mine\n"
