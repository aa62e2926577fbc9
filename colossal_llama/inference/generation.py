"""Sampling settings and (streaming) generation on top of ``model.generate``.

``generate_stream`` yields decoded text pieces as they are produced (a background thread runs ``generate``; the
consumer decodes the whole reply so far at each step and yields what is new, :class:`ReplyText`) and can be
cancelled (closing the generator stops ``generate`` at its next token); ``generate_text`` is the plain, blocking
path; ``generate_batch`` runs several prompts at once (left-padded, the pads masked), for a file of prompts.
All stop at ``stop_token_ids`` and the tokenizer's EOS, and drop special tokens from the text.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import torch

from colossal_llama.utils.cli import flag
from colossal_llama.utils.errors import UserInputError

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """How to pick the next token. ``do_sample=False`` is greedy and ignores temperature/top_k/top_p. The fields
    made with ``flag`` are the sampling flags of every command that generates (this class *is* them)."""

    max_new_tokens: int = flag(512, help="tokens generated at most per reply")
    do_sample: bool = flag(True, help="True = sample, False = greedy")
    temperature: float = flag(0.3, help="sampling temperature")
    top_k: int = flag(50, help="sample among the k likeliest tokens (0: all)")
    top_p: float = flag(0.95, help="sample among the likeliest tokens that make up this probability")
    repetition_penalty: float = flag(1.0, help="> 1 makes tokens already in the prompt or reply less likely "
                                               "(CTRL-style; 1.0 = off); applies to greedy decoding too")
    stop_token_ids: List[int] = field(default_factory=list)  # extra ids that end generation (besides EOS); no flag

    def validate(self) -> "SamplingConfig":
        if self.max_new_tokens < 1:
            raise UserInputError(f"--max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise UserInputError(f"--temperature: must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise UserInputError(f"--top_k: must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserInputError(f"--top_p: must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise UserInputError(f"--repetition_penalty: must be > 0 (1.0 = off), got {self.repetition_penalty}")
        return self


class RepetitionPenaltyPastPads:
    """CTRL's repetition penalty (as transformers' ``repetition_penalty``: a seen token's logit divided by the
    penalty when positive, multiplied when negative) over each row's real tokens only. transformers' own penalises
    every id in the row, left pads included: with pad = EOS, a padded prompt would be pushed away from stopping.

    ``pads``: (batch,) number of left pads of each row."""

    def __init__(self, penalty: float, pads: torch.Tensor):
        self.penalty, self.pads = penalty, pads

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        real = positions[None, :] >= self.pads[:, None]
        seen = torch.where(real, input_ids, input_ids[:, -1:])  # a pad stands for the row's last token, a real one
        logits = scores.gather(1, seen)
        return scores.scatter(1, seen, torch.where(logits < 0, logits * self.penalty, logits / self.penalty))


def _generate_kwargs(model, tokenizer, prompts: Sequence[Sequence[int]], config: SamplingConfig) -> dict:
    """Arguments for ``model.generate`` for a batch of prompts, left-padded to the longest (one prompt: no pad);
    the attention mask hides the pads, from which ``generate`` also counts the positions."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stop_ids = list(dict.fromkeys([*config.stop_token_ids, *eos]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    kwargs = dict(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample,
        eos_token_id=stop_ids or None,
        pad_token_id=pad_id,
        repetition_penalty=1.0,
    )
    if config.repetition_penalty != 1.0:
        from transformers import LogitsProcessorList

        pads = (width - torch.tensor([len(prompt) for prompt in prompts])).to(model.device)
        kwargs["logits_processor"] = LogitsProcessorList([RepetitionPenaltyPastPads(config.repetition_penalty, pads)])
    if config.do_sample:
        kwargs.update(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
    else:  # explicit neutral values: silence warnings from a model's own sampling-flavoured generation_config
        kwargs.update(temperature=None, top_k=None, top_p=None)
    return kwargs


def generate_ids(model, tokenizer, input_ids: Sequence[int], config: SamplingConfig) -> List[int]:
    """Blocking generation: the new token ids (prompt excluded, stop token included when one was hit)."""
    with torch.inference_mode():
        out = model.generate(**_generate_kwargs(model, tokenizer, [input_ids], config))
    return out[0, len(input_ids):].tolist()


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> List[int]:
    """The generated ids before the first stop id (what ``generate`` pads a finished row with is never text)."""
    stops = set(stop_ids)
    for i, token_id in enumerate(ids):
        if token_id in stops:
            return list(ids[:i])
    return list(ids)


def generate_batch(model, tokenizer, prompts: Sequence[Sequence[int]], config: SamplingConfig) -> List[List[int]]:
    """Blocking generation for several prompts at once: per prompt, its new token ids before the first stop id.
    Greedy replies are those of :func:`generate_ids` one prompt at a time (tested); sampled ones draw differently."""
    kwargs = _generate_kwargs(model, tokenizer, prompts, config)
    with torch.inference_mode():
        out = model.generate(**kwargs)
    width = kwargs["input_ids"].shape[1]
    return [cut_at_stop(row, kwargs["eos_token_id"] or []) for row in out[:, width:].tolist()]


def generate_text(model, tokenizer, input_ids: Sequence[int], config: SamplingConfig) -> str:
    """Blocking generation decoded to text without special tokens."""
    return decode_reply(tokenizer, generate_ids(model, tokenizer, input_ids, config))


def decode_reply(tokenizer, ids: Sequence[int]) -> str:
    """The text of generated ``ids``: special tokens dropped, and no ``clean_up_tokenization_spaces`` (a BERT-era
    rewrite, on in many hub tokenizers, that turns ``a . b`` into ``a. b`` in code and changes text already streamed:
    ``do n`` became ``don't`` once the next token came)."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class ReplyText:
    """The text of a reply that grows a few tokens at a time, handed out as the pieces not handed out yet.

    Invariant: the pieces returned by :meth:`add` and :meth:`finish` join to :func:`decode_reply` of all ids,
    exactly what :func:`generate_text` returns. Why the whole reply is decoded at each
    step: a SentencePiece (LLaMA, Mistral) decoder drops the leading space of the first token it decodes, so
    decoding the tokens after a newline on their own (as transformers' ``TextIteratorStreamer`` does) loses one
    indentation space per line. A trailing U+FFFD is held back: it is a multi-byte character whose other bytes are
    still to come. Decoding the whole reply each step costs O(reply length) per token: negligible next to the model.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def add(self, ids: Sequence[int]) -> str:
        """The new text after ``ids`` joined the reply ("" while it ends inside a character)."""
        self.ids.extend(ids)
        return self._advance(self._decode().rstrip("\ufffd"))

    def finish(self) -> str:
        """The rest of the reply, held-back characters included (a reply cut inside a character ends in U+FFFD,
        as its blocking decode does)."""
        return self._advance(self._decode(), final=True)

    def _decode(self) -> str:
        return decode_reply(self.tokenizer, self.ids)

    def _advance(self, text: str, final: bool = False) -> str:
        if not text.startswith(self.emitted):  # the decoder rewrote earlier text: wait until it is a prefix again
            if not final:
                return ""
            log.warning("the streamed reply differs from its decoded text (the tokenizer rewrote earlier text)")
            common = len(os.path.commonprefix([text, self.emitted]))
            piece, self.emitted = text[common:], text  # nothing after the rewrite is lost
            return piece
        piece, self.emitted = text[len(self.emitted):], text
        return piece


class _TokenQueue:
    """``generate``'s streamer (the ``put``/``end`` of transformers' ``BaseStreamer``): hands each step's new token
    ids to the consuming thread; ``None`` marks the end. ``generate`` puts the prompt first: skipped."""

    def __init__(self):
        self.queue: "queue.Queue[Optional[List[int]]]" = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


class StopWhenSet:
    """A ``StoppingCriteria`` that ends generation at the next token once ``event`` is set (the reader of the
    stream went away: Ctrl-C, a closed web page). Without it ``generate`` would run to ``max_new_tokens`` for
    nobody, holding the GPU (and the web chat's lock)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def generate_stream(model, tokenizer, input_ids: Sequence[int], config: SamplingConfig,
                    timeout_s: Optional[float] = None) -> Iterator[str]:
    """Yield the reply's text piece by piece while the model generates it.

    The concatenated pieces equal ``generate_text`` for the same (greedy) settings (:class:`ReplyText`). An
    exception inside ``model.generate`` ends the stream and is re-raised here, so callers never hang on a dead
    worker. Leaving the loop early (``close()``, an exception such as ``KeyboardInterrupt`` or a broken pipe in the
    consumer) stops ``generate`` at its next token before this returns. ``timeout_s``: longest wait for one token.
    """
    from transformers import StoppingCriteriaList

    tokens, cancel, text = _TokenQueue(), threading.Event(), ReplyText(tokenizer)
    kwargs = _generate_kwargs(model, tokenizer, [input_ids], config)
    kwargs["stopping_criteria"] = StoppingCriteriaList([StopWhenSet(cancel)])
    failure: list = []

    def work():
        try:
            with torch.inference_mode():
                model.generate(**kwargs, streamer=tokens)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer thread below
            failure.append(err)
            tokens.end()

    worker = threading.Thread(target=work, name="generate", daemon=True)
    worker.start()
    try:
        while (ids := tokens.queue.get(timeout=timeout_s)) is not None:
            if piece := text.add(ids):
                yield piece
        if failure:
            raise failure[0]
        if piece := text.finish():
            yield piece
    finally:
        cancel.set()  # a consumer that stopped early: generate ends at its next token instead of max_new_tokens
        worker.join()
