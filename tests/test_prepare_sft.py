"""SFT preparation and chat templates on the real chatterbot conversations with real tokenizers.

The central check: decoding every trained (label != -100) span gives back EXACTLY the assistant texts of
the conversation, in order, each followed by its end-of-turn marker -- and nothing else is trained.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from colossal_llama.dataset.accounting import PrepCounts, format_summary
from colossal_llama.dataset.chat_templates import get_chat_template, labelled_spans
from colossal_llama.dataset.cli import sft_main
from colossal_llama.dataset.config import OutputLayout, SFTPrepConfig
from colossal_llama.dataset.manifest import Manifest
from colossal_llama.dataset.pipeline import PrepSummary, prepare_sft
from colossal_llama.dataset.prepared import document_spans, load_part, part_dirs
from colossal_llama.dataset.tokenization import truncate_to_exchanges
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.utils.errors import DataError, UserInputError

BROKEN_ROW = "chatterbot_en.jsonl:1779"  # the real corpus's one conversation with whitespace-only turns


@pytest.fixture(scope="module")
def conversations(data_dir) -> dict[str, list]:
    """doc id -> messages, for every row of the real SFT corpus."""
    out = {}
    for path in sorted((data_dir / "sft").glob("*.jsonl")):
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            out[f"{path}:{line_no}"] = json.loads(line)["messages"]
    return out


def _run(data_dir, tokenizer_dir, out, template, max_length=4096, **kw) -> PrepSummary:
    config = SFTPrepConfig(input_dirs=[data_dir / "sft"], tokenizer_dir=tokenizer_dir, output=OutputLayout.under(out),
                           max_length=max_length, num_bins=3, strict=False, chat_template=template, **kw)
    return prepare_sft(config)


@pytest.mark.parametrize("template", ["llama2", "llama3"])
@pytest.mark.parametrize("tokenizer_fixture", ["smollm2_dir", "mistral_dir"])
def test_turns_are_encoded_in_the_rust_backend_exactly_as_the_tokenizer_encodes_them(conversations, request, template,
                                                                                     tokenizer_fixture):
    """SFT preparation encodes every turn; a fast tokenizer's Rust backend does it without the Python wrapper's
    per-call work (1.6x faster preparation of the chatterbot corpus) and must give ``tokenizer(text)``'s ids:
    every real conversation, and multi-turn ones with a system message, both ways."""
    tokenizer = load_tokenizer(request.getfixturevalue(tokenizer_fixture))
    fast, wrapped = get_chat_template(template, tokenizer), get_chat_template(template, tokenizer)
    wrapped._backend = None  # the tokenizer's own __call__
    assert fast._backend is not None
    valid = [m for m in conversations.values() if all(turn["content"].strip() for turn in m)]
    system = [{"from": "system", "content": "你是一个乐于助人的助手。"}]
    multi_turn = [system + [turn for m in valid[i: i + 3] for turn in m] for i in range(0, 300, 3)]
    for messages in valid + multi_turn:
        assert fast.encode_conversation(messages) == wrapped.encode_conversation(messages)


def test_a_tokenizer_json_that_truncates_or_pads_cuts_and_pads_nothing(conversations, smollm2_dir, tmp_path):
    """A ``tokenizer.json`` may store truncation and padding, which transformers leaves on in the Rust backend that
    preparation encodes with: every text would be cut to 8 tokens and padded to 512 here."""
    import shutil

    from colossal_llama.dataset.tokenization import encode_texts

    folder = tmp_path / "truncating"
    shutil.copytree(smollm2_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 512}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    valid = [m for m in conversations.values() if all(turn["content"].strip() for turn in m)][:300]
    texts = [turn["content"] for m in valid for turn in m]
    for template in ("llama3", "tokenizer"):
        cutting, plain = load_tokenizer(folder), load_tokenizer(smollm2_dir)
        backend = cutting.backend_tokenizer
        assert backend.encode(texts[0]).ids[8:] == [0] * 504  # the setting is there, and cuts and pads
        cut, whole = get_chat_template(template, cutting), get_chat_template(template, plain)
        for messages in valid:
            assert cut.encode_conversation(messages) == whole.encode_conversation(messages)
    assert encode_texts(load_tokenizer(folder), texts) == encode_texts(load_tokenizer(smollm2_dir), texts)


def _prepare(data_dir, tokenizer_dir, out, template, max_length=4096, **kw) -> Manifest:
    return _run(data_dir, tokenizer_dir, out, template, max_length, **kw).manifest


def _rows(out: Path):
    """(arrow row, mirror row) pairs of every part."""
    for part in part_dirs(out / "arrow"):
        mirror = (out / "jsonl" / f"{part.name}.jsonl").read_text(encoding="utf-8").splitlines()
        yield from zip(load_part(part), (json.loads(m) for m in mirror))


def _check_label_spans(out, tok, conversations, end_of_turn: str, packed: bool = False) -> int:
    """Every conversation (one per row, or several with ``packed``) trains exactly its assistant replies +
    end-of-turn, in order; returns the conversations checked."""
    checked = 0
    for row, meta in _rows(out):
        spans = document_spans(row["position_ids"])  # position_ids restart at every conversation
        assert len(spans) == len(meta["pieces"]) and (packed or len(spans) == 1)
        for (start, end), piece in zip(spans, meta["pieces"]):
            messages = conversations[piece["doc"]]
            ids, labels = row["input_ids"][start:end], row["labels"][start:end]
            assert row["position_ids"][start:end] == list(range(end - start))
            trained = labelled_spans(labels)
            decoded = [tok.decode(ids[a:b]) for a, b in trained]
            assert decoded == [m["content"] + end_of_turn for m in messages if m["from"] == "assistant"]
            for a, b in trained:
                assert labels[a:b] == ids[a:b]
            checked += 1
    return checked


def test_llama2_template_on_mistral_trains_exactly_the_replies(tmp_path, data_dir, mistral_dir, conversations):
    manifest = _prepare(data_dir, mistral_dir, tmp_path / "out", "llama2", system_message="You are concise.")
    tok = load_tokenizer(mistral_dir)
    checked = _check_label_spans(tmp_path / "out", tok, conversations, "</s>")
    assert checked == len(conversations) - 1 == manifest.counts.documents_in
    assert manifest.counts.skipped == {"empty_content": 1}
    assert manifest.counts.skipped_examples == [
        f"{data_dir / 'sft' / BROKEN_ROW}: messages[2].content: empty content"]
    assert manifest.chat_template == {"name": "llama2", "system_message": "You are concise."}
    assert manifest.counts.tokens_in == manifest.counts.tokens_out
    row, _ = next(_rows(tmp_path / "out"))
    assert row["input_ids"][0] == tok.bos_token_id == 1
    assert tok.decode(row["input_ids"]).startswith("<s> [INST] <<SYS>>\nYou are concise.\n<</SYS>>\n\n")
    # EOS is the real id 2 at the end of every reply, never the string "</s>" split into pieces
    ends = [row["labels"][b - 1] for row, _ in _rows(tmp_path / "out") for _, b in labelled_spans(row["labels"])]
    assert set(ends) == {2}


def test_tokenizer_chat_template_on_smollm2(tmp_path, data_dir, smollm2_dir, conversations):
    manifest = _prepare(data_dir, smollm2_dir, tmp_path / "out", "tokenizer", num_proc=2)
    tok = load_tokenizer(smollm2_dir)
    assert _check_label_spans(tmp_path / "out", tok, conversations, "<|im_end|>") == len(conversations) - 1
    row, _ = next(_rows(tmp_path / "out"))
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    # the Jinja source's hash: training refuses a --pretrained whose tokenizer renders another template
    jinja_sha256 = hashlib.sha256(tok.chat_template.encode("utf-8")).hexdigest()
    assert manifest.chat_template == {"name": "tokenizer", "system_message": None, "jinja_sha256": jinja_sha256}
    assert get_chat_template("tokenizer", tok).stop_token_ids == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_llama3_on_a_base_tokenizer_falls_back_to_text_headers_and_eos(tmp_path, data_dir, mistral_dir, conversations):
    _prepare(data_dir, mistral_dir, tmp_path / "out", "llama3")
    tok = load_tokenizer(mistral_dir)
    assert _check_label_spans(tmp_path / "out", tok, conversations, "</s>") == len(conversations) - 1
    template = get_chat_template("llama3", tok)
    assert not template.native and template.stop_token_ids == [tok.eos_token_id]


def test_llama3_with_native_header_tokens(smollm2_dir, conversations):
    """A tokenizer that has LLaMA-3's header/eot tokens gets them as single ids; eot ends every reply."""
    tok = load_tokenizer(smollm2_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    template = get_chat_template("llama3", tok, system_message="Be kind.")
    assert template.native and template.stop_token_ids == sorted({eot, tok.eos_token_id})  # EOS stops too
    messages = next(m for m in conversations.values() if len(m) >= 6)
    ids, labels = template.encode_conversation(messages)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|><|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|>")
    decoded = [tok.decode(ids[a:b]) for a, b in labelled_spans(labels)]
    assert decoded == [m["content"] + "<|eot_id|>" for m in messages[1::2]]
    assert ids.count(tok.convert_tokens_to_ids("<|start_header_id|>")) == 1 + len(messages)


@pytest.mark.parametrize("name", ["llama2", "llama3", "tokenizer"])
def test_encode_prompt_is_the_conversation_up_to_the_assistant_reply(name, smollm2_dir, mistral_dir, conversations):
    """What inference feeds the model is exactly what SFT trained it to continue."""
    tok = load_tokenizer(smollm2_dir if name == "tokenizer" else mistral_dir)
    template = get_chat_template(name, tok, system_message="Answer briefly.")
    messages = next(m for m in conversations.values() if len(m) >= 4)
    for k in range(1, len(messages), 2):
        prompt = template.encode_prompt(messages[:k])
        ids, labels = template.encode_conversation(messages[: k + 1])
        assert ids[: len(prompt)] == prompt
        assert labels[len(prompt) - 1] == -100 and labels[len(prompt)] != -100  # reply starts right after


@pytest.mark.parametrize("name", ["llama2", "llama3", "tokenizer"])
def test_a_system_message_is_stated_once_and_kept_when_a_conversation_is_cut(name, smollm2_dir, mistral_dir,
                                                                             conversations):
    """A real conversation of several exchanges with its own system message: the message is stated once, at the
    start (not in every [INST]), and a cut after whole exchanges keeps it (the cut once counted it as a turn and
    ended on a human one)."""
    tok = load_tokenizer(smollm2_dir if name == "tokenizer" else mistral_dir)
    template = get_chat_template(name, tok)
    messages = [{"from": "system", "content": "Answer briefly."}] + next(
        m for m in conversations.values() if len(m) >= 6)
    ids, _ = template.encode_conversation(messages)
    assert tok.decode(ids).count("Answer briefly.") == 1
    ends = template.exchange_ends(messages)
    assert len(ends) == template.num_exchanges(messages) >= 3 and ends[-1] == len(ids)
    assert template.first_exchanges(messages, 2) == messages[:5]
    assert truncate_to_exchanges(template, messages, ends[1]) == (*template.encode_conversation(messages[:5]), 2)


@pytest.mark.parametrize("name,max_length", [("llama2", 40), ("tokenizer", 64)])
def test_whole_exchange_truncation_and_counted_drops(name, max_length, tmp_path, data_dir, mistral_dir, smollm2_dir,
                                                     conversations):
    tokenizer_dir = smollm2_dir if name == "tokenizer" else mistral_dir
    manifest = _prepare(data_dir, tokenizer_dir, tmp_path / "out", name, max_length=max_length)
    template = get_chat_template(name, load_tokenizer(tokenizer_dir))
    counts = manifest.counts
    kept = 0
    cut_exchanges = cut_tokens = written = 0
    for row, meta in _rows(tmp_path / "out"):
        messages = conversations[meta["pieces"][0]["doc"]]
        assert len(row["input_ids"]) <= max_length
        exchanges = len(labelled_spans(row["labels"]))
        written += len(row["input_ids"])
        if 2 * exchanges < len(messages):
            cut_exchanges += template.num_exchanges(messages) - exchanges
            cut_tokens += len(template.encode_conversation(messages)[0]) - len(row["input_ids"])
        # the row is exactly the encoding of its first `exchanges` exchanges, and one more would not fit
        assert (row["input_ids"], row["labels"]) == template.encode_conversation(messages[: 2 * exchanges])
        if 2 * exchanges < len(messages):
            assert len(template.encode_conversation(messages[: 2 * exchanges + 2])[0]) > max_length
        kept += 1
    dropped = [d for d, m in conversations.items()
               if not d.endswith(BROKEN_ROW) and len(template.encode_conversation(m[:2])[0]) > max_length]
    assert counts.skipped == {"empty_content": 1, "first_exchange_exceeds_max_length": len(dropped)}
    assert len(dropped) > 0 and counts.truncated_conversations > 0
    assert kept == len(conversations) - 1 - len(dropped)
    # rows = written + skipped: a dropped conversation is skipped, not also counted among the documents
    assert counts.documents_out == kept and counts.lines_read == len(conversations)
    assert format_summary(manifest)[0] == (f"sft: {kept} documents written from {len(conversations)} rows, "
                                           f"skipped {1 + len(dropped)} {counts.skipped}")
    assert counts.tokens_in == counts.tokens_out + counts.tokens_truncated + counts.tokens_dropped
    # the reported figures are those of the rows written: exchanges and tokens cut off the truncated conversations,
    # and the fill ratio of the written tokens (not of the tokens before truncation)
    assert (counts.truncated_exchanges, counts.tokens_truncated) == (cut_exchanges, cut_tokens)
    assert cut_exchanges > counts.truncated_conversations  # some conversations lost more than one exchange
    assert counts.tokens_out == written and counts.sequences == kept
    assert counts.fill_ratio == round(written / (kept * max_length), 6)


@pytest.mark.slow
def test_same_seed_same_bytes_with_one_or_two_processes(tmp_path, data_dir, smollm2_dir):
    for num_proc in (1, 2):
        pids = _run(data_dir, smollm2_dir, tmp_path / f"np{num_proc}", "tokenizer", num_proc=num_proc, seed=9).tokenize_pids
        if num_proc == 1:
            assert pids == [os.getpid()]
        else:  # two worker processes really tokenised
            assert len(pids) == 2 and os.getpid() not in pids, pids
    files = [sorted((p.relative_to(tmp_path / f"np{n}"), p.read_bytes()) for p in (tmp_path / f"np{n}").rglob("*")
                    if p.is_file() and "cache" not in p.parts) for n in (1, 2)]
    assert len(files[0]) > 5 and files[0] == files[1]


def test_a_template_that_rewrites_history_is_refused(smollm2_dir, conversations):
    """Prefix-by-prefix span finding needs earlier turns to render the same in longer conversations."""
    tok = load_tokenizer(smollm2_dir)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    template = get_chat_template("tokenizer", tok)
    messages = next(m for m in conversations.values() if len(m) >= 4)
    with pytest.raises(UserInputError, match="not prefix-stable"):
        template.encode_conversation(messages)


def test_a_template_that_trims_the_content_trains_on_what_it_renders(smollm2_dir, conversations):
    """Llama 3's own template writes ``message['content'] | trim``: a reply with surrounding whitespace is not in
    the render verbatim, and every such row failed with 'does not render assistant content verbatim'. The trained
    tokens are the trimmed reply and the end of its turn, as rendered."""
    tok = load_tokenizer(smollm2_dir)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    template = get_chat_template("tokenizer", tok)
    human, reply = next(m for m in conversations.values() if len(m) == 2)
    padded = [human, {**reply, "content": "  " + reply["content"] + "\n"}]
    ids, labels = template.encode_conversation(padded)
    trained = tok.decode([i for i, label in zip(ids, labels) if label != -100])
    assert trained == reply["content"].strip() + "<|im_end|>"
    assert template.encode_conversation([human, reply]) == (ids, labels)  # the same tokens as the unpadded reply


def test_strict_mode_names_the_broken_real_row(tmp_path, data_dir, mistral_dir, capsys):
    config = SFTPrepConfig(input_dirs=[data_dir / "sft"], tokenizer_dir=mistral_dir,
                           output=OutputLayout.under(tmp_path / "out"), chat_template="llama2")
    with pytest.raises(DataError) as exc:
        prepare_sft(config)
    assert str(exc.value) == f"{data_dir / 'sft' / BROKEN_ROW}: messages[2].content: empty content"
    assert not (tmp_path / "out").exists()  # validation happens before anything is written
    with pytest.raises(SystemExit) as exit_:
        sft_main(["--data_input_dirs", str(data_dir / "sft"), "--tokenizer_dir", str(mistral_dir),
                  "--data_output_dirs", str(tmp_path / "out"), "--llama_version", "3", "--chat_template", "llama2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --llama_version 3 contradicts --chat_template llama2")


def test_a_template_error_is_one_line(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                         "supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(UserInputError, match="^the tokenizer's chat_template failed: System role not supported$"):
        get_chat_template("tokenizer", tok, system_message="Be brief.")


def test_packed_conversations_keep_their_own_positions_and_labels_and_save_padding(tmp_path, data_dir, mistral_dir,
                                                                                 conversations, caplog):
    """--packing: whole conversations share rows of <= max_length; each still trains only its replies."""
    import logging

    with caplog.at_level(logging.INFO):
        packed = _run(data_dir, mistral_dir, tmp_path / "packed", "llama2", max_length=512, packing=True)
    single = _run(data_dir, mistral_dir, tmp_path / "single", "llama2", max_length=512)
    tok = load_tokenizer(mistral_dir)
    checked = _check_label_spans(tmp_path / "packed", tok, conversations, "</s>", packed=True)
    assert checked == single.counts.sequences == len(conversations) - 1 - single.counts.skipped.get(
        "first_exchange_exceeds_max_length", 0)
    rows = [row for row, _ in _rows(tmp_path / "packed")]
    assert all(len(r["input_ids"]) <= 512 for r in rows)
    assert packed.counts.sequences == len(rows) < checked / 5  # short chats: many per row
    for name in ("tokens_in", "tokens_out", "tokens_trained", "tokens_truncated", "tokens_dropped"):
        assert getattr(packed.counts, name) == getattr(single.counts, name), name
    assert packed.manifest.packing and not single.manifest.packing
    c = packed.counts
    assert c.padding_tokens == c.sequences * 512 - c.tokens_out
    assert c.padding_tokens_unpacked == single.counts.padding_tokens == checked * 512 - c.tokens_out
    assert c.padding_saved > 0.9
    assert any(m.startswith(f"packing: padding to max_length {c.padding_tokens:,} tokens instead of "
                            f"{c.padding_tokens_unpacked:,} unpacked (saved ") for m in caplog.messages)


@pytest.mark.parametrize("name", ["llama2", "llama3", "tokenizer"])
def test_a_conversation_can_bring_its_own_system_message(name, tmp_path, data_dir, mistral_dir, conversations, request):
    """Real conversations, every other one starting with its own system message: it replaces the default
    (--system_message) in that conversation only, under every template; replies alone are trained."""
    own, default = "你是一个乐于助人的助手。", "Answer briefly."
    rows = {}
    source = tmp_path / "in" / "chat.jsonl"
    source.parent.mkdir()
    with open(source, "w", encoding="utf-8") as fh:
        for i, messages in enumerate(m for d, m in conversations.items() if "chatterbot_zh" in d):
            if i == 60:
                break
            messages = ([{"from": "system", "content": own}] if i % 2 else []) + messages
            rows[f"{source}:{i + 1}"] = messages
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    tokenizer_dir = request.getfixturevalue("smollm2_dir") if name == "tokenizer" else mistral_dir
    config = SFTPrepConfig(input_dirs=[source.parent], tokenizer_dir=tokenizer_dir, output=OutputLayout.under(tmp_path / "out"),
                           max_length=4096, num_bins=1, chat_template=name, system_message=default)
    prepare_sft(config)
    tok = load_tokenizer(tokenizer_dir)
    end_of_turn = "<|im_end|>" if name == "tokenizer" else "</s>"
    assert _check_label_spans(tmp_path / "out", tok, rows, end_of_turn) == len(rows)
    template = get_chat_template(name, tok, system_message=default)
    for row, meta in _rows(tmp_path / "out"):
        messages = rows[meta["pieces"][0]["doc"]]
        text = tok.decode(row["input_ids"])
        mine = messages[0]["from"] == "system"
        assert (own in text, default in text) == (mine, not mine)
        assert text.index(own if mine else default) < text.index(messages[1 if mine else 0]["content"])
        assert (row["input_ids"], row["labels"]) == template.encode_conversation(messages)


QWEN3_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
              "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
              "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_conversation_the_template_refuses_is_located_or_skipped_and_counted(smollm2_dir, conversations, tmp_path,
                                                                               num_proc):
    """A template that refuses one row's content (here Qwen3's habit: earlier replies lose their reasoning, so the
    render is not prefix-stable for that row only) named no row and could not be skipped: it failed the whole run
    with the template's message alone. Strict: ``file:line: messages: ...``, raised from a tokenising worker too;
    ``--skip_invalid``: the row is skipped, counted and located, the others written."""
    tok_dir = tmp_path / "tok"
    tok = load_tokenizer(smollm2_dir)
    tok.chat_template = QWEN3_LIKE
    tok.save_pretrained(tok_dir)
    pairs = [m for m in conversations.values() if len(m) == 2 and all(t["content"].strip() for t in m)][:6]
    thinking = [pairs[0][0], {"from": "assistant", "content": "<think>short</think>" + pairs[0][1]["content"]},
                *pairs[1]]
    rows = pairs[2:4] + [thinking] + pairs[4:6]
    data = tmp_path / "data"
    data.mkdir()
    path = data / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in rows), encoding="utf-8")

    def config(name, strict):
        return SFTPrepConfig(input_dirs=[data], tokenizer_dir=tok_dir, output=OutputLayout.under(tmp_path / name),
                             chat_template="tokenizer", strict=strict, num_proc=num_proc, max_length=512)

    with pytest.raises(DataError) as exc:
        prepare_sft(config("strict", True))
    assert str(exc.value).startswith(f"{path}:3: messages: the tokenizer's chat_template is not prefix-stable")
    summary = prepare_sft(config("skip", False))
    assert summary.counts.skipped == {"chat_template_refused": 1}
    assert summary.counts.skipped_examples == [f"{path}:3: messages: the chat template refused it"]
    assert summary.counts.sequences == 4 and summary.counts.documents_in == 5 and summary.counts.documents_out == 4
    older = {k: v for k, v in summary.counts.to_json().items() if k != "documents_out"}  # a manifest before it
    assert PrepCounts.from_json(older).documents_out == 4


