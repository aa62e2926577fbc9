"""The training loss on scored positions, a chunk at a time (colossal_llama/model/scored_loss.py).

It must be transformers' loss (value and gradients) on real packed batches, while never holding more than one
chunk of logits: the LM head sees scored positions only, at most ``chunk`` per call, and each chunk's logits are
recomputed in the backward pass rather than kept.
"""
from __future__ import annotations

import math

import pytest
import torch

from colossal_llama.model.scored_loss import default_chunk_tokens, install_scored_loss
from colossal_llama.training.collate import PackedCollator, count_loss_tokens
from colossal_llama.training.data import collect_parts, expand_dataset_args, load_prepared
from colossal_llama.training.model import choose_loss


def _real_batch(prepared, rows: int = 3) -> dict:
    """The first ``rows`` packed sequences of the real prepared data (sources and padding at -100)."""
    parts, manifests = collect_parts(expand_dataset_args([str(prepared / "arrow")]))
    data = load_prepared(parts, manifests)
    batch = PackedCollator(pad_token_id=0, max_length=128)([data.dataset[i] for i in range(rows)])
    batch["labels"][0, :20] = -100  # a masked stretch inside a row, as a source or a prompt makes
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels")}


def _loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")


@pytest.mark.parametrize("chunk", [64, 100_000])
def test_the_scored_loss_is_transformers_loss_with_its_gradients(prepared_pretrain, smollm2_dir, chunk):
    """The real SmolLM2-135M (its losses are far from uniform, so a position scored wrongly shows), in chunks of
    64 scored positions (6 LM-head calls) and in one."""
    batch = _real_batch(prepared_pretrain)
    model = _model(smollm2_dir)
    expected, expected_grads = _loss_and_grads(model, batch)
    install_scored_loss(model, chunk)
    loss, grads = _loss_and_grads(model, batch)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-6)
    for name, grad in grads.items():  # the tied embedding / LM head included
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert model(**batch).logits is None  # the whole point: no (tokens x vocab) logits come back


def test_the_lm_head_sees_scored_positions_only_a_chunk_at_a_time(prepared_pretrain, tiny_llama):
    batch = _real_batch(prepared_pretrain)
    scored = count_loss_tokens(batch["labels"])
    model, chunk = _model(tiny_llama), 64
    tokens, vocab = batch["input_ids"].numel(), len(model.get_output_embeddings().weight)
    assert scored < tokens - 20  # the batch really has unscored positions
    install_scored_loss(model, chunk)
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda mod, args, out: calls.append(len(args[0])))
    largest_saved = []

    def pack(t):
        largest_saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    n_chunks = math.ceil(scored / chunk)
    assert calls == [chunk] * (n_chunks - 1) + [scored - chunk * (n_chunks - 1)]
    # nothing of logits' size is kept for the backward pass (transformers keeps (tokens x vocab) several times)
    assert max(largest_saved) < chunk * vocab
    loss.backward()
    assert len(calls) == 2 * n_chunks  # every chunk's logits were recomputed, not kept

    # The control: transformers' own loss saves the full logits, so the measurement above can fail
    del largest_saved[:]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _model(tiny_llama)(**batch).loss
    assert max(largest_saved) >= tokens * vocab


def test_without_labels_the_model_returns_its_logits(prepared_pretrain, tiny_llama):
    batch = _real_batch(prepared_pretrain)
    batch.pop("labels")
    model = _model(tiny_llama).eval()
    with torch.no_grad():
        expected = model(**batch).logits
        install_scored_loss(model, 16)
        torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=0)


def test_which_loss_trains():
    assert choose_loss(None, liger=False, forward_is_the_models=True, vocab_size=128_256) == ("scored_chunks", 523)
    assert default_chunk_tokens(49_152) == 1365 and default_chunk_tokens(1 << 30) == 1
    assert choose_loss(64, liger=False, forward_is_the_models=True, vocab_size=32_000) == ("scored_chunks", 64)
    assert choose_loss(0, liger=False, forward_is_the_models=True, vocab_size=32_000) == ("transformers", 0)
    assert choose_loss(None, liger=True, forward_is_the_models=True, vocab_size=32_000) == ("liger", 0)
    assert choose_loss(64, liger=False, forward_is_the_models=False, vocab_size=32_000) == ("colossalai", 0)


def test_a_micro_batch_with_nothing_to_score_still_reaches_every_parameter(prepared_pretrain, tiny_llama):
    """The step's zero loss for such a micro-batch must still give every trainable parameter a gradient (DDP
    waits for all of them), though the chunked loss returns no logits to build it from."""
    from colossal_llama.training.step import Stepper

    batch = _real_batch(prepared_pretrain)
    batch["labels"][:] = -100
    model = _model(tiny_llama)
    install_scored_loss(model, 16)
    stepper = Stepper(booster=None, model=model, optimizer=None, scheduler=None, parallel=None,
                      device=torch.device("cpu"), grad_clip=1.0)
    loss = stepper._loss_sum(model(**batch), count_loss_tokens(batch["labels"]))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_the_loss_tokens_are_the_positions_transformers_loss_averages_over(prepared_pretrain):
    """The training step turns transformers' mean loss into a sum with ``count_loss_tokens``: it must count exactly
    the labels the shifted causal-LM loss scores (a label at position 0 predicts nothing and is not counted), so that
    mean x count is the sum of the token losses, on a real batch whose rows here start with a trained label."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    batch = _real_batch(prepared_pretrain)
    labels = batch["labels"].clone()
    labels[:, 0] = batch["input_ids"][:, 0]  # as a dataset prepared elsewhere may give
    vocab = int(batch["input_ids"].max()) + 1
    logits = torch.randn(*labels.shape, vocab, generator=torch.Generator().manual_seed(0))
    n = count_loss_tokens(labels)
    assert 0 < n < labels.numel() - 20
    mean, total = ForCausalLMLoss(logits, labels, vocab), ForCausalLMLoss(logits, labels, vocab, num_items_in_batch=1)
    assert math.isclose(mean.item() * n, total.item(), rel_tol=1e-5)
