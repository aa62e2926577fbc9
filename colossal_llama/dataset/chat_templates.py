"""Chat templates: turn ``[{"from": "human"|"assistant", "content": str}, ...]`` into token ids and labels.

A conversation may start with its own system message ``{"from": "system", "content": ...}``; it replaces the
template's default (``--system_message``) for that conversation, under every template.

Three templates share one API (:class:`ChatTemplate`):

* ``llama2``: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{human} [/INST] {assistant} </s>`` per exchange.
  ``<s>``/``</s>`` are the tokenizer's real BOS/EOS *ids*; the strings are never tokenised (the original's
  pitfall: ``"</s>"`` as text is split into ``<``, ``/``, ``s``, ``>`` by SentencePiece).
* ``llama3``: ``<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``.
  When the tokenizer lacks the header/eot tokens (a base LLaMA-2 / Mistral / SmolLM2 vocabulary) the
  template falls back to spelling the header markers as ordinary text -- the rendered *text* is identical
  to LLaMA-3's -- and uses the tokenizer's EOS id as end-of-turn, so generation still stops on one id; a warning
  says so, and suggests the tokenizer's own chat template where it has one.
  (The original demanded ``eos == <|eot_id|>`` and failed on base tokenizers.)
* ``tokenizer``: the tokenizer's own ``chat_template`` via ``apply_chat_template``. Assistant spans are found
  by rendering the conversation prefix by prefix (``messages[:j]`` with a generation prompt, then
  ``messages[:j+1]``): the text added by the assistant turn is located in the full render and the tokens
  covering it (content + end-of-turn marker) are trained.

Labels are unshifted (HF convention) and -100 everywhere except assistant content + its end-of-turn token.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import jinja2

from colossal_llama.tokenizer.loading import markup_backend, text_backend
from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.labels import IGNORE_INDEX
from colossal_llama.utils.jsonl import not_utf8

logger = logging.getLogger(__name__)

SYSTEM, HUMAN, ASSISTANT = "system", "human", "assistant"
TEMPLATE_NAMES = ("llama2", "llama3", "tokenizer")
# Written next to a trained model (training copies the manifest's ``chat_template`` block), read by inference.
CHAT_CONFIG_FILE = "colossal_llama_chat.json"
# The manifest block's key for the ``tokenizer`` template's Jinja source hash (absent in manifests before it).
JINJA_SHA256 = "jinja_sha256"


class MessageError(UserInputError):
    """A malformed conversation; ``field`` names the offending entry, e.g. ``messages[3].from``."""

    def __init__(self, field: str, problem: str, reason: str):
        self.field, self.problem, self.reason = field, problem, reason
        super().__init__(f"{field}: {problem}")

    def __reduce__(self):  # raised in a tokenising worker, it is pickled back to the parent
        return type(self), (self.field, self.problem, self.reason)


def split_system(messages) -> tuple[str | None, list]:
    """``(system content or None, the human/assistant turns)`` of a (validated) conversation."""
    if messages and messages[0]["from"] == SYSTEM:
        return messages[0]["content"], messages[1:]
    return None, messages


def validate_messages(messages, *, ends_with: str) -> None:
    """Check ``messages`` are an optional system message, then human, assistant, human, ... ending with
    ``ends_with``.

    Raises :class:`MessageError` whose ``reason`` is a short counter key (``wrong_type``, ``unknown_role``...).
    """
    if not isinstance(messages, list):
        raise MessageError("messages", f"expected a list, got {type(messages).__name__}", "wrong_type")
    if not messages:
        raise MessageError("messages", "empty conversation", "empty_messages")
    first = 1 if isinstance(messages[0], dict) and messages[0].get("from") == SYSTEM else 0
    if first and len(messages) == 1:
        raise MessageError("messages", "a system message and no turns", "empty_messages")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise MessageError(where, f"expected an object, got {type(msg).__name__}", "wrong_type")
        for key in ("from", "content"):
            if key not in msg:
                raise MessageError(f"{where}.{key}", "missing field", "missing_field")
        extra = sorted(set(msg) - {"from", "content"})
        if extra:
            raise MessageError(f"{where}.{extra[0]}", "unexpected field", "extra_field")
        role, content = msg["from"], msg["content"]
        if not isinstance(role, str):
            raise MessageError(f"{where}.from", f"expected a string, got {type(role).__name__}", "wrong_type")
        if role not in (SYSTEM, HUMAN, ASSISTANT):
            raise MessageError(f"{where}.from", f"unknown role {role!r} (expected 'human' or 'assistant', or "
                               "'system' first)", "unknown_role")
        if i < first:
            pass
        elif role == SYSTEM:
            raise MessageError(f"{where}.from", "a system message can only be the first message", "wrong_alternation")
        elif role != (expected := HUMAN if (i - first) % 2 == 0 else ASSISTANT):
            raise MessageError(f"{where}.from", f"expected {expected!r} (turns alternate human, assistant, ...)",
                               "wrong_alternation")
        if not isinstance(content, str):
            raise MessageError(f"{where}.content", f"expected a string, got {type(content).__name__}",
                               "wrong_type")
        if not content.strip():
            raise MessageError(f"{where}.content", "empty content", "empty_content")
        if (problem := not_utf8(content)) is not None:
            raise MessageError(f"{where}.content", problem, "not_utf8")
    if messages[-1]["from"] != ends_with:
        raise MessageError(f"messages[{len(messages) - 1}].from",
                           f"conversation must end with {'an' if ends_with == ASSISTANT else 'a'} {ends_with!r} turn",
                           "wrong_alternation")


@dataclass
class Segment:
    """A run of token ids that is either trained on (assistant content + end-of-turn) or masked."""

    ids: list[int]
    trained: bool


class ChatTemplate(ABC):
    """Encode conversations for SFT (``encode_conversation``) and prompts for generation (``encode_prompt``)."""

    name: str
    # Text the template writes before each reply and trains as part of it (llama2's " " on byte-level tokenizers):
    # generated replies start with it; chat strips it so the history re-renders as trained.
    reply_prefix: str = ""

    def __init__(self, tokenizer, system_message: str | None = None):
        self.tokenizer = tokenizer
        self._backend = text_backend(tokenizer)  # None: a slow (Python) tokenizer
        self.system_message = system_message or None
        self.stop_token_ids: list[int] = []

    @abstractmethod
    def encode_conversation(self, messages) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a whole conversation (must end with an assistant turn); same length."""

    @abstractmethod
    def encode_prompt(self, messages) -> list[int]:
        """Ids of a conversation ending with a human turn, followed by the assistant header."""

    @abstractmethod
    def exchange_ends(self, messages) -> list[int]:
        """Token count of the conversation after each whole human+assistant exchange (len = #exchanges)."""

    @staticmethod
    def num_exchanges(messages) -> int:
        """Human+assistant exchanges in a conversation."""
        return len(split_system(messages)[1]) // 2

    @staticmethod
    def first_exchanges(messages, count: int) -> list:
        """The conversation (with its system message) cut after its first ``count`` exchanges."""
        return messages[: 2 * count + (len(messages) - len(split_system(messages)[1]))]

    def system_of(self, messages) -> str | None:
        """The conversation's own system message, else the template's default."""
        return split_system(messages)[0] or self.system_message

    def to_manifest(self) -> dict:
        """The block written to ``manifest.json["chat_template"]`` (and copied next to trained models)."""
        return {"name": self.name, "system_message": self.system_message}

    def _text(self, text: str) -> list[int]:
        """Ids of ``text``, no special token added nor read in it (a ``</s>`` a user wrote is text, not the end of
        the turn). A fast tokenizer encodes in its Rust backend directly (the same ids as ``tokenizer(text,
        split_special_tokens=True)``, without the Python wrapper's per-call work: preparing SFT data calls this for
        every turn), as pre-training preparation does."""
        if not text:
            return []
        if self._backend is not None:  # fetched each time: it sets the flag a pickled copy loses (map workers)
            return text_backend(self.tokenizer).encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def spelled_special_token(self, text: str) -> str | None:
        """A special token ``text`` spells that this template would read as a control token (None: it reads all
        content as text)."""
        return None


