"""Build a randomly initialised LLaMA from a named size and a tokenizer, saved as a HF folder.

Used when no real checkpoint is at hand (a user's clone without the bundled GGUF, tests, benchmarks):
the rest of the pipeline then runs unchanged on a real tokenizer and real text.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.utils.cli import OneLineErrorParser, add_flags, config_from, flag
from colossal_llama.utils.errors import UserInputError, cli_entry
from colossal_llama.utils.output import check_output_dir, staged_dir


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048


SHAPES = {
    "tiny": LlamaShape(64, 2, 4, 2, 176, 1024),  # tests: trains at hundreds of steps/s on CPU
    "small": LlamaShape(256, 4, 8, 4, 688, 2048),  # quickstart fallback: ~10 M params + embeddings
    "1b": LlamaShape(2048, 22, 32, 4, 5632, 4096),  # TinyLlama-1.1B shape (GPU benchmarks)
    "7b": LlamaShape(4096, 32, 32, 32, 11008, 4096),
}
TMP_KIND = "tmp-from-config"  # the model is built in ``.{output}.tmp-from-config-{pid}`` beside it


def build_llama(tokenizer, shape: LlamaShape, seed: int = 0, torch_dtype: str = "float32",
                tie_word_embeddings: bool = False, **config_overrides):
    """A ``LlamaForCausalLM`` with ``vocab_size == len(tokenizer)`` and the tokenizer's special ids.

    ``config_overrides`` go to ``LlamaConfig`` as they are (e.g. ``rms_norm_eps``).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        torch_dtype=torch_dtype,
        **{**asdict(shape), **config_overrides},
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(getattr(torch, torch_dtype))


def save_llama_from_config(tokenizer_dir: Path, output_dir: Path, shape: str, seed: int) -> Path:
    """Write model + tokenizer into ``output_dir``; returns it. The folder is built in a temporary sibling and
    replaces ``output_dir`` only when complete (callers check first that it may: the CLI's ``--overwrite``)."""
    if shape not in SHAPES:
        raise UserInputError(f"--shape {shape}: expected one of {', '.join(SHAPES)}")
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_llama(tokenizer, SHAPES[shape], seed=seed)
    output_dir = Path(output_dir)
    with staged_dir(output_dir, TMP_KIND) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {output_dir}: LLaMA '{shape}' with {n_params / 1e6:.1f} M parameters, vocab {len(tokenizer)}")
    return output_dir


@dataclass
class FromConfigConfig:
    """``python -m colossal_llama.model.from_config``'s flags (this class *is* its command line)."""

    tokenizer_dir: Path = flag(help="the tokenizer the model is built for (its vocabulary and special ids)")
    output_dir: Path = flag(help="the Hugging Face folder to write (must not exist unless --overwrite)")
    shape: str = flag("small", choices=tuple(sorted(SHAPES)), help="a named size (see SHAPES)")
    seed: int = flag(0, help="seed of the random initialisation")
    overwrite: bool = flag(False, help="replace --output_dir if it exists")


@cli_entry
def main(argv=None) -> int:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    add_flags(parser, FromConfigConfig)
    cfg = config_from(parser.parse_args(argv), FromConfigConfig)
    check_output_dir(cfg.output_dir, cfg.overwrite, inputs=[cfg.tokenizer_dir])  # the tokenizer is read first
    save_llama_from_config(cfg.tokenizer_dir, cfg.output_dir, cfg.shape, cfg.seed)
    return 0


if __name__ == "__main__":
    main()
