"""Mean-of-subwords model initialisation for an expanded tokenizer (SPEC section 2).

Real models and tokenizers: SmolLM2-135M-Instruct (byte-level BPE, tied embeddings, float32) expanded with
real jieba words, and a config-built LLaMA carrying the real Mistral SentencePiece tokenizer (bf16, untied,
sharded). Expected new rows are recomputed independently of the library: the source tokenizer's own encode
for byte-level BPE, and the ``sentencepiece`` library (dummy prefix off: a word in mid-sentence) for SP.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

from colossal_llama.model import init_model as init_model_module
from colossal_llama.model.init_model import init_model_from_expanded_tokenizer, main, mean_init_new_rows
from colossal_llama.tokenizer.init_tokenizer import expand_tokenizer
from colossal_llama.tokenizer.mine_pieces import top_cjk_words
from colossal_llama.utils.errors import UserInputError


def jieba_words(data_dir: Path, count: int) -> list[str]:
    """The ``count`` most frequent multi-character, all-CJK words of the real jieba dictionary."""
    return top_cjk_words(data_dir / "vocab" / "jieba_dict.txt", count)


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def expected_mean(matrix: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Independent reference: float32 mean of the pieces' rows, rounded once to the matrix dtype."""
    return matrix[ids].float().mean(dim=0).to(matrix.dtype)


# ---------------------------------------------------------------- SmolLM2 (byte-level BPE, tied, float32)