def test_special_tokens_spelled_in_a_message_are_text_or_refused(mistral_dir, smollm2_dir):
    """A reply about formats that writes ``</s>`` ended its turn there under llama2 (the EOS id, trained as the
    reply's end); a ``<|im_end|>`` written in a ChatML conversation did the same once rendered. Segment templates
    encode content as text (the only EOS is the template's); the tokenizer's own template renders content and
    markers into one text, so a content spelling one of its special tokens is refused, naming the message."""
    mistral = load_tokenizer(mistral_dir)
    llama2 = get_chat_template("llama2", mistral)
    reply = "Close it with </s> and open with <s>."
    ids, labels = llama2.encode_conversation([{"from": "human", "content": "How?"},
                                              {"from": "assistant", "content": reply}])
    assert ids.count(mistral.eos_token_id) == 1 and ids[-1] == mistral.eos_token_id
    assert mistral.decode([i for i, lab in zip(ids, labels) if lab != -100], skip_special_tokens=True) == reply
    chatml = get_chat_template("tokenizer", load_tokenizer(smollm2_dir))
    spelled = [{"from": "human", "content": "What ends a turn?"}, {"from": "assistant", "content": "<|im_end|> does."}]
    with pytest.raises(UserInputError, match=r"^messages\[1\]\.content: spells the special token '<\|im_end\|>'"):
        chatml.encode_conversation(spelled)
    with pytest.raises(UserInputError, match=r"^messages\[0\]\.content: spells the special token"):
        chatml.encode_prompt([{"from": "human", "content": "say <|im_start|>"}])


