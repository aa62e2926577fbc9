"""Sampling settings and (streaming) generation on top of ``model.generate``.

``generate_stream`` yields decoded text pieces as they are produced (a ``TextIteratorStreamer`` fed by a
background thread); ``generate_text`` is the plain, blocking path; ``generate_batch`` runs several prompts at once
(left-padded, the pads masked), for a file of prompts. All stop at ``stop_token_ids`` and the tokenizer's EOS, and
drop special tokens from the text.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import torch

from colossal_llama.utils.cli import flag
from colossal_llama.utils.errors import UserInputError


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
    return tokenizer.decode(generate_ids(model, tokenizer, input_ids, config), skip_special_tokens=True)


def generate_stream(model, tokenizer, input_ids: Sequence[int], config: SamplingConfig,
                    timeout_s: Optional[float] = None) -> Iterator[str]:
    """Yield the reply's text piece by piece while the model generates it.

    The concatenated pieces equal ``generate_text`` for the same (greedy) settings. An exception inside
    ``model.generate`` ends the stream and is re-raised here, so callers never hang on a dead worker.
    """
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout_s)
    kwargs = _generate_kwargs(model, tokenizer, [input_ids], config)
    failure: list = []

    def work():
        try:
            with torch.inference_mode():
                model.generate(**kwargs, streamer=streamer)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer thread below
            failure.append(err)
            streamer.end()

    worker = threading.Thread(target=work, name="generate", daemon=True)
    worker.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
    finally:
        worker.join()
    if failure:
        raise failure[0]