class SegmentTemplate(ChatTemplate):
    """A template built from independently tokenised pieces: encodings of a prefix of exchanges are
    exact prefixes of the full encoding, so truncation at an exchange boundary is a slice."""

    def _preamble(self, system: str | None) -> list[Segment]:
        return []

    @abstractmethod
    def _exchange(self, index: int, human: str, assistant: str | None, system: str | None) -> list[Segment]:
        """Segments of exchange ``index``; ``assistant=None`` renders the prompt up to the assistant header."""

    def _segments(self, messages) -> list[list[Segment]]:
        system, turns = self.system_of(messages), split_system(messages)[1]
        groups = [self._preamble(system)]
        for k in range(0, len(turns), 2):
            reply = turns[k + 1]["content"] if k + 1 < len(turns) else None
            groups.append(self._exchange(k // 2, turns[k]["content"], reply, system))
        return groups

    def encode_conversation(self, messages):
        validate_messages(messages, ends_with=ASSISTANT)
        ids, labels = [], []
        for seg in (s for group in self._segments(messages) for s in group):
            ids += seg.ids
            labels += seg.ids if seg.trained else [IGNORE_INDEX] * len(seg.ids)
        return ids, labels

    def encode_prompt(self, messages):
        validate_messages(messages, ends_with=HUMAN)
        return [i for group in self._segments(messages) for seg in group for i in seg.ids]

    def exchange_ends(self, messages):
        validate_messages(messages, ends_with=ASSISTANT)
        groups = self._segments(messages)
        total, ends = sum(len(s.ids) for s in groups[0]), []
        for group in groups[1:]:
            total += sum(len(s.ids) for s in group)
            ends.append(total)
        return ends

    def _adds_word_prefix(self) -> bool:
        """True when the tokenizer starts every independent encoding with a word boundary (SentencePiece's
        dummy prefix ``▁``): then a separate "{assistant}" piece already reads as " {assistant}"."""
        ids = self._text("a")
        return bool(ids) and self.tokenizer.convert_ids_to_tokens(ids[0]).startswith("\u2581")


class Llama2Template(SegmentTemplate):
    name = "llama2"

    def __init__(self, tokenizer, system_message=None):
        super().__init__(tokenizer, system_message)
        if tokenizer.eos_token_id is None:
            raise UserInputError("llama2 chat template: the tokenizer has no EOS token")
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id
        self.stop_token_ids = [self.eos]
        self.reply_prefix = "" if self._adds_word_prefix() else " "

    def _exchange(self, index, human, assistant, system):
        system = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if index == 0 and system else ""
        segs = [Segment(self.bos + self._text(f"[INST] {system}{human} [/INST]"), False)]
        if assistant is not None:
            segs.append(Segment(self._text(self.reply_prefix + assistant) + [self.eos], True))
        return segs


class Llama3Template(SegmentTemplate):
    name = "llama3"
    SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def __init__(self, tokenizer, system_message=None):
        super().__init__(tokenizer, system_message)
        self.native = all(self._single_id(t) is not None for t in self.SPECIALS)
        begin = self._single_id("<|begin_of_text|>")
        if begin is None:
            begin = tokenizer.bos_token_id
        self.begin = [begin] if begin is not None else []
        if self.native:
            self.eot = self._single_id("<|eot_id|>")
        elif tokenizer.eos_token_id is not None:
            self.eot = tokenizer.eos_token_id  # base tokenizer: EOS ends a turn (documented fallback)
        else:
            raise UserInputError("llama3 chat template: the tokenizer has neither <|eot_id|> nor an EOS token")
        self.stop_token_ids = sorted({self.eot} | ({tokenizer.eos_token_id} - {None}))
        if not self.native:
            logger.warning(self._spelled_markers_note())

    def _spelled_markers_note(self) -> str:
        """Why a llama3 conversation costs more tokens here, and what else there is: the fallback was silent (45
        tokens of markers an exchange on Mistral, 11 with LLaMA-3's own tokens on SmolLM2)."""
        missing = [t for t in self.SPECIALS if self._single_id(t) is None]
        markers = len(self._header("user") + [self.eot] + self._header("assistant") + [self.eot])
        note = (f"chat template llama3: the tokenizer lacks {', '.join(missing)}, so the template spells its markers "
                f"as text ({markers} tokens an exchange) and ends each turn with the EOS token "
                f"{self.tokenizer.convert_ids_to_tokens(self.eot)!r}")
        if getattr(self.tokenizer, "chat_template", None):
            note += "; the tokenizer has its own chat template: --chat_template tokenizer uses it"
        return note

    def _single_id(self, token: str) -> int | None:
        """The id of ``token`` if the vocabulary holds it as one piece, else None."""
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id or self.tokenizer.convert_ids_to_tokens(tid) != token:
            return None
        return tid

    def _header(self, role: str) -> list[int]:
        if self.native:
            start, end = self._single_id("<|start_header_id|>"), self._single_id("<|end_header_id|>")
            return [start] + self._text(role) + [end] + self._text("\n\n")
        return self._text(f"<|start_header_id|>{role}<|end_header_id|>\n\n")

    def _preamble(self, system):
        segs = [Segment(list(self.begin), False)]
        if system:
            segs.append(Segment(self._header("system") + self._text(system) + [self.eot], False))
        return segs

    def _exchange(self, index, human, assistant, system):
        prompt = self._header("user") + self._text(human) + [self.eot] + self._header("assistant")
        segs = [Segment(prompt, False)]
        if assistant is not None:
            segs.append(Segment(self._text(assistant) + [self.eot], True))
        return segs


class TokenizerTemplate(ChatTemplate):
    """The tokenizer's own Jinja ``chat_template`` (e.g. ChatML for SmolLM2)."""

    name = "tokenizer"

    def __init__(self, tokenizer, system_message=None):
        super().__init__(tokenizer, system_message)
        if not getattr(tokenizer, "chat_template", None):
            raise UserInputError("--chat_template tokenizer: the tokenizer has no chat_template")
        self.stop_strings = self._end_of_turn_tokens()
        specials = sorted({t for t in tokenizer.all_special_tokens if t} |
                          {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content},
                          key=len, reverse=True)
        self._specials_pattern = re.compile("|".join(map(re.escape, specials)) or r"(?!)")
        ids = {tokenizer.convert_tokens_to_ids(t) for t in self.stop_strings}
        self.stop_token_ids = sorted(ids | ({tokenizer.eos_token_id} - {None}))

    def to_manifest(self):
        # the Jinja source is the tokenizer's, not the name's: training checks that --pretrained renders the same
        return {**super().to_manifest(), JINJA_SHA256: chat_template_sha256(self.tokenizer)}

    def _render(self, messages, generation_prompt: bool) -> str:
        return self._render_many([messages], generation_prompt)[0]

    def _render_many(self, conversations, generation_prompt: bool) -> list[str]:
        """The template's text of each conversation: one ``apply_chat_template`` call for all of them (its per-call
        work, e.g. gathering the special tokens, is then done once)."""
        chats = []
        for messages in conversations:
            system = self.system_of(messages)
            chat = [{"role": "system", "content": system}] if system else []
            chats.append(chat + [{"role": "user" if m["from"] == HUMAN else "assistant", "content": m["content"]}
                                 for m in split_system(messages)[1]])
        try:
            return self.tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=generation_prompt)
        except jinja2.TemplateError as err:  # e.g. a template that refuses a system turn
            raise UserInputError(f"the tokenizer's chat_template failed: {err}") from None

    def _prefixes(self, messages) -> tuple[list[str], list[str]]:
        """For each assistant turn j: the text of ``messages[:j]`` with the generation prompt, and of
        ``messages[:j+1]`` (the last of these is the whole conversation's: it ends with an assistant turn)."""
        turns = self._replies(messages)
        return (self._render_many([messages[:j] for j in turns], True),
                self._render_many([messages[:j + 1] for j in turns], False))

    def _ids_and_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of rendered ``text`` (its markers read as special tokens, none added) and each one's character span
        ``[start, end)``."""
        backend = markup_backend(self.tokenizer)
        if backend is not None:  # the Rust backend directly, as in _text
            enc = backend.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    def spelled_special_token(self, text):
        found = self._specials_pattern.search(text)
        return found.group() if found else None

    def _refuse_spelled_specials(self, messages) -> None:
        """The template renders content and markers into one text, read with its special tokens: a content that
        spells one (``<|im_end|>`` in a reply about chat formats) would end the turn there. Refused, naming it."""
        for index, message in enumerate(messages):
            token = self.spelled_special_token(message["content"])
            if token is not None:
                raise MessageError(f"messages[{index}].content", f"spells the special token {token!r}, which the "
                                   "tokenizer's chat template would read as a control token", "spelled_special_token")

    @staticmethod
    def _replies(messages) -> range:
        """Indices of the assistant messages (the first comes after the system message, if any)."""
        return range(len(messages) - len(split_system(messages)[1]) + 1, len(messages), 2)

    def _end_of_turn_tokens(self) -> list[str]:
        """Special tokens the template writes right after an assistant reply (ChatML: ``<|im_end|>``)."""
        probe = [{"from": HUMAN, "content": "x"}, {"from": ASSISTANT, "content": "yes"}]
        prompt, full = self._render(probe[:1], True), self._render(probe, False)
        suffix = full[len(prompt):].split("yes", 1)[-1]
        specials = set(self.tokenizer.all_special_tokens) | set(self.tokenizer.get_added_vocab())
        found = [t for t in specials if t and t in suffix]
        return sorted(found, key=suffix.index)[:1]

    def _assistant_spans(self, messages) -> tuple[str, list[tuple[int, int]]]:
        """Full render and the character spans ``[start, end)`` of each assistant content + end-of-turn."""
        turns = self._replies(messages)
        prompts, uptos = self._prefixes(messages)
        full = uptos[-1]
        spans = []
        for j, prompt, upto in zip(turns, prompts, uptos):
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise UserInputError("the tokenizer's chat_template is not prefix-stable (rendering a longer "
                                     "conversation changes earlier turns); use --llama_version 2 or 3")
            content = messages[j]["content"]
            offset = upto.find(content, len(prompt))
            if offset < 0:  # a template that trims the content (Llama 3's own: content | trim) trains on what it renders
                content = content.strip()
                offset = upto.find(content, len(prompt))
            if offset < 0:
                raise UserInputError("the tokenizer's chat_template does not render assistant content verbatim "
                                     f"(nor stripped of surrounding whitespace): {content[:60]!r}")
            end = offset + len(content)
            tail = upto[end:]
            hits = [tail.index(s) + len(s) for s in self.stop_strings if s in tail]
            end += min(hits) if hits else len(tail.rstrip())
            spans.append((offset, end))
        return full, spans

    def encode_conversation(self, messages):
        validate_messages(messages, ends_with=ASSISTANT)
        self._refuse_spelled_specials(messages)
        full, spans = self._assistant_spans(messages)
        ids, offsets = self._ids_and_offsets(full)
        labels = [IGNORE_INDEX] * len(ids)
        k = 0
        for i, (tok_start, tok_end) in enumerate(offsets):
            # A token is trained when it overlaps an assistant span (content or end-of-turn marker).
            while k < len(spans) and spans[k][1] <= tok_start:
                k += 1
            if k < len(spans) and tok_end > spans[k][0] and tok_start < spans[k][1]:
                labels[i] = ids[i]
        return list(ids), labels

    def encode_prompt(self, messages):
        validate_messages(messages, ends_with=HUMAN)
        self._refuse_spelled_specials(messages)
        text = self._render(messages, True)
        if markup_backend(self.tokenizer) is None:  # a slow tokenizer gives no offsets (and needs none here)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._ids_and_offsets(text)[0]

    def exchange_ends(self, messages):
        validate_messages(messages, ends_with=ASSISTANT)
        turns = self._replies(messages)
        uptos = self._render_many([messages[:j + 1] for j in turns], False)
        starts = [s for s, _ in self._ids_and_offsets(uptos[-1])[1]]
        return [sum(1 for s in starts if s < len(upto)) for upto in uptos]


def chat_template_sha256(tokenizer) -> str | None:
    """sha256 of the tokenizer's Jinja ``chat_template`` source (None: it has none); a dict of named templates is
    hashed as its sorted JSON."""
    source = getattr(tokenizer, "chat_template", None)
    if not source:
        return None
    if not isinstance(source, str):
        source = json.dumps(source, sort_keys=True)
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


_TEMPLATES = {"llama2": Llama2Template, "llama3": Llama3Template, "tokenizer": TokenizerTemplate}


def get_chat_template(name: str, tokenizer, system_message: str | None = None) -> ChatTemplate:
    """Template ``name`` (``llama2``, ``llama3`` or ``tokenizer``) bound to ``tokenizer``."""
    if name not in _TEMPLATES:
        raise UserInputError(f"unknown chat template {name!r} (expected one of {', '.join(TEMPLATE_NAMES)})")
    return _TEMPLATES[name](tokenizer, system_message)


def labelled_spans(labels: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` where ``labels != -100`` (the trained spans, in order)."""
    spans, start = [], None
    for i, lab in enumerate(labels):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(labels)))
    return spans
