"""Streaming, chat and the web chat against what users do: code and Chinese streamed exactly as decoded, a message
that cannot be answered, Ctrl-C or a closed page in the middle of a reply, malformed conversations, a system
message first.

A scripted model stands in for the LM (its ``generate`` "produces" the ids of a fixed reply one step at a time,
through the streamer, asking the stopping criteria after each step as transformers does); the tokenizer is the real
Mistral one (SentencePiece: the decoder that drops a leading space).
"""
from __future__ import annotations

import io
import json
import socket
import threading
import time
import types
import urllib.error
import urllib.request

import pytest
import torch

from colossal_llama.dataset.chat_templates import get_chat_template
from colossal_llama.eval.web.server import ChatBackend, make_server
from colossal_llama.inference.chat import ChatSession, drop_empty_exchanges, fit_history
from colossal_llama.inference.cli import parse_args, run_chat
from colossal_llama.inference.generation import ReplyText, SamplingConfig, generate_stream, generate_text
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.utils.errors import UserInputError

# Indented code (a SentencePiece decoder drops the leading space of a token decoded alone: streamed per line, each
# indent lost a space), Chinese, and a character (U+1D11E) the tokenizer spells as 4 byte tokens (a piece must not end inside it).
REPLY = "Here is code:\ndef f(x):\n    if x:\n        return 1\n    return 0\n我用 Python 编程，很好。 𝄞 done"
GREEDY = SamplingConfig(max_new_tokens=400, do_sample=False)


class ScriptedModel:
    """``generate`` appends the ids of ``reply`` one per step (``delay_s`` apart), hands each to the streamer and
    stops when a stopping criterion says so, at EOS or at ``max_new_tokens``; ``runs``: the steps of each call."""

    device = torch.device("cpu")

    def __init__(self, reply_ids, delay_s: float = 0.0, positions: int = 4096):
        self.config = types.SimpleNamespace(max_position_embeddings=positions)
        self.reply_ids, self.delay_s, self.runs = list(reply_ids), delay_s, []
        self.finished = threading.Event()

    def generate(self, input_ids, max_new_tokens, streamer=None, stopping_criteria=(), eos_token_id=None, **_):
        self.runs.append(0)
        self.finished.clear()
        out = input_ids
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for token in self.reply_ids[:max_new_tokens]:
            time.sleep(self.delay_s)
            out = torch.cat([out, torch.tensor([[token]])], dim=1)
            self.runs[-1] += 1
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in (eos_token_id or []) or any(bool(c(out, None).all()) for c in stopping_criteria):
                break
        if streamer is not None:
            streamer.end()
        self.finished.set()
        return out


@pytest.fixture(scope="module")
def mistral(mistral_dir):
    return load_tokenizer(mistral_dir)


def reply_ids(tokenizer, text: str = REPLY, repeat: int = 1) -> list:
    return tokenizer(text, add_special_tokens=False)["input_ids"] * repeat


# --- 1. streamed text == decoded text -------------------------------------------------------------------------

def test_streamed_pieces_join_to_the_decoded_reply_with_every_indent_and_character(mistral):
    ids = reply_ids(mistral)
    assert mistral.decode(ids) == REPLY
    text = ReplyText(mistral)
    pieces = [text.add([token]) for token in ids] + [text.finish()]
    assert "".join(pieces) == REPLY
    assert not any(piece.endswith("\ufffd") for piece in pieces), "a piece ended inside a character"
    assert "\n    if x:" in "".join(pieces[:ids.index(mistral.convert_tokens_to_ids("▁return"))])

    model = ScriptedModel(ids + [mistral.eos_token_id])
    streamed = list(generate_stream(model, mistral, [1, 2], GREEDY))
    assert len(streamed) > 10 and "".join(streamed) == generate_text(model, mistral, [1, 2], GREEDY) == REPLY


def test_a_reply_cut_inside_a_character_ends_as_its_decode_does(mistral):
    ids = reply_ids(mistral)
    cut = ids[: ids.index(mistral.convert_tokens_to_ids("<0xF0>")) + 2]  # two of the emoji's four bytes
    text = ReplyText(mistral)
    assert "".join([*(text.add([token]) for token in cut), text.finish()]) == mistral.decode(cut)


def test_the_chat_history_holds_the_reply_as_decoded(mistral):
    session = ChatSession(ScriptedModel(reply_ids(mistral) + [mistral.eos_token_id]), mistral,
                          get_chat_template("llama2", mistral), GREEDY)
    assert session.reply("Write code.") == REPLY and session.history[-1]["content"] == REPLY


# --- 2, 3. the terminal chat goes on after a bad message or Ctrl-C ---------------------------------------------

def chat_args(tmp_path, *flags):
    return parse_args(["--model_path", str(tmp_path), "--chat", "--chat_template", "llama2", "--device", "cpu",
                       "--do_sample", "False", *flags])


