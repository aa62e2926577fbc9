"""Building the model for training: Liger kernels, loading (with its attention), freezing, NEFTune."""
from __future__ import annotations

import importlib.util
import logging
import math
from typing import Optional
from unittest import mock

import numpy as np
import torch
from torch import nn

from colossal_llama.model.scored_loss import default_chunk_tokens

log = logging.getLogger(__name__)

EMBEDDING_MODULES = ("embed_tokens", "lm_head")


def apply_liger_kernels(mode: str, cuda: bool, forward_is_the_models: bool = True) -> bool:
    """Patch transformers' LLaMA with Liger's fused Triton kernels; returns whether they are on.

    Fused linear cross-entropy never materialises the (tokens x vocab) logits in training, which is most of
    the memory and time it saves at vocab 32k-128k. Must run before the model is built. Triton kernels need
    CUDA: on CPU this is always off, and ``on`` without CUDA or liger_kernel is a one-line error. Tensor, pipeline
    and sequence parallelism replace the model's forward and loss with colossalai's (``forward_is_the_models``
    False): the fused loss never runs there and Liger's patched modules under colossalai's sharding are untested,
    so ``auto`` is off and ``on`` is refused.
    """
    from colossal_llama.utils.errors import UserInputError

    available = cuda and importlib.util.find_spec("liger_kernel") is not None
    if mode == "off" or (mode == "auto" and not (available and forward_is_the_models)):
        return False
    if not available:
        raise UserInputError("--liger on: needs CUDA and the liger_kernel package")
    if not forward_is_the_models:
        raise UserInputError("--liger on: tensor, pipeline and sequence parallelism run colossalai's forward and "
                             "loss, which Liger's fused loss does not reach; use --liger off (auto is off there)")
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True)
    log.info("Liger fused kernels on (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)")
    return True


# RunPlan.loss: which code computes the loss, and how the run's log names it
LOSSES = {"liger": "Liger fused linear cross-entropy", "colossalai": "colossalai's vocabulary-parallel",
          "transformers": "transformers' (full logits)", "scored_chunks": "on scored positions"}


def choose_loss(chunk_tokens: Optional[int], liger: bool, forward_is_the_models: bool,
                vocab_size: int) -> tuple[str, int]:
    """``(loss, chunk)``: which of :data:`LOSSES` trains, and for ``scored_chunks`` the positions per LM-head call
    (:mod:`colossal_llama.model.scored_loss`; 0 otherwise). Liger's fused loss and colossalai's vocabulary-parallel
    one (tensor/pipeline/sequence parallelism replace the model's forward) come first; ``--loss_chunk_tokens 0``
    keeps transformers' loss over the full logits."""
    if liger:
        loss = "liger"
    elif not forward_is_the_models:
        loss = "colossalai"
    elif chunk_tokens == 0:
        loss = "transformers"
    else:
        loss = "scored_chunks"
    if chunk_tokens and loss != "scored_chunks":
        log.warning("--loss_chunk_tokens %d has no effect: the %s loss trains", chunk_tokens, loss)
    if loss != "scored_chunks":
        return loss, 0
    return loss, chunk_tokens or default_chunk_tokens(vocab_size)


def load_causal_lm(pretrained: str, attn_implementation: str, dtype: torch.dtype = torch.float32,
                   device: Optional[torch.device] = None, lazy: bool = False) -> nn.Module:
    """The model in ``dtype`` (:attr:`~colossal_llama.training.plugin.Parallelism.param_dtype`). With flex
    attention its decoder builds the document mask from ``position_ids`` (:mod:`colossal_llama.training.attention`).

    ``lazy=False``: the weights are read now, one safetensors file at a time, straight onto ``device`` (default
    the CPU): every rank holds the whole model there (2 bytes a parameter in bf16: 14 GB for 7B, in each process).
    ``lazy=True``: the model is built from its config under colossalai's ``LazyInitContext``: no tensor is
    allocated here; a plugin that shards the parameters (``3d``, ``gemini``) materialises each rank's part on
    ``device`` when it boosts the model, and the caller must then read the weights into it
    (:meth:`~colossal_llama.training.checkpoint.Checkpointer.load_weights`: one file at a time).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from colossal_llama.training.attention import FLEX, install_document_mask

    if not lazy:
        # Built empty, then filled from the files (nothing initialised only to be overwritten); with a device, each
        # file's tensors go straight there
        placement = {"device_map": {"": str(device)}} if device is not None else {"low_cpu_mem_usage": True}
        model = AutoModelForCausalLM.from_pretrained(pretrained, torch_dtype=dtype,
                                                     attn_implementation=attn_implementation, **placement)
    else:
        from colossalai.lazy import LazyInitContext
        from transformers.modeling_utils import no_init_weights

        config = AutoConfig.from_pretrained(pretrained)
        # No initialisation: materialising a part only allocates it (every weight is read in after; a missing one is
        # an error there). That includes nn.Embedding zeroing its padding row, an indexed write that colossalai
        # materialises at once: the whole embedding on every rank (4.2 GB for LLaMA-3-70B's in fp32).
        no_padding_fill = mock.patch.object(nn.Embedding, "_fill_padding_idx_with_zero", lambda self: None)
        with LazyInitContext(default_device=device), no_init_weights(), no_padding_fill:
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype,
                                                     attn_implementation=attn_implementation)
            model.tie_weights()  # skipped with the initialisation; the plugins keep ties they are given
    if attn_implementation == FLEX:
        install_document_mask(model)
    return model


def holds_no_weights(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` is a lazy tensor not yet materialised (built by ``lazy=True``)."""
    from colossalai.lazy.lazy_init import LazyTensor

    params = list(model.parameters())
    return bool(params) and all(isinstance(p, LazyTensor) and p._materialized_data is None for p in params)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def freeze_non_embeddings(model: nn.Module) -> int:
    """Leave only embed_tokens / lm_head trainable; returns the number of trainable parameters."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(any(part in name for part in EMBEDDING_MODULES))
        trainable += param.numel() if param.requires_grad else 0
    return trainable


class NEFTune:
    """Uniform noise on the input embeddings while training (Jain et al. 2023), none in eval mode.

    noise ~ U(-m, m) with m = alpha / sqrt(L * d), L the padded sequence length and d the hidden size.
    The noise is a pure function of (seed, data-parallel rank, optimizer step, micro-batch): :meth:`start_step`
    is called at every step, the k-th embedding forward of the step is micro-batch k, and the draws come from a
    generator of its own, never from torch's global RNG. So a resumed run draws exactly the noise the uninterrupted run drew, whatever else consumed random
    numbers in between, and tensor-parallel peers (same dp rank, same data) add the same noise.
    """

    def __init__(self, alpha: float, seed: int, dp_rank: int):
        self.alpha, self.seed, self.dp_rank = alpha, seed, dp_rank
        self._key = (0, 0)
        self._generators: dict = {}

    def start_step(self, step: int) -> None:
        self._key = (step, 0)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        # an independent stream for every (seed, dp rank, step, micro-batch)
        key = np.random.SeedSequence([self.seed, self.dp_rank, *self._key]).generate_state(1, np.uint64)[0]
        gen.manual_seed(int(key) >> 1)
        return gen

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        magnitude = self.alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        noise = torch.rand(output.shape, generator=self._generator(output.device), device=output.device,
                           dtype=torch.float32)
        self._key = (self._key[0], self._key[1] + 1)
        return output + ((noise * 2 - 1) * magnitude).to(output.dtype)

    def attach(self, model: nn.Module):
        return model.get_input_embeddings().register_forward_hook(self)
