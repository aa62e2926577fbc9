"""The causal-LM loss with the LM head run only where a token is scored, a chunk of positions at a time.

transformers' own loss computes the logits of every position, ``(batch, length, vocab)``, upcasts them to float32
and keeps a float32 log-softmax of that size for the backward pass: with LLaMA-3's 128,256-token vocabulary one
micro-batch of 8,192 tokens holds about 4 GiB of logits in each of several copies, more than the decoder's own
activations. Here the decoder's hidden states are gathered at the scored positions (labels not -100, shifted by
one as transformers does), and each chunk of ``chunk`` of them goes through the LM head and its negative
log-likelihood under activation checkpointing: the chunk's logits are freed as soon as its loss is summed and
recomputed in the backward pass, so at most one chunk of logits (``chunk x vocab``) exists at any time. Unscored
positions (a masked source, a prompt) never reach the LM head at all.

Each chunk's loss is transformers' own (float32 logits, ``cross_entropy``), so the loss and gradients are
transformers' up to the order of float additions. (Evaluation normalises with ``logsumexp`` instead, whose
value is closer to float64 on CPU; its gradient is not: measured on SmolLM2, the gradient reaching the hidden
states was 1.2e-5 from float64's with it, 1.4e-6 with ``cross_entropy``.)
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from colossal_llama.utils.labels import IGNORE_INDEX

# A chunk's float32 logits take at most this many elements (256 MiB) unless the caller picks the chunk itself
CHUNK_LOGIT_ELEMENTS = 1 << 26


def default_chunk_tokens(vocab_size: int) -> int:
    """Positions per LM-head call such that one chunk's float32 logits take at most 256 MiB (523 at a 128k
    vocabulary, 1,365 at 49k, 2,097 at 32k); never fewer than 1."""
    return max(1, CHUNK_LOGIT_ELEMENTS // vocab_size)


def _chunk_nll_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of -log p(targets[i] | hidden[i]); ``hidden`` is (n, hidden_size), the logits float32 as transformers'."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def scored_positions(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, positions, targets)``, each (n,): position p of row r predicts ``labels[r, p + 1]`` when that is
    not -100 (transformers' shift: the last position predicts nothing)."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    rows, positions = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, positions, shifted[rows, positions]


def scored_nll_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int) -> Tuple[torch.Tensor, int]:
    """(sum of the token losses, number of scored tokens) of a batch: ``hidden`` is the decoder's (batch, length,
    hidden_size) output, ``labels`` (batch, length) with -100 where nothing is scored. The LM head sees ``chunk``
    scored positions at a time; with gradients on, each chunk is recomputed in the backward pass instead of kept."""
    rows, positions, targets = scored_positions(labels.to(hidden.device))
    picked = hidden[rows, positions]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(picked), chunk):
        part = (picked[start: start + chunk], targets[start: start + chunk])
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_nll_sum, head, *part, use_reentrant=False)
        else:
            total = total + _chunk_nll_sum(head, *part)
    return total, len(picked)


# what transformers' causal-LM forward takes that its decoder does not
_HEAD_ONLY_KWARGS = ("logits_to_keep", "num_items_in_batch", "return_dict", "past_key_values", "cache_position")


def install_scored_loss(model: nn.Module, chunk: int) -> None:
    """Make ``model``'s forward (a transformers ``*ForCausalLM``) compute its loss with :func:`scored_nll_sum`
    when it is given ``labels``: it returns the mean token loss, as transformers does, and no logits. Without
    labels it is the model's own forward. Set on the instance, so wrappers around the model (DDP, ZeRO, gemini,
    peft) call it; a plugin that replaces the forward itself (colossalai's tensor/pipeline parallel) must not get
    it."""
    own_forward = model.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if labels is None:
            return own_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, **kwargs)
        for key in _HEAD_ONLY_KWARGS:
            kwargs.pop(key, None)
        kwargs["use_cache"] = False
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     inputs_embeds=inputs_embeds, **kwargs).last_hidden_state
        loss_sum, n_scored = scored_nll_sum(model.get_output_embeddings(), hidden, labels, chunk)
        return CausalLMOutputWithPast(loss=loss_sum / max(n_scored, 1), logits=None)

    model.forward = forward
