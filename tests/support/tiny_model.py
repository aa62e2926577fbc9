"""A tiny LLaMA (random init, config-built) saved with a REAL tokenizer, for fast CPU training tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True)


def make_tiny_llama(tokenizer_dir: Path, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Write ``out_dir`` = tiny LlamaForCausalLM (vocab = len(tokenizer), float32 safetensors) + tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from colossal_llama.tokenizer.loading import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **{**TINY_LLAMA, **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = Path(str(out_dir) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(out_dir)
    return Path(out_dir)
