"""Inference: flag parsing, prompt building with the model's chat template, streaming == blocking generation,
multi-turn chat with whole-turn history trimming, and the CLI end to end on the real SmolLM2-135M."""
from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colossal_llama.eval.cli import main as evaluate_main
from colossal_llama.eval.web.server import ChatBackend
from colossal_llama.eval.web.server import build_parser as web_parser
from colossal_llama.inference.chat import ChatSession, drop_empty_exchanges
from colossal_llama.inference.cli import main as cli_main
from colossal_llama.inference.cli import parse_args, sampling_from_args
from colossal_llama.inference.reply_file import Prompts
from colossal_llama.inference.generation import SamplingConfig, generate_ids, generate_stream, generate_text
from colossal_llama.inference.loading import load_model_and_tokenizer
from colossal_llama.inference.placement import parse_device, resolve_device
from colossal_llama.inference.prompting import CHAT_CONFIG_FILE, resolve_chat_template, sft_prompt_ids
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.utils.cli import str2bool
from colossal_llama.utils.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
GREEDY = SamplingConfig(max_new_tokens=12, do_sample=False)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model_and_tokenizer(smollm2_dir, device="cpu")


def model_copy(src: Path, dst: Path) -> Path:
    """A model folder with the same files (symlinked), to which a test can add colossal_llama_chat.json."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    return dst


# --- flags ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("word,value", [("True", True), ("False", False), ("1", True), ("0", False),
                                        ("yes", True), ("NO", False), ("false", False)])
def test_str2bool_parses_words(word, value):
    assert str2bool(word) is value


def test_do_sample_false_means_false_and_a_bad_boolean_is_a_one_line_error():
    base = ["--model_path", "m", "--input_txt", "hi"]
    assert parse_args(base).do_sample is True  # README default
    assert parse_args(base + ["--do_sample", "False"]).do_sample is False
    assert parse_args(base + ["--chat"]).chat is True
    args = parse_args(base)
    assert (args.max_new_tokens, args.temperature, args.top_k, args.top_p) == (512, 0.3, 50, 0.95)
    with pytest.raises(UserInputError, match="argument --do_sample: expected a boolean"):  # one line, exit 2
        parse_args(base + ["--do_sample", "maybe"])
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("2")


def test_sampling_config_rejects_impossible_values():
    with pytest.raises(UserInputError, match="--temperature"):
        SamplingConfig(do_sample=True, temperature=0).validate()
    with pytest.raises(UserInputError, match="--top_p"):
        SamplingConfig(top_p=1.5).validate()
    SamplingConfig(do_sample=False, temperature=0).validate()  # greedy ignores temperature


def test_device_auto_picks_what_exists():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="no CUDA"):
            resolve_device("cuda")


@pytest.mark.parametrize("text,device", [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda:0"),
                                         ("CUDA:3", "cuda:3"), (" cuda:12 ", "cuda:12")])
def test_device_flag_accepts_indexed_cuda_devices(text, device):
    assert parse_device(text) == device
    assert parse_args(["--model_path", "m", "--device", text]).device == device


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "cuda0", "cuda:-1", "cpu:0", ""])
def test_device_flag_rejects_other_spellings_in_one_line(bad):
    with pytest.raises(UserInputError) as exc:
        parse_args(["--model_path", "m", "--device", bad])
    assert f"argument --device: expected auto, cpu, cuda or cuda:N, got {bad!r}" in str(exc.value)


def test_a_cuda_device_this_machine_lacks_is_one_line_before_anything_loads(tmp_path, capsys):
    """--device cuda:N is checked before the tokenizer or model is read (the model path here does not exist)."""
    missing = "cuda:0" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    why = ("no CUDA device is available (use --device cpu or auto)" if not torch.cuda.is_available()
           else f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    data = tmp_path / "held_out.jsonl"
    data.write_text('{"target": "text"}\n', encoding="utf-8")
    for main, argv in ((cli_main, ["--model_path", str(tmp_path / "no_model"), "--input_txt", "hi"]),
                       (evaluate_main, ["bpc", "--model_path", str(tmp_path / "no_model"), "--data", str(data)])):
        with pytest.raises(SystemExit) as exc:
            main(argv + ["--device", missing])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --device {missing}: {why}") and err.count("\n") == 1


def test_repetition_penalty_flag_is_shared_by_generation_and_web_chat_and_validated():
    base = ["--model_path", "m", "--input_txt", "hi"]
    assert sampling_from_args(parse_args(base)).repetition_penalty == 1.0
    assert sampling_from_args(parse_args(base + ["--repetition_penalty", "1.3"])).repetition_penalty == 1.3
    web = web_parser().parse_args(["--model_path", "m", "--repetition_penalty", "1.2", "--device", "cuda:1"])
    assert (sampling_from_args(web).repetition_penalty, web.device) == (1.2, "cuda:1")
    for bad in ("0", "-1"):
        with pytest.raises(UserInputError, match="--repetition_penalty: must be > 0"):
            sampling_from_args(parse_args(base + ["--repetition_penalty", bad]))


def test_input_txt_is_a_file_of_prompts_or_a_literal_prompt(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("First question?\n\n  Second one  \n", encoding="utf-8")
    prompts = Prompts.read(str(f))
    assert (prompts.count, list(prompts)) == (2, ["First question?", "Second one"])
    assert list(prompts.chunks(1)) == [(0, ["First question?"]), (1, ["Second one"])]  # read as the job goes
    assert list(Prompts.read("Tell me about Paris")) == ["Tell me about Paris"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UserInputError, match="holds no prompt"):
        Prompts.read(str(tmp_path / "empty.txt"))
    f.write_bytes("First\n\nthird ok\n".encode() + b"\xff bad\n")
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(f))}:4: not valid UTF-8"):
        Prompts.read(str(f))  # the whole file is checked before any model loads


# --- chat template choice -----------------------------------------------------------------------------

def test_sft_prompt_uses_the_tokenizer_chat_template_when_the_model_has_none(smollm2, smollm2_dir):
    _, tok = smollm2
    template = resolve_chat_template(smollm2_dir, tok)
    assert template.name == "tokenizer"
    text = tok.decode(sft_prompt_ids(template, "Hello there"))
    assert text.endswith("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") in template.stop_token_ids


def test_saved_chat_config_wins_over_the_flag_and_system_message_flag_overrides_it(smollm2, smollm2_dir, tmp_path):
    _, tok = smollm2
    model_dir = model_copy(smollm2_dir, tmp_path / "model")
    (model_dir / CHAT_CONFIG_FILE).write_text(json.dumps({"name": "llama3", "system_message": "Be brief."}))
    template = resolve_chat_template(model_dir, tok, chat_template="llama2")
    assert (template.name, template.system_message) == ("llama3", "Be brief.")
    assert "Be brief." in tok.decode(sft_prompt_ids(template, "Hi"))
    assert resolve_chat_template(model_dir, tok, system_message="Be verbose.").system_message == "Be verbose."
    assert resolve_chat_template(model_dir, tok, system_message="").system_message is None  # "": none at all
    (model_dir / CHAT_CONFIG_FILE).write_text(json.dumps({"name": "chatml", "system_message": None}))
    with pytest.raises(UserInputError, match=f"^{model_dir / CHAT_CONFIG_FILE}: name: expected one of llama2, "
                                             "llama3, tokenizer, got"):  # the file is wrong, not the flag
        resolve_chat_template(model_dir, tok, chat_template="llama2")
    (model_dir / CHAT_CONFIG_FILE).write_text("{not json")
    with pytest.raises(UserInputError, match=CHAT_CONFIG_FILE):
        resolve_chat_template(model_dir, tok)


# --- generation ---------------------------------------------------------------------------------------

def test_streamed_pieces_concatenate_to_the_blocking_greedy_text(smollm2, smollm2_dir):
    model, tok = smollm2
    ids = tok("The capital of France is")["input_ids"]
    pieces = list(generate_stream(model, tok, ids, GREEDY))
    assert len(pieces) > 1, "streaming must deliver the reply in several pieces"
    assert "".join(pieces) == generate_text(model, tok, ids, GREEDY)
    assert "Paris" in "".join(pieces)


def test_sampling_follows_the_torch_seed(smollm2):
    model, tok = smollm2
    ids = tok("Once upon a time")["input_ids"]
    config = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, top_p=1.0)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(generate_text(model, tok, ids, config))
    assert runs[0] == runs[1] and runs[0] != runs[2], runs


def test_generation_stops_at_the_template_end_of_turn(smollm2, smollm2_dir):
    model, tok = smollm2
    template = resolve_chat_template(smollm2_dir, tok)
    config = SamplingConfig(max_new_tokens=64, do_sample=False, stop_token_ids=template.stop_token_ids)
    new = generate_ids(model, tok, sft_prompt_ids(template, "What is the capital of France?"), config)
    assert new[-1] in template.stop_token_ids and len(new) < 64
    assert template.stop_token_ids[0] not in new[:-1]


@pytest.fixture(scope="module")
def smollm2_eos_is_not_end_of_turn(smollm2_dir, tmp_path_factory):
    """The real SmolLM2-135M-Instruct with its tokenizer's EOS set to ``<|endoftext|>`` (id 0), as base SmolLM2
    ships it: the ChatML end of turn ``<|im_end|>`` (id 2) is then a template stop id that is *not* EOS."""
    folder = tmp_path_factory.mktemp("eos_differs") / "model"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (folder / name).symlink_to(smollm2_dir / name)
    tok = load_tokenizer(smollm2_dir)
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(str(folder))
    model, tok = load_model_and_tokenizer(folder, device="cpu")
    template = resolve_chat_template(folder, tok)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == 0 and end_of_turn == 2 and end_of_turn in template.stop_token_ids
    return folder, model, tok, template


def test_generation_stops_at_a_template_stop_id_that_is_not_eos(smollm2_eos_is_not_end_of_turn, capsys):
    """Library, terminal chat, CLI and web chat all stop at ``<|im_end|>`` although EOS is another token."""
    folder, model, tok, template = smollm2_eos_is_not_end_of_turn
    question, limit, end_of_turn = "What is the capital of France?", 20, tok.convert_tokens_to_ids("<|im_end|>")
    prompt = sft_prompt_ids(template, question)
    # without the template's stop ids the model runs on past the end of its turn: the check below has teeth
    runaway = generate_ids(model, tok, prompt, SamplingConfig(max_new_tokens=limit, do_sample=False))
    assert len(runaway) == limit and end_of_turn in runaway[:-1]

    stopped = generate_ids(model, tok, prompt, SamplingConfig(limit, False, stop_token_ids=template.stop_token_ids))
    assert stopped[-1] == end_of_turn and stopped == runaway[: runaway.index(end_of_turn) + 1]
    reply = tok.decode(stopped, skip_special_tokens=True)
    assert reply == "The capital of France is Paris."

    session = ChatSession(model, tok, template, SamplingConfig(max_new_tokens=limit, do_sample=False))
    assert session.reply(question) == reply
    backend = ChatBackend(model, tok, template, SamplingConfig(max_new_tokens=limit, do_sample=False))
    ids, _ = backend.prompt_ids([{"from": "human", "content": question}])
    assert "".join(backend.stream(ids)) == reply
    cli_main(["--model_path", str(folder), "--input_txt", question, "--do_sample", "False",
              "--max_new_tokens", str(limit), "--device", "cpu"])
    assert capsys.readouterr().out == f">>> {question}\n{reply}\n"


def test_repetition_penalty_reaches_generation(smollm2, smollm2_dir, capsys):
    """Greedy decoding with the flag equals transformers' own penalised decoding, and differs from no penalty
    on a prompt the model would otherwise repeat."""
    model, tok = smollm2
    prompt = "The cat sat on the mat. The cat sat on the mat. The cat"
    ids = tok(prompt)["input_ids"]
    plain = generate_text(model, tok, ids, SamplingConfig(max_new_tokens=16, do_sample=False))
    penalised = generate_text(model, tok, ids, SamplingConfig(max_new_tokens=16, do_sample=False, repetition_penalty=1.3))
    assert plain.startswith(" sat on the mat.") and penalised != plain
    with torch.inference_mode():
        reference = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=16, do_sample=False, repetition_penalty=1.3,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert penalised == tok.decode(reference[0, len(ids):], skip_special_tokens=True)
    cli_main(["--model_path", str(smollm2_dir), "--prompt_style", "pretrained", "--input_txt", prompt,
              "--do_sample", "False", "--max_new_tokens", "16", "--repetition_penalty", "1.3", "--device", "cpu"])
    assert capsys.readouterr().out == f">>> {prompt}\n{penalised}\n"


def test_a_failure_inside_generate_is_raised_not_hung(smollm2):
    model, tok = smollm2
    bad_ids = [model.config.vocab_size + 10]  # out of the embedding's range
    with pytest.raises(IndexError):
        list(generate_stream(model, tok, bad_ids, GREEDY, timeout_s=60))


def test_closing_the_stream_stops_the_real_generate_at_its_next_token(smollm2):
    """transformers' generate honours the stream's stop (a Ctrl-C, a closed web page): it does not run on to
    max_new_tokens for nobody."""
    model, tok = smollm2
    steps = []
    hook = model.register_forward_hook(lambda *_: steps.append(1))
    try:
        stream = generate_stream(model, tok, tok("Once upon a time")["input_ids"],
                                 SamplingConfig(max_new_tokens=400, do_sample=False))
        next(stream)
        stream.close()
        assert len(steps) < 20, f"{len(steps)} forward passes after the reader left"
    finally:
        hook.remove()


# --- chat session -------------------------------------------------------------------------------------

def test_chat_session_keeps_history_across_turns(smollm2, smollm2_dir):
    model, tok = smollm2
    template = resolve_chat_template(smollm2_dir, tok)
    session = ChatSession(model, tok, template, GREEDY)
    first = session.reply("What is the capital of France?")
    session.add_user("And of Italy?")
    prompt = session.prompt_ids()
    assert tok.decode(prompt).count("<|im_start|>assistant") == 2, "turn 2's prompt holds turn 1"
    second = "".join(session.stream_reply())
    assert [m["from"] for m in session.history] == ["human", "assistant"] * 2
    assert session.history[1]["content"] == first and session.history[3]["content"] == second
    assert second == generate_text(model, tok, prompt, session.sampling)


def test_history_is_trimmed_by_whole_exchanges_when_the_context_is_full(smollm2, smollm2_dir):
    model, tok = smollm2
    template = resolve_chat_template(smollm2_dir, tok)
    session = ChatSession(model, tok, template, SamplingConfig(max_new_tokens=4, do_sample=False), max_context=0)
    history = [{"from": "human", "content": f"Question number {i}: name a colour."} if k == 0 else
               {"from": "assistant", "content": f"Answer number {i}: blue."} for i in range(4) for k in range(2)]
    one_exchange = len(template.encode_prompt(history[-2:] + [{"from": "human", "content": "Last one?"}]))
    session.max_context = one_exchange + 4  # room for the last exchange + the new question only
    session.history = list(history)
    session.add_user("Last one?")
    session.prompt_ids()
    assert session.dropped_exchanges == 3
    assert session.history[0]["content"].startswith("Question number 3")
    session.max_context = 10
    with pytest.raises(UserInputError, match="fit in the context"):
        session.prompt_ids()


def test_empty_replies_are_dropped_with_their_question():
    msgs = [{"from": "human", "content": "a"}, {"from": "assistant", "content": "  "},
            {"from": "human", "content": "b"}, {"from": "assistant", "content": "ok"}, {"from": "human", "content": "c"}]
    kept, dropped = drop_empty_exchanges(msgs)
    assert dropped == 1 and [m["content"] for m in kept] == ["b", "ok", "c"]


# --- CLI ----------------------------------------------------------------------------------------------

def test_cli_chat_repl_answers_each_line(smollm2, smollm2_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\nAnd of Spain?\n\n"))
    cli_main(["--model_path", str(smollm2_dir), "--chat", "--do_sample", "False", "--max_new_tokens", "16",
              "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 2 and "Paris" in out
    assert "2 exchange(s) kept, 0 dropped" in out


def test_inference_example_script_greedy_matches_the_library(smollm2, smollm2_dir):
    model, tok = smollm2
    prompt = "Name three primary colours."
    proc = subprocess.run(
        [sys.executable, str(REPO / "inference_example.py"), "--model_path", str(smollm2_dir), "--input_txt", prompt,
         "--do_sample", "False", "--max_new_tokens", "16", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    template = resolve_chat_template(smollm2_dir, tok)
    expected = generate_text(model, tok, sft_prompt_ids(template, prompt),
                             SamplingConfig(16, False, stop_token_ids=template.stop_token_ids))
    assert proc.stdout == f">>> {prompt}\n{expected}\n"


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["--model_path", str(tmp_path / "missing"), "--input_txt", "hi", "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing" in err and "\n" not in err
    with pytest.raises(SystemExit):
        cli_main(["--model_path", str(tmp_path), "--device", "cpu"])
    assert "nothing to do" in capsys.readouterr().err


# --- SFT review fixes ---------------------------------------------------------------------------------

def test_a_chat_template_flag_the_saved_template_overrides_is_said_naming_both(smollm2, smollm2_dir, tmp_path, caplog):
    """--chat_template llama2 on a model trained with llama3 was silently ignored: the user believed they chose the
    template. The model's own wins, as before, and the flag is said to be ignored; a flag that agrees says nothing."""
    _, tok = smollm2
    model_dir = model_copy(smollm2_dir, tmp_path / "model")
    (model_dir / CHAT_CONFIG_FILE).write_text(json.dumps({"name": "llama3", "system_message": None}))

    def warnings(flag):
        caplog.clear()
        with caplog.at_level("WARNING", logger="colossal_llama.inference.prompting"):
            assert resolve_chat_template(model_dir, tok, chat_template=flag).name == "llama3"
        return [r.getMessage() for r in caplog.records if r.name == "colossal_llama.inference.prompting"]

    assert warnings("llama2") == [f"--chat_template llama2 is ignored: {model_dir / CHAT_CONFIG_FILE} says the model "
                                  "was trained with the chat template llama3"]
    assert warnings("llama3") == [] and warnings(None) == []
