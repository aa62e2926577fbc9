"""Attention for packed sequences: which implementation trains, and FlexAttention with a document mask.

A packed row holds several documents; ``position_ids`` restart at 0 at each one (padding is one more trailing
"document", see :mod:`colossal_llama.training.collate`). Every implementation keeps documents apart:

- ``flash_attention_2`` (flash-attn installed, CUDA): varlen kernels from ``position_ids``, no mask tensor;
- ``flex_attention`` (PyTorch >= 2.5, CUDA): a :class:`~torch.nn.attention.flex_attention.BlockMask` built from
  ``position_ids`` on the device at every forward. Blocks of the (query, key) grid that lie across documents are
  skipped, so packed short documents cost less than one long causal row, not more;
- ``sdpa``: a dense ``(B, 1, L, L)`` block-diagonal causal mask from the collator. Correct everywhere, but a dense
  mask moves SDPA off its flash kernel onto the slower masked one.

``--attention auto`` picks the first of these that the machine has (CPU: sdpa). PyTorch's FlexAttention has no
backward on CPU, so ``flex`` trains on CUDA only; its forward runs on CPU, which is how the tests compare it with
the sdpa mask path.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch
from torch import nn

from colossal_llama.training.collate import document_ids
from colossal_llama.training.config import ATTENTION_CHOICES
from colossal_llama.utils.errors import UserInputError

log = logging.getLogger(__name__)

FLASH, FLEX, SDPA = "flash_attention_2", "flex_attention", "sdpa"


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flex_attention_available() -> bool:
    """PyTorch >= 2.5 ships ``torch.nn.attention.flex_attention``."""
    try:
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    except ModuleNotFoundError:
        return False


def choose_attention(requested: str, cuda: bool, use_flash_attn: bool = False, dense_mask_only: bool = False) -> str:
    """The transformers ``attn_implementation`` for ``--attention requested`` (``--use_flash_attn`` = ``flash``).

    ``flash`` never fails: without flash-attn (or CUDA) it falls back, with a warning, to the fastest path that
    keeps documents apart (flex on CUDA, sdpa on CPU), as ``--use_flash_attn`` always did. ``flex`` is refused where
    it cannot train (no CUDA, or a PyTorch without FlexAttention). ``dense_mask_only``: colossalai's pipeline and
    sequence-parallel forwards replace the model's own and take the dense mask only, so sdpa it is.
    """
    if requested not in ATTENTION_CHOICES:
        raise UserInputError(f"--attention {requested}: expected one of {', '.join(ATTENTION_CHOICES)}")
    if use_flash_attn:
        if requested not in ("auto", "flash"):
            raise UserInputError(f"--use_flash_attn asks for flash attention but --attention is {requested}")
        requested = "flash"
    if dense_mask_only:
        if requested in ("flash", "flex"):
            raise UserInputError(f"--attention {requested} with --pp > 1 or sequence parallelism: colossalai's "
                                 "pipeline / sequence-parallel forwards take the dense mask only; use --attention sdpa")
        return SDPA
    if requested == "sdpa":
        return SDPA
    if requested == "flex":
        if not flex_attention_available():
            raise UserInputError(f"--attention flex: this PyTorch ({torch.__version__}) has no FlexAttention (>= 2.5)")
        if not cuda:
            raise UserInputError("--attention flex needs CUDA: PyTorch's FlexAttention has no backward on CPU "
                                 "(use --attention sdpa or auto)")
        return FLEX
    if cuda and flash_attn_installed():
        return FLASH
    fallback = FLEX if cuda and flex_attention_available() else SDPA
    if requested == "flash":
        why = "no CUDA device" if not cuda else "the flash_attn package is not installed"
        log.warning("--attention flash: %s, using %s (documents stay apart)", why, fallback)
    return fallback


def needs_dense_mask(attn_implementation: str) -> bool:
    """Whether the collator must build the (B, 1, L, L) block-diagonal mask (flash and flex derive their own)."""
    return attn_implementation not in (FLASH, FLEX)


# ---------------------------------------------------------------------------------------------- flex attention
def document_block_mask(position_ids: torch.Tensor):
    """(B, L) position ids -> a FlexAttention ``BlockMask`` on their device: query i sees key j iff j <= i and both
    belong to the same document (the same rule as :func:`colossal_llama.training.collate.block_causal_mask`)."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = document_ids(position_ids)

    def same_document_causal(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[batch, q_idx] == docs[batch, kv_idx])

    batch, length = position_ids.shape
    return create_block_mask(same_document_causal, batch, None, length, length, device=position_ids.device)


_COMPILED_FLEX = None


def _flex_kernel(device: torch.device):
    """Compiled FlexAttention on CUDA (the eager one materialises every score); eager on CPU, where inductor's
    FlexAttention supports neither backward nor what training needs, and the tests only run forward."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def flex_document_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask, scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """transformers attention interface: (B, H, L, D) query/key/value -> ((B, L, H, D) output, None).

    ``attention_mask`` is the BlockMask of :func:`document_block_mask` (set by :func:`install_document_mask`).
    """
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(attention_mask, BlockMask):
        raise ValueError("flex document attention needs the BlockMask built from position_ids "
                         f"(install_document_mask); got {type(attention_mask).__name__}")
    if dropout > 0:
        raise ValueError(f"flex document attention has no attention dropout (got {dropout})")
    heads, kv_heads = query.shape[1], key.shape[1]
    # Grouped-query attention shares K/V between query heads; as transformers does, repeat K/V instead when the
    # query heads are not a power of two (SmolLM2: 9 heads over 3 K/V heads).
    enable_gqa = heads != kv_heads
    if enable_gqa and heads & (heads - 1):
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
        enable_gqa = False
    out = _flex_kernel(query.device)(query, key, value, block_mask=attention_mask, scale=scaling,
                                     enable_gqa=enable_gqa)
    return out.transpose(1, 2).contiguous(), None


def _document_mask_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the decoder (``LlamaModel``): turn ``position_ids`` into the BlockMask."""
    if kwargs.get("attention_mask") is not None:
        raise ValueError("flex document attention builds its mask from position_ids: pass no attention_mask")
    position_ids = kwargs.get("position_ids")
    if position_ids is None:  # no packing information: one document per row (plain causal)
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if tokens is None:
            tokens = args[0]
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
    kwargs["attention_mask"] = document_block_mask(position_ids)
    return args, kwargs


def install_document_mask(model: nn.Module):
    """Route ``flex_attention`` to :func:`flex_document_attention` and build the mask from ``position_ids`` at every
    forward of ``model``'s decoder. The model must have been loaded with ``attn_implementation="flex_attention"``.
    Returns the hook handle."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if model.config._attn_implementation != FLEX:
        raise ValueError(f"install_document_mask: the model uses {model.config._attn_implementation}, not {FLEX}")
    ALL_ATTENTION_FUNCTIONS[FLEX] = flex_document_attention
    return model.base_model.register_forward_pre_hook(_document_mask_hook, with_kwargs=True)
