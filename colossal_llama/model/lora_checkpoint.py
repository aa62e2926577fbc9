"""The LoRA checkpoint folder: what a ``--lora_rank`` run's checkpoints hold in ``modeling/`` (adapter matrices
and, when they trained, the embeddings) and how a model is made of it again.

Files: ``lora_trainable.safetensors`` (tensors named as the peft model's parameters, float32) and peft's
``adapter_config.json`` (rank, alpha, target modules, and ``base_model_name_or_path``: the ``--pretrained``
folder the frozen weights come from, as an absolute path). Training writes and resumes them
(:mod:`colossal_llama.training.lora`); inference and evaluation load one as its base with the adapters merged in
(:func:`merge_into`), so any checkpoint of a LoRA run can be evaluated, not only the merged final model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.json_files import read_json

TRAINABLE_FILE = "lora_trainable.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def is_lora_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a LoRA run's adapters (and no full model)."""
    return (Path(folder) / TRAINABLE_FILE).is_file() and (Path(folder) / ADAPTER_CONFIG).is_file()


def lora_base(folder: Path) -> Path:
    """The model folder the adapters of ``folder`` were trained on; a one-line error when it is not here."""
    base = read_json(Path(folder) / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise UserInputError(f"{folder}: a LoRA checkpoint (adapters only) of the base model {base!r}, which is not a "
                             "model folder on this machine: put the base there, or use the run's merged final model "
                             "(save_dir/modeling)")
    return Path(base)


def merge_into(base_model: nn.Module, folder: Path) -> nn.Module:
    """``base_model`` with the adapters (and trained embeddings) of ``folder`` merged in: a plain transformers
    model, each weight on the device its base weight is on."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    folder = Path(folder)
    peft_model = get_peft_model(base_model, LoraConfig.from_pretrained(str(folder)))
    params = dict(peft_model.named_parameters())
    saved = load_file(str(folder / TRAINABLE_FILE))
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise UserInputError(f"{folder / TRAINABLE_FILE}: tensors that are not parameters of its base with these "
                             f"adapters: {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return peft_model.merge_and_unload()
