"""Batched generation for a file of prompts (``inference_example.py --batch_size N [--output F.jsonl]``), on the
real SmolLM2-135M-Instruct: a batch gives every prompt the greedy reply it gets alone (left pads masked, and not
counted by the repetition penalty), and the reply file is written in the prompts' order, never over an old one."""
from __future__ import annotations

import json
import re

import pytest
import torch

from colossal_llama.inference.cli import main as cli_main
from colossal_llama.inference.generation import SamplingConfig, cut_at_stop, generate_batch, generate_ids
from colossal_llama.inference.loading import load_model_and_tokenizer
from colossal_llama.inference.prompting import resolve_chat_template, sft_prompt_ids
from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.ranks import Ranks

QUESTIONS = ["What is the capital of France?", "Hi", "Write one sentence about the sea, the wind and the sails "
             "of the old ships that crossed it long ago.", "2+2?"]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model, tokenizer = load_model_and_tokenizer(smollm2_dir, device="cpu")
    return model, tokenizer, resolve_chat_template(smollm2_dir, tokenizer)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_a_batch_gives_each_prompt_its_greedy_reply_alone(smollm2, penalty):
    model, tokenizer, template = smollm2
    config = SamplingConfig(max_new_tokens=24, do_sample=False, repetition_penalty=penalty,
                            stop_token_ids=list(template.stop_token_ids))
    prompts = [sft_prompt_ids(template, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # every row padded differently
    stop_ids = [*template.stop_token_ids, tokenizer.eos_token_id]
    alone = [cut_at_stop(generate_ids(model, tokenizer, p, config), stop_ids) for p in prompts]
    if penalty == 1.0:  # (the penalty keeps every reply from its end of turn: the prompt holds <|im_end|>)
        assert any(len(r) < 24 for r in alone) and any(len(r) == 24 for r in alone)  # some stop early, some run on
    assert generate_batch(model, tokenizer, prompts, config) == alone


def test_the_repetition_penalty_counts_a_rows_real_tokens_not_its_left_pads():
    """transformers' processor penalises every id of a row, pads included: with pad = EOS a padded prompt would be
    pushed away from stopping. Ours penalises the tokens after each row's pads, each once."""
    from colossal_llama.inference.generation import RepetitionPenaltyPastPads

    pad = 0
    input_ids = torch.tensor([[pad, pad, 5, 6, 5], [7, 5, 6, 8, 1]])
    scores = torch.tensor([[4.0, 2.0, -2.0, 1.0, 1.0, 3.0, -3.0, 2.0, 6.0]]).repeat(2, 1)
    out = RepetitionPenaltyPastPads(2.0, torch.tensor([2, 0]))(input_ids, scores.clone())
    expected = scores.clone()
    for row, seen in ((0, {5, 6}), (1, {7, 5, 6, 8, 1})):
        for token in seen:
            value = scores[row, token]
            expected[row, token] = value * 2.0 if value < 0 else value / 2.0
    assert torch.equal(out, expected) and out[0, pad] == 4.0  # the pad id of row 0 is not a seen token


def test_the_repetition_penalty_of_an_unpadded_prompt_is_transformers_own(smollm2):
    """Our penalty (which skips left pads) equals ``generate(repetition_penalty=...)`` where there is no pad."""
    model, tokenizer, _ = smollm2
    ids = tokenizer("The cat sat on the mat. The cat sat on the")["input_ids"]
    ours = generate_ids(model, tokenizer, ids, SamplingConfig(max_new_tokens=20, do_sample=False,
                                                              repetition_penalty=1.5))
    tensor = torch.tensor([ids])
    with torch.inference_mode():
        theirs = model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=20,
                                do_sample=False, repetition_penalty=1.5, temperature=None, top_k=None, top_p=None,
                                pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    plain = generate_ids(model, tokenizer, ids, SamplingConfig(max_new_tokens=20, do_sample=False))
    assert ours == theirs[0, len(ids):].tolist() and ours != plain  # the penalty changed the reply


def test_prompt_file_in_batches_prints_what_one_at_a_time_prints(smollm2_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(QUESTIONS) + "\n", encoding="utf-8")
    base = ["--model_path", str(smollm2_dir), "--input_txt", str(prompts), "--do_sample", "False",
            "--max_new_tokens", "16", "--device", "cpu"]
    outputs = []
    for batch_size in ("1", "3"):
        cli_main(base + ["--batch_size", batch_size])
        outputs.append(capsys.readouterr().out)
    assert outputs[0].count(">>> ") == len(QUESTIONS) and outputs[1] == outputs[0]

    replies = tmp_path / "out" / "replies.jsonl"
    cli_main(base + ["--batch_size", "3", "--output", str(replies)])
    summary = capsys.readouterr().out
    assert summary.startswith(f"wrote {len(QUESTIONS)} replies (") and str(replies) in summary
    rows = [json.loads(line) for line in replies.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == QUESTIONS  # the prompts' order, though batched longest first
    assert "".join(f">>> {r['prompt']}\n{r['response']}\n" for r in rows) == outputs[0]
    assert [p.name for p in replies.parent.iterdir()] == ["replies.jsonl"]  # no partial file left


def test_an_existing_reply_file_or_a_bad_batch_size_stops_before_the_model_loads(tmp_path, capsys):
    replies = tmp_path / "replies.jsonl"
    replies.write_text("earlier work\n", encoding="utf-8")
    base = ["--model_path", str(tmp_path / "no_model"), "--input_txt", "hi"]
    for extra, message in ((["--output", str(replies)], f"error: --output {replies}: already exists (pass "
                                                        "--overwrite to replace it)"),
                           (["--batch_size", "0"], "error: --batch_size 0: must be >= 1"),
                           (["--chat", "--batch_size", "4"], "error: --output and --batch_size are for --input_txt")):
        with pytest.raises(SystemExit) as exc:
            cli_main(base + extra)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert replies.read_text(encoding="utf-8") == "earlier work\n"


def test_resuming_a_reply_file_with_another_model_or_sampling_is_refused_before_the_model_loads(tmp_path,
                                                                                                 capsys):
    """An interrupted job's settings are recorded beside its partial output: a rerun with another --model_path (or
    sampling flag) would write one file with the replies of two models, so it stops; --overwrite starts afresh."""
    from colossal_llama.inference.reply_file import Prompts, partial_file, prepare, settings_file

    prompts_file, target = tmp_path / "prompts.txt", tmp_path / "replies.jsonl"
    prompts_file.write_text("Hi\nBye\n", encoding="utf-8")
    prompts = Prompts.read(str(prompts_file))
    first = {"model_path": str(tmp_path / "model_a"), "temperature": 0.3}
    prepare(target, prompts, overwrite=False, ranks=Ranks(), settings=first)  # the job starts ...
    partial_file(target).write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n", encoding="utf-8")
    assert prepare(target, prompts, False, Ranks(), dict(first)).written == 1  # ... and resumes with its settings
    for key, value in (("model_path", str(tmp_path / "model_b")), ("temperature", 0.9)):
        with pytest.raises(UserInputError, match=rf"^{re.escape(str(settings_file(target)))}: the interrupted run "
                                                 rf"used --{key} .*pass --overwrite to start afresh"):
            prepare(target, prompts, False, Ranks(), {**first, key: value})

    base = ["--input_txt", str(prompts_file), "--output", str(target), "--device", "cpu", "--do_sample", "False"]
    with pytest.raises(SystemExit) as exc:  # the CLI: before the (here missing) model loads
        cli_main(["--model_path", str(tmp_path / "model_b"), *base])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "the interrupted run used --model_path" in err and err.count("\n") == 1, err
    settings_file(target).unlink()  # a partial output without its settings (an older version's): refused too
    with pytest.raises(UserInputError, match="not its settings"):
        prepare(target, prompts, False, Ranks(), first)
    prepare(target, prompts, True, Ranks(), {**first, "temperature": 0.9})  # --overwrite: afresh, new settings
    assert not partial_file(target).exists()
    assert json.loads(settings_file(target).read_text(encoding="utf-8"))["temperature"] == 0.9


def test_a_prompt_longer_than_the_model_context_stops_before_the_model_loads(smollm2_dir, tmp_path, capsys):
    """A model folder of 64 positions (its config.json; no weights: loading them would fail): a prompt that
    with --max_new_tokens does not fit is a one-line error naming its line."""
    model = tmp_path / "model"
    model.mkdir()
    config = json.loads((smollm2_dir / "config.json").read_text(encoding="utf-8"))
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}), encoding="utf-8")
    for name in smollm2_dir.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens")):
            (model / name.name).symlink_to(name)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n\n" + " ".join(["word"] * 60) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        cli_main(["--model_path", str(model), "--input_txt", str(prompts), "--max_new_tokens", "16",
                  "--device", "cpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert re.match(rf"error: {re.escape(str(prompts))}:3: the prompt is \d+ tokens; with --max_new_tokens 16 "
                    r"that is more than the model's 64 positions", err), err


