"""Right-padded batches for scoring, and the log-probabilities of their scored tokens.

Evaluation runs without an attention mask: with right padding the causal mask already keeps every real token
from seeing the pads that follow it (``benchmarks/eval_forward_mask.py`` checks the logits are identical).

The LM head runs only where a token is scored, a chunk of positions at a time: the full (batch, length, vocab)
logits of a batch of 8 x 4096 tokens with a 128k vocabulary would take 16 GB in float32, a chunk of 1024
positions takes 0.5 GB, whatever the batch (``benchmarks/eval_memory.py``).
"""
from __future__ import annotations

from typing import Sequence

import torch

HEAD_CHUNK = 1024  # positions per LM-head call


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """(len(rows), longest) int64 tensor: row i is ``rows[i]`` followed by ``pad_id``."""
    out = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


@torch.inference_mode()
def target_logprobs(model, input_ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                    targets: torch.Tensor, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """``log p(targets[i] | input_ids[rows[i], :positions[i] + 1])`` for every i: shape (n,), float32, on the LM
    head's device. ``input_ids`` is (batch, length), right-padded; ``rows``, ``positions``, ``targets`` are (n,)."""
    hidden = model.get_decoder()(input_ids=input_ids.to(model.device))[0]
    picked = hidden[rows.to(hidden.device), positions.to(hidden.device)]
    head = model.get_output_embeddings()
    out = []
    for start in range(0, len(picked), chunk):
        logits = head(picked[start: start + chunk]).float()
        targets = targets.to(logits.device)
        # logsumexp, not log_softmax: on CPU, PyTorch's float32 log_softmax over the last dimension read SmolLM2's
        # log-probabilities 2e-5 high on average (against float64); logsumexp's average error is about 1e-8
        out.append(logits.gather(-1, targets[start: start + chunk, None])[:, 0] - torch.logsumexp(logits, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, device=hidden.device)
