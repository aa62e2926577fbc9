"""LoRA (``--lora_rank R``) with peft: low-rank adapters on the attention and MLP projections, and, after a
vocabulary expansion, ``embed_tokens`` / ``lm_head`` trained in full so the new tokens learn (the
Chinese-LLaMA-Alpaca recipe).

Checkpoints hold only what trains: ``modeling/lora_trainable.safetensors`` (adapter matrices and, when on, the
embeddings) with peft's ``adapter_config.json`` (:mod:`colossal_llama.model.lora_checkpoint`, which inference
loads them with); the frozen base comes from ``--pretrained`` on resume. The final ``save_dir/modeling`` is the
base with the adapters merged in: a plain Hugging Face model.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from colossal_llama.model.init_model import BASE_TOKENS_KEY, BASE_VOCAB_KEY, TOKENS_KEY
from colossal_llama.model.lora_checkpoint import TRAINABLE_FILE
from colossal_llama.training.config import LORA_TARGETS
from colossal_llama.training.model import EMBEDDING_MODULES
from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.json_files import read_json


def vocabulary_was_expanded(model_dir: Path) -> bool:
    """Whether ``model_dir`` came out of ``init_model.py`` with more tokens than its base model had.

    Tokens are compared, not matrix rows: a base with padding rows (32064 rows, 32000 tokens) takes up to 64 new
    tokens without growing. Models written by earlier versions record only the base's rows; they are compared
    with ``vocab_size`` as before."""
    config = read_json(Path(model_dir) / "config.json")
    base_tokens, tokens = config.get(BASE_TOKENS_KEY), config.get(TOKENS_KEY)
    more_tokens = base_tokens is not None and tokens is not None and int(base_tokens) < int(tokens)
    base_rows = config.get(BASE_VOCAB_KEY)
    more_rows = base_rows is not None and int(base_rows) < int(config["vocab_size"])
    return more_tokens or more_rows


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: Iterable[str],
               train_embeddings: bool) -> nn.Module:
    """Wrap ``model`` in a peft LoRA model; every base weight is frozen except, with ``train_embeddings``, the
    input embeddings and the LM head (tied or not: their parameters are trained in place, so tying survives)."""
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise UserInputError(f"--lora_target_modules: {missing} are not modules of this model "
                             f"(LLaMA projections are {', '.join(LORA_TARGETS)})")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if train_embeddings:
        for name, param in peft_model.named_parameters():
            if any(f".{module}." in f".{name}" for module in EMBEDDING_MODULES) and "lora_" not in name:
                param.requires_grad_(True)
    return peft_model


def trainable_state(model: nn.Module) -> dict:
    """name -> tensor of every trainable parameter (shared parameters once)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, directory: Path) -> None:
    """``directory/lora_trainable.safetensors`` + peft's ``adapter_config.json``; call on one rank."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous().to("cpu", torch.float32) for name, t in trainable_state(model).items()}
    save_file(tensors, str(directory / TRAINABLE_FILE))
    config = copy.copy(model.peft_config["default"])
    config.base_model_name_or_path = _portable_base(config.base_model_name_or_path)
    config.save_pretrained(str(directory))


def _portable_base(base: str | None) -> str | None:
    """A local ``--pretrained`` folder as its absolute path: inference reads the checkpoint from any working
    directory, where the relative path typed at training names nothing. A hub id is no folder and stays as is."""
    if base and Path(base).is_dir():
        return str(Path(base).resolve())
    return base


def load_trainable(model: nn.Module, directory: Path) -> None:
    """Copy a :func:`save_trainable` file into the trainable parameters (same names, same shapes)."""
    from safetensors.torch import load_file

    path = Path(directory) / TRAINABLE_FILE
    saved = load_file(str(path))
    params = dict(model.named_parameters())
    expected = set(trainable_state(model))
    if set(saved) != expected:
        raise UserInputError(f"{path}: its tensors do not match this run's trainable parameters (missing "
                             f"{sorted(expected - set(saved))[:3]}, unexpected {sorted(set(saved) - expected)[:3]}); "
                             "were --lora_rank/--lora_target_modules changed?")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].dtype))


def merged_model(model: nn.Module) -> nn.Module:
    """The base model with every adapter merged into its weights (destructive: end of training only)."""
    return model.merge_and_unload()
