"""Load a trained causal LM and its tokenizer for inference or evaluation, on the device the user asked for."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from colossal_llama.model.checkpoint_files import check_checkpoint
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.utils.errors import UserInputError

DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_DEVICE_RE = re.compile(r"auto|cpu|cuda(?::(\d+))?")


def parse_device(text: str) -> str:
    """argparse ``type`` for ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (any case, spaces trimmed).

    Only the spelling is checked here; whether the device exists is :func:`resolve_device`'s job (at load time).
    """
    device = str(text).strip().lower()
    if not _DEVICE_RE.fullmatch(device):
        raise argparse.ArgumentTypeError(f"expected {DEVICE_FORMS}, got {text!r}")
    return device


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu. Asking for a CUDA device this machine lacks is a user error."""
    try:
        device = parse_device(device)
    except argparse.ArgumentTypeError as err:
        raise UserInputError(f"--device: {err}") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {device}: no CUDA device is available (use --device cpu or auto)")
        count, index = torch.cuda.device_count(), torch.device(device).index
        if index is not None and index >= count:
            raise UserInputError(f"--device {device}: this machine has {count} CUDA device(s), "
                                 f"cuda:0..cuda:{count - 1}")
    return torch.device(device)


def process_device(device: str, processes: int, local_rank: int) -> str:
    """The ``--device`` of one of ``processes`` processes a launcher started on a machine: with several on a GPU
    machine, ``auto`` and ``cuda`` mean the process's own GPU, ``cuda:LOCAL_RANK`` (modulo the GPUs present), so
    they do not all load the model onto GPU 0. ``cpu`` and an explicit ``cuda:N`` stay as they are."""
    if processes <= 1 or device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def load_model(model_path, device: torch.device):
    """``AutoModelForCausalLM`` from an HF folder in its saved dtype, in eval mode, on ``device``.

    Half-precision weights are upcast to float32 on CPU: many CPU kernels lack fp16 and bf16 is slow there.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise UserInputError(f"{path}: not a model folder (no config.json)")
    check_checkpoint(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype="auto")
    except (OSError, ValueError, SafetensorError) as err:
        raise UserInputError(f"{path}: cannot load the model ({str(err).splitlines()[0]})") from None
    if device.type == "cpu" and model.dtype in (torch.float16, torch.bfloat16):
        model = model.float()
    return model.to(device).eval()


def load_model_and_tokenizer(model_path, tokenizer_path=None, device: str = "auto"):
    """Model + tokenizer (``tokenizer_path`` defaults to ``model_path``). Returns ``(model, tokenizer)``."""
    torch_device = resolve_device(device)  # a missing CUDA device is reported before anything is loaded
    tokenizer = load_tokenizer(tokenizer_path or model_path)
    model = load_model(model_path, torch_device)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UserInputError(
            f"{tokenizer_path or model_path}: tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"only {model.get_input_embeddings().num_embeddings} rows (wrong --tokenizer_path?)"
        )
    return model, tokenizer


def context_length(model) -> int:
    """The number of positions the model was built for (``max_position_embeddings``)."""
    return int(getattr(model.config, "max_position_embeddings", 2048))
