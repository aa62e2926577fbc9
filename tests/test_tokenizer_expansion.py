"""Tokenizer expansion on the real Mistral (SentencePiece) and SmolLM2 (byte-level BPE) tokenizers.

Pieces are the most frequent 2-4 character words of jieba's real dictionary; the compression and agreement
checks run on the bundled real Chinese news/reviews and the English novel.
"""
from __future__ import annotations

import json
import shutil
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import sentencepiece as spm

from colossal_llama.tokenizer.base_vocab import load_sp_proto
from colossal_llama.tokenizer.init_tokenizer import TokenizerMismatchError, expand_tokenizer, main
from colossal_llama.tokenizer.mine_pieces import top_cjk_words
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.tokenizer.pieces import read_pieces_file
from colossal_llama.utils.errors import DataError

N_WORDS = 3000
DUPLICATED = 5
ALREADY_PRESENT = [" the", "的"]  # Mistral has '▁the' and '的'


def write_pieces(path: Path, pieces: list[str]) -> Path:
    path.write_text("".join(json.dumps({"piece": p}, ensure_ascii=False) + "\n" for p in pieces), encoding="utf-8")
    return path


def run_cli(argv: list[str]) -> str:
    out = StringIO()
    with redirect_stdout(out):
        assert main([str(a) for a in argv]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def jieba_words(data_dir) -> list[str]:
    return top_cjk_words(data_dir / "vocab" / "jieba_dict.txt", N_WORDS, max_chars=4)


@pytest.fixture(scope="module")
def mistral_src(tmp_path_factory, mistral_sp_model) -> Path:
    src = tmp_path_factory.mktemp("mistral_src")
    shutil.copy(mistral_sp_model, src / "tokenizer.model")  # bare LLaMA-2 style folder: only tokenizer.model
    return src


@pytest.fixture(scope="module")
def mistral_expanded(tmp_path_factory, mistral_src, jieba_words):
    """CLI run: jieba words + duplicates + pieces Mistral already has -> (target dir, report dict, stdout)."""
    work = tmp_path_factory.mktemp("mistral_expanded")
    pieces = write_pieces(work / "pieces.jsonl", jieba_words + jieba_words[:DUPLICATED] + ALREADY_PRESENT)
    target = work / "tokenizer"
    stdout = run_cli([
        "--source_tokenizer_dir", mistral_src, "--target_tokenizer_dir", target,
        "--expand_tokens_file", pieces, "--report_json", work / "report.json",
    ])
    return target, json.loads((work / "report.json").read_text()), stdout


def test_sp_vocab_grows_by_exactly_the_new_pieces(mistral_expanded, jieba_words):
    target, report, _ = mistral_expanded
    assert report["vocab_before"] == 32000
    assert report["duplicates"] == DUPLICATED
    assert report["pieces_requested"] == len(jieba_words) + len(ALREADY_PRESENT)
    assert report["pieces_already_present"] >= len(ALREADY_PRESENT)
    assert report["pieces_added"] + report["pieces_already_present"] == report["pieces_requested"]
    # missing single characters of the new words are added too (counted), so HF can merge like sentencepiece,
    # and bridge sub-words (counted) so that words like 天安门 can be merged at all
    assert report["component_chars_added"] > 0 and report["bridge_pieces_added"] > 0
    assert report["unreachable_pieces"] == []
    grown = report["pieces_added"] + report["component_chars_added"] + report["bridge_pieces_added"]
    assert report["vocab_after"] == 32000 + grown
    assert len(load_sp_proto(target / "tokenizer.model").pieces) == 32000 + grown
    assert len(load_tokenizer(target)) == 32000 + grown


def test_sp_old_ids_unchanged_and_new_ids_appended_in_file_order(mistral_expanded, mistral_sp_model, jieba_words):
    target, _, _ = mistral_expanded
    old, new = load_sp_proto(mistral_sp_model), load_sp_proto(target / "tokenizer.model")
    for before, after in zip(old.pieces, new.pieces):
        assert (before.piece, before.score, before.type) == (after.piece, after.score, after.type)
    sp = spm.SentencePieceProcessor(model_file=str(target / "tokenizer.model"))
    new_ids = [sp.piece_to_id(w) for w in jieba_words if sp.piece_to_id(w) >= 32000]
    assert len(new_ids) > 0.99 * len(jieba_words)
    assert new_ids == sorted(new_ids)
    hf_vocab = load_tokenizer(target).get_vocab()
    assert all(hf_vocab[p.piece] == i for i, p in enumerate(old.pieces))


def test_sp_target_has_llama_special_tokens_and_files(mistral_expanded):
    target, _, _ = mistral_expanded
    assert {p.name for p in target.iterdir()} >= {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    tok = load_tokenizer(target)
    assert (tok.unk_token, tok.bos_token, tok.eos_token) == ("<unk>", "<s>", "</s>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok("中国")["input_ids"][0] == 1  # BOS added like LLaMA


def test_sp_chinese_compression_improves_english_unchanged(mistral_expanded):
    _, report, stdout = mistral_expanded
    zh, en = report["chars_per_token"]["zh"], report["chars_per_token"]["en"]
    assert report["sample_chars"]["zh"] >= 100_000 and report["sample_chars"]["en"] >= 100_000
    # measured on this sample: 0.865 -> 1.120 chars/token (+29%)
    assert zh["after"] >= 1.2 * zh["before"]
    assert en["after"] == pytest.approx(en["before"], rel=1e-12)
    assert "chars/token zh:" in stdout and "chars/token en:" in stdout


def test_sp_and_autotokenizer_agree_on_every_sample_line(mistral_expanded):
    target, report, stdout = mistral_expanded
    assert report["check_total"] > 500
    assert report["check_identical"] == report["check_total"]
    assert f"{report['check_total']}/{report['check_total']} lines identical" in stdout
    # and independently of the report: the words whose characters Mistral lacked encode identically
    sp = spm.SentencePieceProcessor(model_file=str(target / "tokenizer.model"))
    hf = load_tokenizer(target)
    line = "今天天气很好，我们去公园散步。Natsume wrote Botchan in 1906."
    assert sp.encode(line) == hf(line, add_special_tokens=False)["input_ids"]
    assert "天气" in hf.tokenize(line)


def test_sp_every_requested_word_is_emitted_as_one_token(mistral_expanded, jieba_words):
    """Each new word, written alone, encodes to its own single piece with both tokenizers (bridges make the
    words that no two existing pieces could merge into reachable)."""
    target, report, _ = mistral_expanded
    sp = spm.SentencePieceProcessor(model_file=str(target / "tokenizer.model"))
    hf = load_tokenizer(target)
    new_words = [w for w in jieba_words if sp.piece_to_id(w) >= 32000]
    single_sp = [w for w in new_words if sp.encode(w, out_type=str)[-1:] == [w]]
    assert len(single_sp) == len(new_words), sorted(set(new_words) - set(single_sp))[:10]
    assert len(new_words) > 1000
    encoded = hf(new_words, add_special_tokens=False)["input_ids"]  # every new word, in one batch
    assert [w for w, ids in zip(new_words, encoded) if ids != sp.encode(w)] == []


def test_sp_source_saved_by_transformers_expands_and_agrees(tmp_path, mistral_src, jieba_words, data_dir):
    """A model folder's tokenizer (written by save_pretrained: AddedToken dicts, "add_prefix_space": null)."""
    saved = tmp_path / "saved"
    load_tokenizer(mistral_src).save_pretrained(saved)
    assert isinstance(json.loads((saved / "special_tokens_map.json").read_text())["bos_token"], dict)
    report = expand_tokenizer(
        saved, tmp_path / "out", jieba_words[:300],
        report_files=[data_dir / "pretrain" / "zh_news_peoples_daily_199801.jsonl"], report_max_chars=20_000,
    )
    assert report.check_identical == report.check_total > 0
    assert load_tokenizer(tmp_path / "out").bos_token == "<s>"


def test_sp_without_component_chars_mismatch_is_detected_and_nothing_written(tmp_path, mistral_src, jieba_words, data_dir):
    target = tmp_path / "out"
    with pytest.raises(TokenizerMismatchError) as err:
        expand_tokenizer(
            mistral_src, target, jieba_words[:1000], add_component_chars=False,
            report_files=[data_dir / "pretrain" / "zh_reviews.jsonl"], report_max_chars=20_000,
        )
    report = err.value.report
    assert 0 < report.check_identical < report.check_total
    assert "sentencepiece" in report.first_mismatch and "AutoTokenizer" in report.first_mismatch
    assert not target.exists()


def test_sp_mismatch_cli_exits_nonzero_unless_allowed(tmp_path, mistral_src, jieba_words, data_dir, capsys):
    pieces = write_pieces(tmp_path / "p.jsonl", jieba_words[:500])
    base = ["--source_tokenizer_dir", str(mistral_src), "--expand_tokens_file", str(pieces), "--no_component_chars",
            "--report_corpus", str(data_dir / "pretrain" / "zh_reviews.jsonl"), "--report_max_chars", "20000"]
    with pytest.raises(SystemExit) as exit_info:
        main(base + ["--target_tokenizer_dir", str(tmp_path / "refused")])
    assert exit_info.value.code == 2
    err = capsys.readouterr()
    assert "first difference: sample line" in err.out
    assert err.err.startswith("error: ") and "--allow_mismatch" in err.err and len(err.err.strip().splitlines()) == 1
    assert main(base + ["--target_tokenizer_dir", str(tmp_path / "kept"), "--allow_mismatch"]) == 0
    assert (tmp_path / "kept" / "tokenizer.json").is_file()


# ---------------------------------------------------------------- byte-level BPE (SmolLM2)


@pytest.fixture(scope="module")
def smollm2_expanded(tmp_path_factory, smollm2_dir, jieba_words):
    work = tmp_path_factory.mktemp("smollm2_expanded")
    pieces = write_pieces(work / "pieces.jsonl", jieba_words)
    target = work / "tokenizer"
    stdout = run_cli([
        "--source_tokenizer_dir", smollm2_dir, "--target_tokenizer_dir", target,
        "--expand_tokens_file", pieces, "--report_json", work / "report.json",
    ])
    return target, json.loads((work / "report.json").read_text()), stdout


def test_bpe_vocab_grows_by_exactly_the_new_pieces_with_old_ids_unchanged(smollm2_expanded, smollm2_dir, jieba_words):
    target, report, _ = smollm2_expanded
    source, expanded = load_tokenizer(smollm2_dir), load_tokenizer(target)
    assert report["kind"] == "bpe" and report["vocab_before"] == len(source) == 49152
    assert report["pieces_added"] + report["pieces_already_present"] == len(jieba_words)
    assert len(expanded) == report["vocab_after"] == 49152 + report["pieces_added"]
    new_vocab = expanded.get_vocab()
    assert all(new_vocab[piece] == i for piece, i in source.get_vocab().items())
    added = [w for w in jieba_words if new_vocab.get(w, -1) >= 49152]
    assert len(added) == report["pieces_added"]
    assert [new_vocab[w] for w in added] == list(range(49152, 49152 + len(added)))
    assert expanded.chat_template == source.chat_template
    assert expanded.eos_token == source.eos_token


def test_bpe_chinese_compression_improves_and_text_round_trips(smollm2_expanded, smollm2_dir):
    target, report, stdout = smollm2_expanded
    zh, en = report["chars_per_token"]["zh"], report["chars_per_token"]["en"]
    # measured on this sample: 0.561 -> 0.824 chars/token (+47%)
    assert zh["after"] >= 1.3 * zh["before"]
    assert en["after"] == pytest.approx(en["before"], rel=1e-12)
    assert report["check_total"] > 500 and report["check_identical"] == report["check_total"]
    assert "round trip" in stdout
    # new pieces are ordinary tokens: they survive skip_special_tokens (how inference decodes)
    tok = load_tokenizer(target)
    line = "我们在中国发展经济。"
    ids = tok(line, add_special_tokens=False)["input_ids"]
    assert any(i >= 49152 for i in ids)
    assert tok.decode(ids, skip_special_tokens=True) == line


# ---------------------------------------------------------------- bad input


def expand_argv(src, target, pieces) -> list[str]:
    return ["--source_tokenizer_dir", str(src), "--target_tokenizer_dir", str(target), "--expand_tokens_file", str(pieces)]


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_missing_source_dir_is_one_line_error(tmp_path, capsys):
    pieces = write_pieces(tmp_path / "p.jsonl", ["你好"])
    err = one_line_error(capsys, expand_argv(tmp_path / "nowhere", tmp_path / "out", pieces))
    assert "nowhere" in err and "does not exist" in err


def test_existing_target_is_refused_without_overwrite_then_replaced_with_it(tmp_path, mistral_src, data_dir, capsys):
    target = tmp_path / "out"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")
    (target / "notes.txt").write_text("mine")
    pieces = write_pieces(tmp_path / "p.jsonl", ["天气", "你好"])
    err = one_line_error(capsys, expand_argv(mistral_src, target, pieces))
    assert str(target) in err and "--overwrite" in err
    report_args = ["--report_corpus", str(data_dir / "pretrain" / "zh_reviews.jsonl"), "--report_max_chars", "5000"]
    assert main(expand_argv(mistral_src, target, pieces) + report_args + ["--overwrite"]) == 0
    assert len(load_tokenizer(target)) >= 32002
    assert (target / "notes.txt").read_text() == "mine"  # only tokenizer files are replaced


@pytest.mark.parametrize(
    "lines, line_no, expected",
    [
        (['{"piece": "你好"}', '{"piece": "天气"'], 2, "invalid JSON"),
        (['{"piece": "你好"}', '{"piece": "天气"}', '{"word": "x"}'], 3, "piece: missing"),
        (['{"piece": 5}'], 1, "piece: must be a string"),
        (['{"piece": "你好"}', '{"piece": ""}'], 2, "piece: empty"),
        (['{"piece": " \\t "}'], 1, "piece: empty or whitespace-only"),
        (['["你好"]'], 1, "expected a JSON object"),
    ],
)
def test_malformed_pieces_file_names_file_line_and_field(tmp_path, mistral_src, capsys, lines, line_no, expected):
    pieces = tmp_path / "pieces.jsonl"
    pieces.write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = one_line_error(capsys, expand_argv(mistral_src, tmp_path / "out", pieces))
    assert f"{pieces}:{line_no}: " in err and expected in err
    assert not (tmp_path / "out").exists()


def test_duplicates_are_counted_not_errors(tmp_path):
    pieces = write_pieces(tmp_path / "p.jsonl", ["你好", "天气", "你好", "你好", " the"])
    parsed = read_pieces_file(pieces)
    assert parsed.pieces == ["你好", "天气", " the"]
    assert (parsed.records, parsed.duplicates) == (5, 2)
    with pytest.raises(DataError):
        read_pieces_file(write_pieces(tmp_path / "bad.jsonl", ["ok", "   "]))


def test_word_start_markers_are_read_as_spaces_not_added_as_literal_tokens(tmp_path, smollm2_dir, mistral_src,
                                                                           data_dir):
    parsed = read_pieces_file(write_pieces(tmp_path / "p.jsonl", ["▁上海", " 上海", "Ġ上海", "Ġ北京", "中▁国", "aĠb"]))
    assert parsed.pieces == [" 上海", " 北京", "中 国", "aĠb"] and parsed.duplicates == 2  # only a leading 'Ġ'
    with pytest.raises(DataError, match=r"bad.jsonl:2: piece: empty or whitespace-only"):
        read_pieces_file(write_pieces(tmp_path / "bad.jsonl", ["上海", "▁"]))
    sample = dict(report_files=[data_dir / "pretrain" / "zh_reviews.jsonl"], report_max_chars=2000)
    bpe = expand_tokenizer(smollm2_dir, tmp_path / "bpe", ["▁上海", "Ġ北京"], **sample)
    tok = load_tokenizer(tmp_path / "bpe")
    added = [tok.convert_ids_to_tokens(i) for i in range(bpe.vocab_before, len(tok))]
    assert bpe.pieces_added == len(added) and bpe.pieces_added + bpe.pieces_already_present == 2
    assert all(token in (" 上海", " 北京") for token in added), added
    for text in (" 上海", " 北京"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids) == text
    sp = expand_tokenizer(mistral_src, tmp_path / "sp", ["Ġ天气预报", "天气预报网"], **sample)
    proto = load_sp_proto(tmp_path / "sp" / "tokenizer.model")
    new_pieces = [p.piece for p in proto.pieces[sp.vocab_before:]]
    assert "▁天气预报" in new_pieces and not any("Ġ" in p for p in new_pieces)


@pytest.mark.parametrize("files, where", [
    ({"added_tokens.json": {"<pad>": 32000}}, "added_tokens.json: added token '<pad>' has id 32000 beyond the 32000"),
    ({"tokenizer.json": {"added_tokens": [{"id": 32001, "content": "<|im_end|>"}]}},
     "tokenizer.json: added token '<|im_end|>' has id 32001 beyond"),
    ({"added_tokens.json": {"<pad>": "x"}}, "added_tokens.json: '<pad>': token id 'x' is not a non-negative integer"),
    ({"special_tokens_map.json": {"pad_token": "<pad>"}}, "its tokenizer files add 1 token(s) beyond the "
                                                           "SentencePiece pieces ('<pad>')"),
])
def test_sp_source_with_tokens_past_its_pieces_is_a_one_line_refusal(tmp_path, mistral_src, capsys, files, where):
    source = tmp_path / "source"
    shutil.copytree(mistral_src, source)
    for name, value in files.items():
        (source / name).write_text(json.dumps(value))
    pieces = write_pieces(tmp_path / "p.jsonl", ["天气预报"])
    err = one_line_error(capsys, expand_argv(source, tmp_path / "out", pieces))
    assert err.startswith(f"error: {source}") and where in err, err
    assert not (tmp_path / "out").exists()


def test_an_existing_report_json_is_refused_before_any_work(tmp_path, mistral_src, capsys):
    """``--report_json`` was written after the tokenizer, replacing a file silently (and a folder made the run fail
    at its end): now it is checked first, and an existing file needs ``--overwrite``."""
    pieces = write_pieces(tmp_path / "pieces.jsonl", ["上海", "北京"])
    report = tmp_path / "report.json"
    report.write_text("the user's notes")
    argv = ["--source_tokenizer_dir", mistral_src, "--target_tokenizer_dir", tmp_path / "tok",
            "--expand_tokens_file", pieces, "--report_json", report]
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    assert f"--report_json {report}: already exists (pass --overwrite" in capsys.readouterr().err
    assert report.read_text() == "the user's notes" and not (tmp_path / "tok").exists()


def test_bpe_pieces_whose_text_a_vocabulary_entry_already_spells_are_not_added(smollm2_dir, jieba_words, tmp_path):
    """A byte-level BPE vocabulary spells CJK in bytes (``ä½łå¥½``): a piece whose text an entry already decodes
    to is present, not added again as a second token for the same text; only the others are added."""
    from colossal_llama.tokenizer.base_vocab import bpe_vocab_texts

    source = load_tokenizer(smollm2_dir)
    texts = bpe_vocab_texts(source)
    present = sorted(t for t in texts if len(t) == 2 and all("\u4e00" <= c <= "\u9fff" for c in t))[:3]
    assert len(present) == 3 and not set(present) & set(source.get_vocab())  # spelled in bytes, not as text
    new = [w for w in jieba_words[:10] if w not in texts]
    assert new
    expand_tokenizer(smollm2_dir, tmp_path / "tokenizer", present + new, report_max_chars=2000)
    expanded = load_tokenizer(tmp_path / "tokenizer")
    assert len(expanded) == len(source) + len(new)
    for word in present:
        ids = expanded(word, add_special_tokens=False)["input_ids"]
        assert ids == source(word, add_special_tokens=False)["input_ids"] and len(ids) == 1, word