@pytest.fixture(scope="module")
def smollm2_expanded(smollm2_dir, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2_init")
    tokenizer_dir, model_dir = root / "tokenizer", root / "model"
    expand_tokenizer(smollm2_dir, tokenizer_dir, jieba_words(data_dir, 300), report_max_chars=2000)
    report = init_model_from_expanded_tokenizer(smollm2_dir, tokenizer_dir, model_dir)
    return tokenizer_dir, model_dir, report


def test_smollm2_new_rows_are_means_of_source_pieces_and_all_else_is_bit_identical(smollm2_dir, smollm2_expanded):
    tokenizer_dir, model_dir, report = smollm2_expanded
    source_tok, target_tok = AutoTokenizer.from_pretrained(smollm2_dir), AutoTokenizer.from_pretrained(tokenizer_dir)
    old_vocab, new_vocab = len(source_tok), len(target_tok)
    assert old_vocab == 49152 and new_vocab > old_vocab + 250
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vocab_size"] == new_vocab and config["tie_word_embeddings"] is True
    assert (report.old_vocab_size, report.new_vocab_size, report.new_rows) == (old_vocab, new_vocab, new_vocab - old_vocab)
    assert report.tied_embeddings and report.empty_split_rows == 0 and report.padding_rows == 0

    source, target = load_all(smollm2_dir), load_all(model_dir)
    assert set(target) == set(source) == set(source) - {"lm_head.weight"}, "tied: no separate lm_head is written"
    for name, tensor in source.items():
        assert target[name].dtype == tensor.dtype == torch.float32
        if name != "model.embed_tokens.weight":
            assert torch.equal(target[name], tensor), name
    old, new = source["model.embed_tokens.weight"], target["model.embed_tokens.weight"]
    assert new.shape == (new_vocab, old.shape[1])
    assert torch.equal(new[:old_vocab], old)
    counts = []
    for token_id in range(old_vocab, new_vocab):
        word = target_tok.convert_ids_to_tokens(token_id)
        pieces = source_tok.encode(word, add_special_tokens=False)
        counts.append(len(pieces))
        assert torch.equal(new[token_id], expected_mean(old, pieces)), word
    assert report.pieces_per_new_row["max"] == max(counts) and report.pieces_per_new_row["min"] == min(counts)


def test_smollm2_target_holds_the_expanded_tokenizer_loads_and_generates_like_the_source(
        smollm2_dir, smollm2_expanded, data_dir):
    tokenizer_dir, model_dir, report = smollm2_expanded
    tokenizer_files = sorted(p.name for p in tokenizer_dir.iterdir())
    assert sorted(report.tokenizer_files) == tokenizer_files
    for name in tokenizer_files:
        assert (model_dir / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name
    target_tok = AutoTokenizer.from_pretrained(model_dir)
    assert target_tok.encode("中国", add_special_tokens=False) == [target_tok.convert_tokens_to_ids("中国")]
    assert target_tok.convert_tokens_to_ids("中国") >= 49152

    line = (data_dir / "pretrain" / "en_novel_botchan.jsonl").read_text(encoding="utf-8").splitlines()[3]
    prompt_text = json.loads(line)["target"][:200]
    source_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = source_tok(prompt_text, return_tensors="pt").input_ids
    assert torch.equal(target_tok(prompt_text, return_tensors="pt").input_ids, prompt)
    outputs = []
    for folder in (smollm2_dir, model_dir):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.dtype == torch.float32
        with torch.no_grad():
            outputs.append(model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                          do_sample=False))
        del model
    assert outputs[1].tolist() == outputs[0].tolist()


# ---------------------------------------------------------------- LLaMA + Mistral SentencePiece (sharded, bf16)


@pytest.fixture(scope="module")
def sharded_llama(mistral_sp_model, tmp_path_factory):
    """A config-built LLaMA (bf16, untied, ~1 MB shards) saved with the real Mistral tokenizer."""
    folder = tmp_path_factory.mktemp("llama") / "source"
    tokenizer = LlamaTokenizerFast.from_pretrained(str(mistral_sp_model.parent))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(folder), max_shard_size="1MB", safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def mistral_expanded_tokenizer(mistral_sp_model, data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral_expanded") / "tokenizer"
    expand_tokenizer(mistral_sp_model.parent, folder, jieba_words(data_dir, 200), report_max_chars=2000)
    return folder


def sentencepiece_mid_text_ids(sp_model_path: Path, text: str) -> list[int]:
    """Ids sentencepiece gives ``text`` in mid-sentence: the source model with its dummy prefix turned off."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_model_path.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString()).encode(text)


def test_sharded_untied_bf16_llama_keeps_shard_layout_and_pads_vocab(sharded_llama, mistral_expanded_tokenizer,
                                                                   mistral_sp_model, tmp_path):
    source_index = json.loads((sharded_llama / "model.safetensors.index.json").read_text())
    assert len(set(source_index["weight_map"].values())) >= 3, "the fixture must really be sharded"
    target_tok = AutoTokenizer.from_pretrained(mistral_expanded_tokenizer)
    tokens = len(target_tok)
    multiple = 64 if tokens % 64 else 48  # so that padding rows exist
    padded = -(-tokens // multiple) * multiple
    out = tmp_path / "model"
    report = init_model_from_expanded_tokenizer(sharded_llama, mistral_expanded_tokenizer, out,
                                                pad_vocab_to_multiple_of=multiple)
    assert (report.new_vocab_size, report.padding_rows, report.tied_embeddings) == (padded, padded - tokens, False)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == padded
    # the tokens before expansion travel with the model: LoRA's --lora_train_embeddings auto trains the embeddings
    from colossal_llama.training.lora import vocabulary_was_expanded
    assert (config["colossal_llama_base_tokenizer_size"], config["colossal_llama_tokenizer_size"]) == (32000, tokens)
    assert vocabulary_was_expanded(out) and not vocabulary_was_expanded(sharded_llama)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == source_index["weight_map"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(set(source_index["weight_map"].values()))
    source, target = load_all(sharded_llama), load_all(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in target.values())

    for name, tensor in source.items():
        assert target[name].dtype == torch.bfloat16
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(target[name], tensor), name
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old, new = source[name], target[name]
        assert new.shape == (padded, 64) and torch.equal(new[:32000], old)
        for token_id in range(32000, tokens):
            piece = target_tok.convert_ids_to_tokens(token_id)
            ids = sentencepiece_mid_text_ids(mistral_sp_model, piece.replace("\u2581", " "))
            assert ids and torch.equal(new[token_id], expected_mean(old, ids)), (name, piece, ids)
        all_rows_mean = old.float().mean(dim=0).to(old.dtype)
        assert all(torch.equal(new[i], all_rows_mean) for i in range(tokens, padded))
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype="auto")
    assert model.dtype == torch.bfloat16 and model.get_input_embeddings().weight.shape == (padded, 64)


def _save_tied_llama(folder, mistral_sp_model, rows: int, hidden: int, seed: int, safetensors: bool):
    """A one-layer LLaMA with tied embeddings of ``rows`` rows and the Mistral tokenizer, saved in ``folder``."""
    tokenizer = LlamaTokenizerFast.from_pretrained(str(mistral_sp_model.parent))
    config = LlamaConfig(vocab_size=rows, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(folder), safe_serialization=safetensors)
    tokenizer.save_pretrained(str(folder))
    return folder


def test_pytorch_bin_source_with_tied_alias_is_converted_to_safetensors(mistral_sp_model, mistral_expanded_tokenizer,
                                                                        tmp_path):
    source_dir = _save_tied_llama(tmp_path / "bin_source", mistral_sp_model, rows=32000, hidden=32, seed=1,
                                  safetensors=False)
    assert (source_dir / "pytorch_model.bin").is_file()
    report = init_model_from_expanded_tokenizer(source_dir, mistral_expanded_tokenizer, tmp_path / "out")
    assert report.tied_embeddings and any(".bin" in note for note in report.notes)
    source = torch.load(source_dir / "pytorch_model.bin", weights_only=True)
    target = load_all(tmp_path / "out")
    assert "lm_head.weight" not in target
    for name, tensor in target.items():
        if name != "model.embed_tokens.weight":
            assert torch.equal(tensor, source[name]), name
    assert torch.equal(target["model.embed_tokens.weight"][:32000], source["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_single_shard_with_index_keeps_its_index(mistral_sp_model, mistral_expanded_tokenizer, tmp_path):
    source_dir = tmp_path / "one_shard"
    config = LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(str(source_dir))
    LlamaTokenizerFast.from_pretrained(str(mistral_sp_model.parent)).save_pretrained(str(source_dir))
    shard = "model-00001-of-00001.safetensors"
    (source_dir / "model.safetensors").rename(source_dir / shard)
    with safe_open(str(source_dir / shard), framework="pt") as f:
        weight_map = {name: shard for name in f.keys()}
    (source_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    init_model_from_expanded_tokenizer(source_dir, mistral_expanded_tokenizer, tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.vocab_size == len(
        AutoTokenizer.from_pretrained(mistral_expanded_tokenizer))


# ---------------------------------------------------------------- the pure function


def test_mean_init_new_rows_is_an_exact_per_token_mean_with_a_counted_fallback(smollm2_dir):
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        old = f.get_slice("model.embed_tokens.weight")[:4000]
    piece_ids = [[5], [7, 7], [10, 3999, 20], list(range(100, 140)), [], [0, 1, 2, 3] * 6]
    rows = mean_init_new_rows(old, piece_ids)
    assert rows.shape == (6, old.shape[1]) and rows.dtype == old.dtype
    for row, ids in zip(rows, piece_ids):
        assert torch.equal(row, old[ids].mean(dim=0) if ids else old.mean(dim=0))
    half = old.to(torch.bfloat16)
    for row, ids in zip(mean_init_new_rows(half, piece_ids), piece_ids):
        assert torch.equal(row, expected_mean(half, ids or list(range(4000))))


# ---------------------------------------------------------------- bad input and atomicity


def run_cli(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def cli_args(source, tokenizer, target, *extra) -> list[str]:
    return ["--source_model_and_tokenizer_path", str(source), "--target_tokenizer_path", str(tokenizer),
            "--target_model_path", str(target), *extra]


def reordered_mistral_tokenizer(mistral_sp_model: Path, folder: Path) -> Path:
    """The real Mistral tokenizer with two pieces swapped: same size, but not an expansion of the original."""
    from colossal_llama.tokenizer.base_vocab import load_sp_proto
    from colossal_llama.tokenizer.loading import sentencepiece_to_hf_dir

    proto = load_sp_proto(mistral_sp_model)
    proto.pieces[1000].piece, proto.pieces[1001].piece = proto.pieces[1001].piece, proto.pieces[1000].piece
    folder.mkdir()
    (folder / "swapped.model").write_bytes(proto.SerializeToString())
    return sentencepiece_to_hf_dir(folder / "swapped.model", folder)


def test_bad_inputs_give_one_line_errors_naming_the_path(sharded_llama, mistral_expanded_tokenizer, mistral_sp_model,
                                                         tmp_path, capsys):
    missing = tmp_path / "nope"
    assert f"{missing}: source model directory does not exist" in run_cli(
        cli_args(missing, mistral_expanded_tokenizer, tmp_path / "m"), capsys)
    assert f"{missing}: target tokenizer directory does not exist" in run_cli(
        cli_args(sharded_llama, missing, tmp_path / "m"), capsys)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((sharded_llama / "config.json").read_text())
    assert "no model weights" in run_cli(cli_args(no_weights, mistral_expanded_tokenizer, tmp_path / "m"), capsys)
    swapped = reordered_mistral_tokenizer(mistral_sp_model, tmp_path / "swapped")
    err = run_cli(cli_args(sharded_llama, swapped, tmp_path / "m"), capsys)
    assert f"{swapped}: not an expansion of the source tokenizer" in err and "2 source piece(s) changed id" in err
    existing = tmp_path / "existing"
    existing.mkdir()
    assert "already exists (pass --overwrite" in run_cli(cli_args(sharded_llama, mistral_expanded_tokenizer, existing),
                                                         capsys)
    assert not (tmp_path / "m").exists()
    assert main(cli_args(sharded_llama, mistral_expanded_tokenizer, existing, "--overwrite")) == 0
    assert AutoModelForCausalLM.from_pretrained(existing).config.vocab_size == len(
        AutoTokenizer.from_pretrained(mistral_expanded_tokenizer))


def test_a_failure_while_writing_leaves_the_previous_target_untouched(sharded_llama, mistral_expanded_tokenizer,
                                                                      tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("previous model")

    def fail(*args, **kwargs):
        raise UserInputError("simulated failure while writing the embeddings")

    monkeypatch.setattr(init_model_module, "resize_vocab_matrix", fail)
    with pytest.raises(UserInputError, match="simulated failure"):
        init_model_from_expanded_tokenizer(sharded_llama, mistral_expanded_tokenizer, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no temporary folder is left behind"
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_report_json_and_a_file_as_target_are_checked_before_any_work(sharded_llama, mistral_expanded_tokenizer,
                                                                      tmp_path, capsys):
    target = tmp_path / "model"
    assert f"--report_json {tmp_path}: is a folder" in run_cli(
        cli_args(sharded_llama, mistral_expanded_tokenizer, target, "--report_json", str(tmp_path)), capsys)
    report = tmp_path / "report.json"
    report.write_text("the user's notes")
    assert f"--report_json {report}: already exists (pass --overwrite" in run_cli(
        cli_args(sharded_llama, mistral_expanded_tokenizer, target, "--report_json", str(report)), capsys)
    assert not target.exists() and report.read_text() == "the user's notes"
    a_file = tmp_path / "afile"
    a_file.write_text("not a model")
    assert f"{a_file}: target model path exists and is not a directory" in run_cli(
        cli_args(sharded_llama, mistral_expanded_tokenizer, a_file, "--overwrite"), capsys)
    assert a_file.read_text() == "not a model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "report.json"], "no junk left beside them"
    assert main(cli_args(sharded_llama, mistral_expanded_tokenizer, target, "--overwrite",
                         "--report_json", str(report))) == 0
    assert json.loads(report.read_text())["source_tokenizer_size"] == 32000


def test_a_target_that_contains_an_input_is_refused_even_with_overwrite(sharded_llama, mistral_expanded_tokenizer,
                                                                        tmp_path, capsys):
    import shutil

    parent = tmp_path / "work"
    source, tokenizer = parent / "models" / "source", parent / "tokenizer"
    shutil.copytree(sharded_llama, source)
    shutil.copytree(mistral_expanded_tokenizer, tokenizer)
    err = run_cli(cli_args(source, mistral_expanded_tokenizer, parent, "--overwrite"), capsys)
    assert f"{parent}: target model path is or contains the source model ({source})" in err
    err = run_cli(cli_args(sharded_llama, tokenizer, parent / ".", "--overwrite"), capsys)
    assert "target model path is or contains the target tokenizer" in err
    assert (source / "config.json").is_file() and (tokenizer / "tokenizer.model").is_file()


@pytest.fixture(scope="module")
def padded_llama(mistral_sp_model, tmp_path_factory):
    """A LLaMA whose matrices have 64 padding rows past its 32000 tokens (as models padded for tensor parallelism)."""
    return _save_tied_llama(tmp_path_factory.mktemp("padded") / "source", mistral_sp_model, rows=32064, hidden=16,
                            seed=0, safetensors=True)


def test_new_tokens_inside_padding_rows_still_count_as_an_expansion_for_lora(padded_llama, mistral_sp_model,
                                                                             data_dir, tmp_path):
    from colossal_llama.training.lora import vocabulary_was_expanded

    tokenizer = tmp_path / "tokenizer"
    expand_tokenizer(mistral_sp_model.parent, tokenizer, jieba_words(data_dir, 8), report_max_chars=2000)
    tokens = len(AutoTokenizer.from_pretrained(tokenizer))
    assert 32000 < tokens <= 32064, "the new tokens must fit in the padding rows"
    report = init_model_from_expanded_tokenizer(padded_llama, tokenizer, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert report.new_vocab_size == config["vocab_size"] == 32064, "no row was added"
    assert config["colossal_llama_base_tokenizer_size"] == 32000
    assert vocabulary_was_expanded(tmp_path / "model") and not vocabulary_was_expanded(padded_llama)
    # a model written by an earlier version recorded rows: still read
    old_style = tmp_path / "old_style"
    old_style.mkdir()
    (old_style / "config.json").write_text(json.dumps({"vocab_size": 32256, "colossal_llama_base_vocab_size": 32000}))
    assert vocabulary_was_expanded(old_style)


def test_mean_of_all_rows_is_summed_in_chunks_of_rows(monkeypatch):
    torch.manual_seed(0)
    matrix = torch.randn(1000, 8).to(torch.bfloat16)
    whole = init_model_module.mean_of_all_rows(matrix)
    monkeypatch.setattr(init_model_module, "GATHER_CHUNK_BYTES", 8 * 4 * 7)  # 7 rows per chunk, a ragged last one
    chunked = init_model_module.mean_of_all_rows(matrix)
    assert chunked.dtype == torch.bfloat16 and torch.equal(chunked, whole)
    assert torch.allclose(chunked.float(), matrix.double().mean(dim=0).float(), atol=1e-2)


def test_padding_rows_the_new_tokens_leave_are_kept_and_added_padding_is_the_mean_of_real_rows(
        padded_llama, mistral_sp_model, data_dir, tmp_path):
    """New tokens that land on a source's padding rows get the mean of their pieces; the source's other padding rows
    are kept as they were; rows added by ``--pad_vocab_to_multiple_of`` get the mean of the real token rows (not of
    the padding rows) and are the only rows the report counts as padding. A second expansion of the result keeps the
    first expansion's base tokenizer size in config.json (LoRA's ``--lora_train_embeddings auto`` reads it)."""
    tokenizer = tmp_path / "tokenizer"
    expand_tokenizer(mistral_sp_model.parent, tokenizer, jieba_words(data_dir, 8), report_max_chars=2000)
    target_tok = AutoTokenizer.from_pretrained(tokenizer)
    tokens = len(target_tok)
    report = init_model_from_expanded_tokenizer(padded_llama, tokenizer, tmp_path / "model",
                                                pad_vocab_to_multiple_of=128)
    assert (report.new_vocab_size, report.new_rows, report.padding_rows) == (32128, tokens - 32000, 64)
    old = load_all(padded_llama)["model.embed_tokens.weight"]
    new = load_all(tmp_path / "model")["model.embed_tokens.weight"]
    assert new.shape == (32128, 16) and old.dtype == torch.float32
    assert torch.equal(new[:32000], old[:32000]) and torch.equal(new[tokens:32064], old[tokens:32064])
    for token_id in range(32000, tokens):
        piece = target_tok.convert_ids_to_tokens(token_id)
        ids = sentencepiece_mid_text_ids(mistral_sp_model, piece.replace("\u2581", " "))
        assert ids and torch.equal(new[token_id], expected_mean(old, ids)), piece
    real_mean, all_rows_mean = old[:32000].double().mean(dim=0), old.double().mean(dim=0)
    assert (real_mean - all_rows_mean).abs().max() > 1e-7  # the padding rows would show
    for row in new[32064:]:
        torch.testing.assert_close(row.double(), real_mean, rtol=0, atol=1e-9)

    again = tmp_path / "tokenizer2"
    expand_tokenizer(tokenizer, again, jieba_words(data_dir, 12), report_max_chars=2000)
    assert len(AutoTokenizer.from_pretrained(again)) > tokens
    init_model_from_expanded_tokenizer(tmp_path / "model", again, tmp_path / "model2")
    config = json.loads((tmp_path / "model2" / "config.json").read_text())
    assert config["colossal_llama_base_tokenizer_size"] == 32000


def test_added_tokens_of_a_sentencepiece_source_are_split_as_in_mid_sentence(sharded_llama, mistral_sp_model,
                                                                            data_dir, tmp_path):
    """A token added with ``tokenizer.add_tokens`` holds raw text: its rows are the mean of the pieces sentencepiece
    gives that text in mid-sentence (no dummy-prefix piece '▁' in front; a space inside is '▁')."""
    tok = AutoTokenizer.from_pretrained(sharded_llama)
    vocab = tok.get_vocab()
    words = [w for w in jieba_words(data_dir, 40) if w not in vocab][:3] + ["深度 学习"]  # none a Mistral piece
    assert tok.add_tokens(words) == 4
    tok.save_pretrained(str(tmp_path / "tokenizer"))
    report = init_model_from_expanded_tokenizer(sharded_llama, tmp_path / "tokenizer", tmp_path / "model")
    assert report.new_rows == len(words)
    old, new = load_all(sharded_llama), load_all(tmp_path / "model")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        for i, word in enumerate(words):
            ids = sentencepiece_mid_text_ids(mistral_sp_model, word)
            assert torch.equal(new[name][32000 + i], expected_mean(old[name], ids)), (name, word, ids)
