"""A tiny LLaMA (random init, config-built) saved with a REAL tokenizer, for fast CPU training tests."""
from __future__ import annotations

import shutil
from pathlib import Path

from colossal_llama.model.from_config import LlamaShape, build_llama

# Tied embeddings on purpose: SmolLM2 ties them, and the checkpoint code has a separate path for that.
TINY_LLAMA = LlamaShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, max_position_embeddings=512)


def make_tiny_llama(tokenizer_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """Write ``out_dir`` = tiny LlamaForCausalLM (vocab = len(tokenizer), float32 safetensors) + tokenizer files."""
    from colossal_llama.tokenizer.loading import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_llama(tokenizer, TINY_LLAMA, seed=seed, tie_word_embeddings=True, rms_norm_eps=1e-5)
    tmp = Path(str(out_dir) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(out_dir)
    return Path(out_dir)