def test_a_message_that_cannot_be_answered_is_an_error_line_and_the_chat_goes_on(mistral, tmp_path):
    model = ScriptedModel(reply_ids(mistral, "Fine.") + [mistral.eos_token_id])
    args = chat_args(tmp_path, "--max_context", "64", "--max_new_tokens", "8")
    too_long = " ".join(["word"] * 200)
    stdin = io.TextIOWrapper(io.BytesIO(f"hi\n{too_long}\nnot \xff UTF-8\nhello again\n\n".encode("utf-8")
                                        .replace("\xff".encode("utf-8"), b"\xff")), encoding="utf-8")
    out = io.StringIO()
    run_chat(args, model, mistral, SamplingConfig(8, False), inp=stdin, out=out)
    text = out.getvalue()
    assert "error: the message needs" in text and "fit in the context" in text
    assert "error: the message is not valid UTF-8" in text
    assert text.count("Assistant: Fine.") == 2 and "2 exchange(s) kept" in text


class InterruptOnce(io.StringIO):
    """Output on which the ``nth`` piece of the first reply raises KeyboardInterrupt (the user presses Ctrl-C)."""

    def __init__(self, nth: int):
        super().__init__()
        self.nth, self.pieces_left = nth, None

    def write(self, text):
        if self.pieces_left is not None:
            self.pieces_left -= 1
            if self.pieces_left == 0:
                raise KeyboardInterrupt
        elif text == "Assistant: ":
            self.pieces_left = self.nth
        return super().write(text)


def test_ctrl_c_during_a_reply_stops_generating_it_and_the_chat_goes_on(mistral, tmp_path):
    ids = reply_ids(mistral, REPLY, repeat=20)
    model = ScriptedModel(ids + [mistral.eos_token_id], delay_s=0.005)
    out = InterruptOnce(nth=5)
    run_chat(chat_args(tmp_path), model, mistral, GREEDY, inp=io.StringIO("write code\nagain\n\n"), out=out)
    text = out.getvalue()
    assert "[reply interrupted" in text and "1 exchange(s) kept" in text, text[-300:]
    assert len(text.split("[reply interrupted")[0]) < 200  # the rest of the first reply was never printed
    assert model.runs[0] < 50, "the interrupted reply was generated to its end"
    assert model.runs[1] == GREEDY.max_new_tokens  # the next one ran to its end


def test_closing_a_stream_stops_generate_at_its_next_token(mistral):
    ids = reply_ids(mistral, REPLY, repeat=20)
    model = ScriptedModel(ids, delay_s=0.01)  # ~ 8 s to the end
    stream = generate_stream(model, mistral, [1], SamplingConfig(max_new_tokens=len(ids), do_sample=False))
    next(stream)
    start = time.monotonic()
    stream.close()
    assert model.finished.is_set() and model.runs[0] < 20 and time.monotonic() - start < 2


# --- 3, 6. the web chat -----------------------------------------------------------------------------------

@pytest.fixture()
def web(mistral):
    """A server with a slow scripted model (~ 8 s per reply unless stopped)."""
    model = ScriptedModel(reply_ids(mistral, REPLY, repeat=20), delay_s=0.01)
    backend = ChatBackend(model, mistral, get_chat_template("llama2", mistral), SamplingConfig(max_new_tokens=1000,
                                                                                                do_sample=False))
    server = make_server(backend, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield backend, server.server_address[1]
    server.shutdown()
    server.server_close()


def _post(port: int, payload: bytes) -> tuple:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/chat", data=payload,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.parametrize("messages,field", [("hello", "messages"), (["hi", "there"], "messages[0]"),
                                            ([{"from": "human", "content": 3}], "messages[0].content"),
                                            ([{"from": "human", "content": "a"}, {"from": "assistant"}],
                                             "messages[1].content")])
def test_a_malformed_conversation_is_http_400_with_a_one_line_error(web, messages, field):
    _, port = web
    status, body = _post(port, json.dumps({"messages": messages}).encode())
    error = json.loads(body)["error"]
    assert status == 400 and error.startswith(field + ":") and "\n" not in error