@pytest.mark.slow
@pytest.mark.multiprocess
def test_under_torchrun_the_batches_are_dealt_out_and_rank_0_writes_what_one_process_writes(smollm2_dir, tmp_path):
    """5 prompts in batches of 2 over 2 processes: batches 0 and 2 on rank 0, batch 1 on rank 1; the reply file and
    the printed replies are one process's, byte for byte."""
    import subprocess
    import sys

    from tests.support.launch import REPO, torchrun_command, worker_env

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([*QUESTIONS, "Name a colour."]) + "\n", encoding="utf-8")
    args = ["--model_path", str(smollm2_dir), "--input_txt", str(prompts), "--do_sample", "False",
            "--max_new_tokens", "12", "--device", "cpu", "--batch_size", "2"]
    entry = REPO / "inference_example.py"
    runs = {}
    for name, command in (("one", [sys.executable, str(entry)]), ("two", torchrun_command([], nproc=2, entry=entry))):
        for output in ([], ["--output", str(tmp_path / f"{name}.jsonl")]):
            proc = subprocess.run([*command, *args, *output], capture_output=True, text=True, cwd=REPO,
                                  env=worker_env(), timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[name, bool(output)] = proc.stdout
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert not list(tmp_path.glob(".two.jsonl.progress-*"))  # both processes' progress removed once published
    assert runs["two", False] == runs["one", False] and runs["one", False].count(">>> ") == 5  # printed once
    # batches 0 and 2 (of 2, 2 and 1 prompts) on rank 0, batch 1 on rank 1
    assert runs["two", True].startswith("wrote 5 replies (") and "2 processes (batches 2, 1)" in runs["two", True]
    tokens = [int(re.search(r"\((\d+) new tokens", runs[name, True]).group(1)) for name in ("one", "two")]
    assert tokens[0] > 5 and tokens[1] == tokens[0]  # each prompt generated once, by one of the processes


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [4096, 2])
def test_a_killed_reply_job_resumes_where_it_stopped_and_writes_what_an_unbroken_run_writes(smollm2_dir, tmp_path,
                                                                                            chunk):
    """Killed inside the first chunk (chunk 4096: nothing written yet, replies in the progress file) or after a
    chunk was written (chunk 2: rows in the partial output, more in the progress file), with a row of each cut
    short: the rerun generates only what is missing and writes the unbroken run's file byte for byte."""
    import subprocess
    import sys
    import time

    from colossal_llama.inference.reply_file import partial_file, progress_files
    from tests.support.launch import REPO, worker_env

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([*QUESTIONS, "Name a colour.", "Count to three."]) + "\n", encoding="utf-8")

    def command(output):
        return [sys.executable, str(REPO / "inference_example.py"), "--model_path", str(smollm2_dir), "--input_txt",
                str(prompts), "--do_sample", "False", "--max_new_tokens", "16", "--device", "cpu", "--batch_size",
                "1", "--chunk_prompts", str(chunk), "--output", str(output)]

    def lines(path):
        return path.read_text(encoding="utf-8").count("\n") if path.exists() else 0

    unbroken, resumed = tmp_path / "unbroken.jsonl", tmp_path / "resumed.jsonl"
    partial = partial_file(resumed)
    assert subprocess.run(command(unbroken), env=worker_env(), cwd=REPO, capture_output=True).returncode == 0
    job = subprocess.Popen(command(resumed), env=worker_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.poll() is None:
        files = progress_files(resumed)
        if files and lines(files[0]) >= (2 if chunk > 6 else 3) and (chunk > 6 or lines(partial) >= 2):
            job.kill()  # SIGKILL: no clean-up of any kind
            break
        time.sleep(0.05)
    assert job.wait() == -9, "the job ended before it could be killed"
    (progress,) = progress_files(resumed)
    written = lines(partial)
    progress_rows = [json.loads(line) for line in progress.read_text(encoding="utf-8").splitlines()]
    kept = written + sum(row["index"] >= written for row in progress_rows)
    assert not resumed.exists() and 2 <= kept < 6  # the fault happened: replies lost unless resumed
    if chunk > 6:
        assert written == 0  # the one chunk was never written
    else:  # whole chunks written, in order: the start of the unbroken file
        assert written in (2, 4) and unbroken.read_bytes().startswith(partial.read_bytes())
        with open(partial, "a", encoding="utf-8") as fh:
            fh.write('{"prompt": "Name a col')  # a row the kill cut short
    with open(progress, "a", encoding="utf-8") as fh:
        fh.write('{"index": 5, "prompt": "Count to th')

    rerun = subprocess.run(command(resumed), env=worker_env(), cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming {resumed}: {kept} of 6 replies from an interrupted run (1 row(s) cut short" in rerun.stderr
    assert f", {kept} from an interrupted run)" in rerun.stdout
    assert resumed.read_bytes() == unbroken.read_bytes()
    assert progress_files(resumed) == [] and not partial.exists()


def test_rows_of_other_prompts_stop_the_run_with_the_file_and_line(tmp_path):
    from colossal_llama.inference.reply_file import Prompts, partial_file, prepare, read_progress

    target = tmp_path / "replies.jsonl"
    progress = tmp_path / ".replies.jsonl.progress-00000-of-00002.jsonl"
    progress.write_text(json.dumps({"index": 0, "prompt": "Hi", "response": "Hello"}) + "\n"
                        + json.dumps({"index": 1, "prompt": "Bye", "response": "Ciao"}) + "\n", encoding="utf-8")
    resumed = read_progress(target, written=0)
    assert (resumed.reply_of(0, "Hi"), resumed.reply_of(1, "Bye"), resumed.reply_of(2, "More")) == ("Hello", "Ciao",
                                                                                                     None)
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(progress))}:2: prompt: not prompt 2 of --input_txt"):
        resumed.reply_of(1, "Goodbye")
    assert read_progress(target, written=1).done.keys() == {1}  # rows the partial output holds are not kept
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\nGoodbye\n", encoding="utf-8")
    partial_file(target).write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n"
                                    + json.dumps({"prompt": "Bye", "response": "Ciao"}) + "\n", encoding="utf-8")
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(partial_file(target)))}:2: prompt: not prompt 2 of"):
        prepare(target, Prompts.read(str(prompts)), overwrite=False, ranks=Ranks())
    prepare(target, Prompts.read(str(prompts)), overwrite=True, ranks=Ranks())  # starts afresh: nothing left
    assert not partial_file(target).exists() and not progress.exists()