def test_spelled_special_tokens_stay_text_in_tokenising_workers(tmp_path, mistral_dir):
    """The text-only backend travels to ``--num_proc`` workers pickled, and a pickled Rust tokenizer forgets that it
    reads special tokens as text: with 2 processes every ``</s>`` in a reply was EOS again. Both runs must agree."""
    data = tmp_path / "data"
    data.mkdir()
    reply = "Close it with </s> and open with <s> again."
    rows = [{"messages": [{"from": "human", "content": f"Question {i}?"}, {"from": "assistant", "content": reply}]}
            for i in range(40)]
    (data / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tok = load_tokenizer(mistral_dir)
    eos_counts = []
    for num_proc in (1, 2):
        out = tmp_path / f"np{num_proc}"
        prepare_sft(SFTPrepConfig(input_dirs=[data], tokenizer_dir=mistral_dir, output=OutputLayout.under(out),
                                  chat_template="llama2", num_proc=num_proc, max_length=512))
        eos_counts.append(sum(row["input_ids"].count(tok.eos_token_id) for row, _ in _rows(out)))
    assert eos_counts == [40, 40]  # one EOS a conversation: the template's, ending the reply


# ------------------------------------------------------------------------------------------------ SFT review fixes
def test_llama3_markers_spelled_as_text_are_said_with_the_tokenizers_own_template_suggested(mistral_dir, smollm2_dir,
                                                                                           caplog):
    """--llama_version 3 (the default) on a vocabulary without LLaMA-3's header tokens spelled them as text,
    silently: 45 tokens of markers an exchange on Mistral. Said once the template is made, with the tokenizer's own
    chat template suggested where it has one (SmolLM2's ChatML); a native vocabulary says nothing."""
    import logging

    expected = {mistral_dir: "(45 tokens an exchange) and ends each turn with the EOS token '</s>'",
                smollm2_dir: "(43 tokens an exchange) and ends each turn with the EOS token '<|im_end|>'; the "
                             "tokenizer has its own chat template: --chat_template tokenizer uses it"}
    for folder, ending in expected.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            get_chat_template("llama3", load_tokenizer(folder))
        assert caplog.messages == ["chat template llama3: the tokenizer lacks <|start_header_id|>, <|end_header_id|>, "
                                   "<|eot_id|>, so the template spells its markers as text " + ending]
    native = load_tokenizer(smollm2_dir)
    native.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        get_chat_template("llama3", native)
    assert caplog.messages == []


def test_the_default_template_is_named_before_its_fallback_is_said(mistral_dir, tmp_path, caplog):
    """Without --llama_version / --chat_template the run says it chose llama3, then why its rows are long."""
    import logging

    data = tmp_path / "data"
    data.mkdir()
    (data / "chats.jsonl").write_text(json.dumps({"messages": [{"from": "human", "content": "Hi?"},
                                                               {"from": "assistant", "content": "Hello."}]}) + "\n")
    with caplog.at_level(logging.INFO):
        assert sft_main(["--data_input_dirs", str(data), "--tokenizer_dir", str(mistral_dir),
                         "--data_output_dirs", str(tmp_path / "out"), "--num_spliced_dataset_bins", "1"]) == 0
    named = caplog.messages.index("chat template llama3 (--llama_version 3, the default)")
    assert caplog.messages[named + 1].startswith("chat template llama3: the tokenizer lacks <|start_header_id|>")


def test_a_template_refusal_names_the_message_field_once_in_plain_english(smollm2_dir):
    """The tokenizer template's refusal of a spelled special token carries its field apart from its problem, so a
    located error reads ``file:line: messages[1].content: ...`` (not ``messages: messages[1].content``), also
    from a tokenising worker; and the alternation error reads "an 'assistant' turn"."""
    import pickle

    from colossal_llama.dataset.chat_templates import MessageError

    chatml = get_chat_template("tokenizer", load_tokenizer(smollm2_dir))
    human, reply = {"from": "human", "content": "What ends a turn?"}, {"from": "assistant", "content": "<|im_end|>."}
    with pytest.raises(MessageError) as err:
        chatml.encode_conversation([human, reply])
    assert (err.value.field, err.value.problem) == ("messages[1].content", "spells the special token '<|im_end|>', "
                                                    "which the tokenizer's chat template would read as a control token")
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)
    with pytest.raises(MessageError, match=r"^messages\[0\]\.from: conversation must end with an 'assistant' turn$"):
        chatml.encode_conversation([human])
    with pytest.raises(MessageError, match=r"^messages\[1\]\.from: conversation must end with a 'human' turn$"):
        chatml.encode_prompt([human, {"from": "assistant", "content": "Its marker."}])


def test_a_refused_message_is_located_by_its_own_field(smollm2_dir):
    """Through the tokenising step, the refusal names file:line and the message's field once."""
    import pyarrow as pa

    from colossal_llama.dataset.tokenization import tokenize_sft_batch
    from colossal_llama.utils.errors import DataError

    chatml = get_chat_template("tokenizer", load_tokenizer(smollm2_dir))
    human, reply = {"from": "human", "content": "What ends a turn?"}, {"from": "assistant", "content": "<|im_end|>."}
    batch = pa.table({"messages": [[human, reply]], "line": [7], "file": [0]})
    with pytest.raises(DataError, match=r"^a\.jsonl:7: messages\[1\]\.content: spells the special token '<\|im_end"):
        tokenize_sft_batch(batch, chatml, 128, ["a.jsonl"])
