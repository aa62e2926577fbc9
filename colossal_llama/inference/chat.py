"""A multi-turn chat with a model: history of whole turns, trimmed from the oldest when it outgrows the context."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Iterable, Iterator, List, Optional

from colossal_llama.dataset.chat_templates import ASSISTANT, HUMAN, SYSTEM, validate_messages
from colossal_llama.inference.generation import SamplingConfig, generate_stream
from colossal_llama.inference.loading import context_length
from colossal_llama.utils.errors import UserInputError

log = logging.getLogger(__name__)

Message = dict  # {"from": "system" (first only) | "human" | "assistant", "content": str}


def _blank_reply(message) -> bool:
    return (isinstance(message, dict) and message.get("from") == ASSISTANT and isinstance(message.get("content"), str)
            and not message["content"].strip())


def check_conversation(messages) -> None:
    """Raise a located :class:`UserInputError` (``messages[3].from: ...``) unless ``messages`` is an optional system
    message, then human, assistant, ..., human. A blank assistant reply passes here (the model can end its turn at
    once; :func:`drop_empty_exchanges` forgets that exchange) -- checked in its place, so the indices in an error are
    those of the conversation as sent."""
    if isinstance(messages, list):
        messages = [{**m, "content": "(blank reply)"} if _blank_reply(m) else m for m in messages]
    validate_messages(messages, ends_with=HUMAN)


def drop_empty_exchanges(messages: List[Message], template=None) -> tuple:
    """Check the conversation (:func:`check_conversation`), then remove the human+assistant exchanges whose reply
    is blank (templates reject empty turns) or, given the ``template``, spells one of its special tokens (a reply
    the model wrote out of ordinary pieces, which the template would read as a control token); a system message
    stays first. Returns ``(messages, dropped)``."""
    check_conversation(messages)
    system, turns = split_off_system(messages)
    kept = []
    for k in range(0, len(turns), 2):
        exchange = turns[k: k + 2]  # the last one is the pending human turn alone
        reply = exchange[-1]
        unusable = _blank_reply(reply) or (
            template is not None and reply["from"] == ASSISTANT
            and template.spelled_special_token(reply["content"]) is not None)
        if not unusable:
            kept.extend(exchange)
    return system + kept, (len(turns) - len(kept)) // 2


def without_reply_prefix(pieces: Iterable[str], prefix: str) -> Iterator[str]:
    """The streamed ``pieces`` of a reply less the template's ``reply_prefix`` they start with: the model generates
    it (it was trained as the reply's start) but it belongs to the template, which writes it again when the history
    is rendered: kept, every later prompt would differ from the training format by one more space per reply."""
    held, deciding = "", True
    for piece in pieces:
        if deciding:
            held += piece
            if prefix.startswith(held) and held != prefix:
                continue  # not enough text yet to tell
            piece, deciding = held[len(prefix):] if held.startswith(prefix) else held, False
        if piece:
            yield piece


def split_off_system(messages: List[Message]) -> tuple:
    """``([system message] or [], turns)``: the turns start with a human one, so exchanges are ``turns[2k:2k+2]``."""
    first = 1 if messages and messages[0].get("from") == SYSTEM else 0
    return list(messages[:first]), list(messages[first:])


def fit_history(template, messages: List[Message], budget: int) -> tuple:
    """Drop the oldest human+assistant exchanges until the prompt for ``messages`` has at most ``budget`` tokens.

    ``messages`` is an optional system message (always kept) and turns ending with a human one. Returns
    ``(prompt_ids, kept_messages, dropped_exchanges)``. Raises :class:`UserInputError` when even the last human
    turn alone does not fit.
    """
    system, turns = split_off_system(messages)
    dropped = 0
    while True:
        ids = template.encode_prompt(system + turns)
        if len(ids) <= budget:
            return ids, system + turns, dropped
        if len(turns) <= 1:
            raise UserInputError(
                f"the message needs {len(ids)} prompt tokens but only {budget} fit in the context "
                "(shorten it or lower --max_new_tokens)"
            )
        turns, dropped = turns[2:], dropped + 1


class ChatSession:
    """Conversation state for one user: ``add_user(text)`` then ``stream_reply()``; ``history`` is the transcript.

    Generation stops at the template's ``stop_token_ids``. Before each reply the history is trimmed by whole
    exchanges so that prompt + ``max_new_tokens`` fits in ``max_context`` (default: the model's positions).
    """

    def __init__(self, model, tokenizer, template, sampling: SamplingConfig, max_context: Optional[int] = None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        stops = list(dict.fromkeys([*sampling.stop_token_ids, *template.stop_token_ids]))
        self.sampling = replace(sampling, stop_token_ids=stops)
        self.max_context = max_context or context_length(model)
        self.history: List[Message] = []
        self.dropped_exchanges = 0  # exchanges trimmed to fit the context
        self.empty_replies = 0  # exchanges forgotten because the reply was empty
        self.unkept_replies = 0  # ... because the reply spells a special token of the template

    def add_user(self, text: str) -> None:
        if self.history and self.history[-1]["from"] == "human":
            raise UserInputError("add_user: the previous message has no reply yet")
        self.history.append({"from": "human", "content": text})

    def forget_pending(self) -> None:
        """Remove the human turn that has no reply (its reply failed or was interrupted), so the next
        ``add_user`` starts a fresh exchange."""
        if self.history and self.history[-1]["from"] == "human":
            self.history.pop()

    def prompt_ids(self) -> List[int]:
        """Prompt for the pending human turn, trimming ``history`` in place when it is too long."""
        if not self.history or self.history[-1]["from"] != "human":
            raise UserInputError("stream_reply: call add_user first")
        budget = self.max_context - self.sampling.max_new_tokens
        ids, self.history, dropped = fit_history(self.template, self.history, budget)
        if dropped:
            self.dropped_exchanges += dropped
            log.info("context full: dropped the %d oldest exchange(s), %d prompt tokens now", dropped, len(ids))
        return ids

    def stream_reply(self) -> Iterator[str]:
        """Yield the assistant's reply piece by piece; when it ends, the reply is appended to ``history``."""
        pieces = []
        stream = generate_stream(self.model, self.tokenizer, self.prompt_ids(), self.sampling)
        for piece in without_reply_prefix(stream, self.template.reply_prefix):
            pieces.append(piece)
            yield piece
        reply = "".join(pieces)
        spelled = self.template.spelled_special_token(reply)
        if reply.strip() and spelled is None:
            self.history.append({"from": "assistant", "content": reply})
        elif spelled is not None:  # the template would read it as a control token in every later prompt
            self.history.pop()
            self.unkept_replies += 1
            log.warning("the reply spells the special token %r; that exchange is not kept in the history", spelled)
        else:  # an empty turn cannot be re-encoded by the template: forget the whole exchange, and say so
            self.history.pop()
            self.empty_replies += 1
            log.warning("the model gave an empty reply; that exchange is not kept in the history")

    def reply(self, text: str) -> str:
        """Convenience: ``add_user(text)`` and return the whole reply."""
        self.add_user(text)
        return "".join(self.stream_reply())