def test_a_row_cut_short_is_cut_from_the_partial_output_reading_only_its_tail(tmp_path):
    from colossal_llama.inference.reply_file import _cut_after_last_line

    partial = tmp_path / ".replies.jsonl.partial"
    rows = "".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(3))
    for cut, block in (('{"prompt": "p3", "respo', 8), ("", 8), ('{"prompt": "a long cut row' * 3, 4)):
        partial.write_text(rows + cut, encoding="utf-8")
        _cut_after_last_line(partial, block=block)  # blocks smaller than a row: the scan crosses several
        assert partial.read_text(encoding="utf-8") == rows
    partial.write_text('{"prompt": "p0", "resp', encoding="utf-8")  # not one whole row
    _cut_after_last_line(partial, block=4)
    assert partial.read_bytes() == b""


def test_a_mistyped_prompts_file_name_is_taken_as_the_prompt_with_a_warning(tmp_path, caplog):
    """``--input_txt prompts.txtt`` (no such file) gets one reply to the words "prompts.txtt": said on stderr."""
    import logging

    from colossal_llama.inference.reply_file import Prompts

    with caplog.at_level(logging.WARNING):
        prompts = Prompts.read(str(tmp_path / "prompts.txtt"))
        assert (prompts.path, prompts.count) == (None, 1)
        Prompts.read("Write a haiku about rain.")  # a sentence is a prompt: nothing to say
    assert [r.getMessage() for r in caplog.records] == [
        f"--input_txt '{tmp_path / 'prompts.txtt'}': no such file, so it is taken as the prompt itself"]
