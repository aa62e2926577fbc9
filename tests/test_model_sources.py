"""Where base models come from: the real SmolLM2 GGUF exported to HF, or a LLaMA built from a config."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from colossal_llama.model.from_config import main as from_config_main
from colossal_llama.model.gguf_export import main as gguf_export_main


def test_gguf_export_gives_upstream_special_tokens_and_lossless_byte_level_roundtrip(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    text = "The weather in 北京 is 晴朗 today; 价格 ¥128."
    ids = tok(text).input_ids
    assert ids[0] != tok.bos_token_id, "byte-level BPE models add no BOS of their own"
    assert tok.decode(ids) == text


def test_gguf_export_model_answers_a_real_question(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt.shape[1] :])


def test_gguf_export_refuses_existing_target(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        gguf_export_main(["--gguf_file", str(tmp_path / "missing.gguf"), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err


def test_llama_from_config_matches_the_real_tokenizer(tmp_path, mistral_sp_model):
    out = tmp_path / "tiny"
    assert from_config_main(["--tokenizer_dir", str(mistral_sp_model.parent), "--output_dir", str(out), "--shape", "tiny"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok) == 32000
    assert (model.config.bos_token_id, model.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.tokenize("你好") == ["▁", "你", "好"]


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete_and_never_takes_an_input(
        tmp_path, capsys, mistral_sp_model):
    import shutil

    def one_line(main, argv) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        return err

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous model")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    assert f"{bad}: cannot load this GGUF model" in one_line(
        gguf_export_main, ["--gguf_file", str(bad), "--output_dir", str(out), "--overwrite"])
    assert [p.name for p in tmp_path.iterdir() if p.name != "bad.gguf"] == ["out"]
    assert (out / "keep.txt").read_text() == "previous model"
    inside = out / "model.gguf"
    shutil.copy(bad, inside)
    assert f"{out}: output folder is or contains an input ({inside})" in one_line(
        gguf_export_main, ["--gguf_file", str(inside), "--output_dir", str(out), "--overwrite"])
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(mistral_sp_model.parent, tokenizer)
    for target in (tokenizer, tmp_path):
        assert f"{target}: output folder is or contains an input ({tokenizer})" in one_line(
            from_config_main, ["--tokenizer_dir", str(tokenizer), "--output_dir", str(target), "--overwrite"])
    assert (tokenizer / "tokenizer.model").read_bytes() == mistral_sp_model.read_bytes()
    assert from_config_main(["--tokenizer_dir", str(tokenizer), "--output_dir", str(out), "--shape", "tiny",
                             "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "out", "tokenizer"]
