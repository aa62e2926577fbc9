"""Attention for packed documents (colossal_llama.training.attention), on CPU.

Specification:
- FlexAttention with the document BlockMask built from ``position_ids`` computes exactly what SDPA computes with
  the collator's dense block-diagonal causal mask: for grouped (4 heads / 2 K/V), non-power-of-two grouped
  (SmolLM2's 9 / 3) and plain multi-head attention, and through a whole model on a real packed batch with padding
  (logits and loss). Forward only: PyTorch's FlexAttention has no backward on CPU; tests/test_cuda.py trains it.
- ``--attention auto|flash|flex|sdpa`` (and the older ``--use_flash_attn``) resolve as documented: auto is sdpa on
  CPU and flex on CUDA without flash-attn; a flash request never fails, it falls back with a warning; flex is
  refused on CPU with one line; contradictory flags are a user error.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from colossal_llama.training import attention
from colossal_llama.training.attention import (FLASH, FLEX, SDPA, choose_attention, document_block_mask,
                                               flex_document_attention, needs_dense_mask)
from colossal_llama.training.collate import PackedCollator, block_causal_mask
from colossal_llama.training.config import parse_config
from colossal_llama.training.data import collect_parts, expand_dataset_args, load_prepared
from colossal_llama.utils.errors import UserInputError

pytestmark = [
    pytest.mark.skipif(not attention.flex_attention_available(), reason="this PyTorch has no FlexAttention"),
    # on CPU FlexAttention runs unfused on purpose (see attention._flex_kernel)
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]


@pytest.fixture(scope="module")
def packed_rows(prepared_pretrain):
    """Two real packed rows of different lengths (two or more documents each), so the shorter one is padded."""
    parts, manifests = collect_parts(expand_dataset_args([str(prepared_pretrain / "arrow")]))
    dataset = load_prepared(parts, manifests).dataset
    multi = [dataset[i] for i in range(len(dataset)) if (dataset[i]["position_ids"] == 0).sum() >= 2]
    rows = sorted(multi, key=lambda r: len(r["input_ids"]))
    assert len(rows[0]["input_ids"]) < len(rows[-1]["input_ids"]), "need two lengths to test padding"
    return [rows[-1], rows[0]]


def sdpa_reference(q, k, v, position_ids):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(position_ids))
    return out.transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (9, 3), (4, 4)])
def test_flex_document_attention_equals_sdpa_with_the_dense_block_mask(packed_rows, heads, kv_heads):
    batch = PackedCollator(pad_token_id=0, max_length=128)(packed_rows)
    position_ids = batch["position_ids"]
    bsz, length = position_ids.shape
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(bsz, heads, length, 16, generator=gen)
    k, v = (torch.randn(bsz, kv_heads, length, 16, generator=gen) for _ in range(2))
    module = torch.nn.Module()
    got, weights = flex_document_attention(module, q, k, v, document_block_mask(position_ids))
    assert weights is None and got.shape == (bsz, length, heads, 16)
    torch.testing.assert_close(got, sdpa_reference(q, k, v, position_ids), rtol=1e-5, atol=1e-5)


def test_flex_needs_the_block_mask():
    q = torch.zeros(1, 2, 4, 16)
    with pytest.raises(ValueError, match="BlockMask"):
        flex_document_attention(torch.nn.Module(), q, q, q, None)


def test_a_packed_batch_gives_the_same_logits_and_loss_with_flex_as_with_the_sdpa_mask(packed_rows, tiny_llama):
    from colossal_llama.training.model import load_causal_lm

    with_mask = PackedCollator(pad_token_id=0, max_length=128, mask_4d=needs_dense_mask(SDPA))(packed_rows)
    without = PackedCollator(pad_token_id=0, max_length=128, mask_4d=needs_dense_mask(FLEX))(packed_rows)
    assert "attention_mask" in with_mask and "attention_mask" not in without
    sdpa_model = load_causal_lm(str(tiny_llama), SDPA).eval()
    flex_model = load_causal_lm(str(tiny_llama), FLEX).eval()
    assert flex_model.config._attn_implementation == FLEX
    keys = ("input_ids", "position_ids", "labels")
    with torch.no_grad():
        ref = sdpa_model(**{k: with_mask[k] for k in (*keys, "attention_mask")})
        got = flex_model(**{k: without[k] for k in keys})
    real = torch.arange(with_mask["input_ids"].shape[1])[None, :] < with_mask["lengths"][:, None]
    torch.testing.assert_close(got.logits[real], ref.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=1e-6)
    # Without document separation the second document of a row would see the first: the comparison can fail.
    with torch.no_grad():
        leaky = sdpa_model(**{k: with_mask[k] for k in keys})
    assert (leaky.logits[real] - ref.logits[real]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ choosing
@pytest.fixture
def machine(monkeypatch):
    def set_packages(flash: bool, flex: bool = True):
        monkeypatch.setattr(attention, "flash_attn_installed", lambda: flash)
        monkeypatch.setattr(attention, "flex_attention_available", lambda: flex)

    return set_packages


def test_auto_picks_flash_then_flex_on_cuda_and_sdpa_on_cpu(machine):
    machine(flash=False)
    assert choose_attention("auto", cuda=False) == SDPA
    assert choose_attention("auto", cuda=True) == FLEX
    machine(flash=True)
    assert choose_attention("auto", cuda=True) == FLASH
    assert choose_attention("auto", cuda=False) == SDPA
    machine(flash=False, flex=False)
    assert choose_attention("auto", cuda=True) == SDPA


def test_a_flash_request_falls_back_with_a_warning(machine, caplog):
    machine(flash=False)
    assert choose_attention("flash", cuda=True) == FLEX
    assert "flash_attn package is not installed, using flex_attention" in caplog.text
    assert choose_attention("auto", cuda=False, use_flash_attn=True) == SDPA  # the older flag means the same
    assert "no CUDA device, using sdpa" in caplog.text
    machine(flash=True)
    assert choose_attention("sdpa", cuda=True) == SDPA and choose_attention("flex", cuda=True) == FLEX


def test_flex_on_cpu_and_contradictory_flags_are_one_line_errors(machine):
    machine(flash=False)
    with pytest.raises(UserInputError, match="--attention flex needs CUDA"):
        choose_attention("flex", cuda=False)
    with pytest.raises(UserInputError, match="--use_flash_attn asks for flash attention but --attention is sdpa"):
        choose_attention("sdpa", cuda=True, use_flash_attn=True)
    machine(flash=False, flex=False)
    with pytest.raises(UserInputError, match="has no FlexAttention"):
        choose_attention("flex", cuda=True)


def test_attention_is_a_flag_and_use_flash_attn_still_parses(tiny_llama):
    cfg = parse_config(["--pretrained", str(tiny_llama), "--dataset", "d", "--attention", "flex", "-f"])
    assert (cfg.attention, cfg.use_flash_attn) == ("flex", True)
    assert parse_config(["--pretrained", str(tiny_llama), "--dataset", "d"]).attention == "auto"
    with pytest.raises(UserInputError, match="argument --attention: invalid choice: 'xformers'"):
        parse_config(["--pretrained", str(tiny_llama), "--dataset", "d", "--attention", "xformers"])