def test_a_page_that_goes_away_stops_its_generation_and_frees_the_model(web):
    backend, port = web
    body = json.dumps({"messages": [{"from": "human", "content": "write code"}]}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"POST /api/chat HTTP/1.0\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"delta" not in received:  # the reply has started
            received += conn.recv(4096)
        conn.shutdown(socket.SHUT_RDWR)
    assert backend.model.finished.wait(timeout=3), "generation went on for nobody"
    assert backend.model.runs[0] < 300
    assert backend.lock.acquire(timeout=3)  # the next user is not kept waiting
    backend.lock.release()


# --- 6. a system message first; blank replies ---------------------------------------------------------------

def test_a_system_message_stays_first_when_blank_replies_and_old_exchanges_are_dropped(mistral):
    template = get_chat_template("llama2", mistral)
    system = {"from": "system", "content": "You are terse."}
    turns = [{"from": "human", "content": f"Question {i}: name a colour."} if k == 0 else
             {"from": "assistant", "content": f"Answer {i}: blue." if i != 1 else "  "} for i in range(3)
             for k in range(2)] + [{"from": "human", "content": "Last one?"}]
    kept, dropped = drop_empty_exchanges([system, *turns])
    assert dropped == 1 and kept == [system, *turns[:2], *turns[4:]]
    one_exchange = len(template.encode_prompt([system, *turns[4:]]))
    ids, trimmed, n = fit_history(template, kept, one_exchange)
    assert (n, trimmed) == (1, [system, *turns[4:]]) and ids == template.encode_prompt(trimmed)
    assert "You are terse." in mistral.decode(ids)
    with pytest.raises(UserInputError, match="fit in the context"):
        fit_history(template, kept, 5)
    with pytest.raises(UserInputError, match=r"^messages\[2\]\.from: expected 'assistant'"):
        drop_empty_exchanges([system, turns[0], turns[0], turns[1]])


def test_a_tokenizer_that_cleans_up_spaces_streams_every_word(smollm2_dir):
    """Many hub tokenizers set ``clean_up_tokenization_spaces``: the whole decode then rewrote text already streamed
    (``do n`` became ``don't`` with the next token) and every later piece was held back as not a continuation: the
    rest of the reply vanished from the terminal, the page and the chat's history. Replies are decoded without that
    rewrite, so the stream equals the blocking decode."""
    from colossal_llama.inference.generation import decode_reply

    tokenizer = load_tokenizer(smollm2_dir)
    tokenizer.clean_up_tokenization_spaces = True
    text = "I do n't know . Really , it is a . b in code"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = ReplyText(tokenizer)
    joined = "".join(stream.add([i]) for i in ids) + stream.finish()
    assert joined == decode_reply(tokenizer, ids) == text


def test_a_reply_spelling_a_special_token_is_not_kept_in_the_history(smollm2_dir):
    """With the tokenizer's own template, a model reply that writes ``<|im_end|>`` out of ordinary pieces would be
    read as a control token in every later prompt: each next message of the chat was refused. Such an exchange is
    dropped, as a blank reply is."""
    template = get_chat_template("tokenizer", load_tokenizer(smollm2_dir))
    messages = [{"from": "human", "content": "How does a turn end?"},
                {"from": "assistant", "content": "With <|im_end|> at its end."},
                {"from": "human", "content": "Thanks."}]
    kept, dropped = drop_empty_exchanges(messages, template)
    assert dropped == 1 and kept == messages[2:]
    template.encode_prompt(kept)  # the next prompt encodes


# --- SFT review fixes -----------------------------------------------------------------------------------------

class ReplayingModel(ScriptedModel):
    """Generates the given replies in turn, recording each prompt it was given."""

    def __init__(self, replies):
        super().__init__([])
        self.replies, self.prompts = list(replies), []

    def generate(self, input_ids, **kwargs):
        self.prompts.append(input_ids[0].tolist())
        self.reply_ids = self.replies.pop(0)
        return super().generate(input_ids, **kwargs)


def test_llama2_chat_on_a_byte_level_tokenizer_keeps_to_the_training_format(smollm2_dir, data_dir):
    """llama2 on a byte-level tokenizer (SmolLM2) trains each reply as " {reply}</s>": the model generates that
    space, which was shown, kept in the history, and rendered again after the template's own space -- every later
    prompt drifted from the format the model was trained on. A model replaying the trained replies of a real
    conversation: the user sees the replies as written, the history holds them, and the prompt of each turn is
    exactly the training ids before that reply."""
    from colossal_llama.dataset.chat_templates import labelled_spans

    tokenizer = load_tokenizer(smollm2_dir)
    template = get_chat_template("llama2", tokenizer)
    assert template.reply_prefix == " "
    rows = (json.loads(line)["messages"] for line in (data_dir / "sft" / "chatterbot_en.jsonl").open(encoding="utf-8"))
    messages = next(m for m in rows if len(m) >= 6 and all(t["content"].strip() == t["content"] for t in m))[:6]
    ids, labels = template.encode_conversation(messages)
    spans = labelled_spans(labels)
    model = ReplayingModel(ids[start:end] for start, end in spans)
    session = ChatSession(model, tokenizer, template, GREEDY)
    shown = [session.reply(turn["content"]) for turn in messages[::2]]
    assert shown == [turn["content"] for turn in messages[1::2]]
    assert session.history == messages
    assert model.prompts == [ids[:start] for start, _ in spans]
    # the web page: it keeps the history and sends it back with each question; the backend streams the same
    model = ReplayingModel(ids[start:end] for start, end in spans)
    backend = ChatBackend(model, tokenizer, template, GREEDY)
    history = []
    for turn in messages[::2]:
        history.append(turn)
        history.append({"from": "assistant", "content": "".join(backend.stream(backend.prompt_ids(history)[0]))})
    assert history == messages and model.prompts == [ids[:start] for start, _ in spans]
