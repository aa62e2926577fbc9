"""Load a trained causal LM and its tokenizer for inference or evaluation, on the device the user asked for."""
from __future__ import annotations

from pathlib import Path

import torch

from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.utils.errors import UserInputError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu. Asking for cuda on a machine without one is a user error."""
    if device not in DEVICES:
        raise UserInputError(f"--device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(device)


def load_model(model_path, device: torch.device):
    """``AutoModelForCausalLM`` from an HF folder in its saved dtype, in eval mode, on ``device``.

    Half-precision weights are upcast to float32 on CPU: many CPU kernels lack fp16 and bf16 is slow there.
    """
    from transformers import AutoModelForCausalLM

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise UserInputError(f"{path}: not a model folder (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype="auto")
    except (OSError, ValueError) as err:
        raise UserInputError(f"{path}: cannot load the model ({str(err).splitlines()[0]})") from None
    if device.type == "cpu" and model.dtype in (torch.float16, torch.bfloat16):
        model = model.float()
    return model.to(device).eval()


def load_model_and_tokenizer(model_path, tokenizer_path=None, device: str = "auto"):
    """Model + tokenizer (``tokenizer_path`` defaults to ``model_path``). Returns ``(model, tokenizer)``."""
    tokenizer = load_tokenizer(tokenizer_path or model_path)
    model = load_model(model_path, resolve_device(device))
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UserInputError(
            f"{tokenizer_path or model_path}: tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"only {model.get_input_embeddings().num_embeddings} rows (wrong --tokenizer_path?)"
        )
    return model, tokenizer


def context_length(model) -> int:
    """The number of positions the model was built for (``max_position_embeddings``)."""
    return int(getattr(model.config, "max_position_embeddings", 2048))
