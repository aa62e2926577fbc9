"""Load a trained causal LM and its tokenizer for inference or evaluation, where the user asked for
(:mod:`colossal_llama.inference.placement`: the CPU, one GPU, or several)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from colossal_llama.inference.placement import Placement, device_map, log_device_map, placement_for
from colossal_llama.model.checkpoint_files import check_checkpoint
from colossal_llama.model.lora_checkpoint import is_lora_checkpoint, lora_base, merge_into
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.json_files import read_json


def load_model(model_path, placement: Placement):
    """``AutoModelForCausalLM`` from an HF folder in its saved dtype, in eval mode, placed by ``placement``; from a
    LoRA run's checkpoint (``modeling/`` with adapters only), its base model with the adapters merged in.

    On GPUs the weights go straight from the files to their GPU (accelerate's device map, planned before any is
    read), never through a whole copy in host memory. Half-precision weights are upcast to float32 on CPU: many
    CPU kernels lack fp16 and bf16 is slow there.
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise UserInputError(f"{path}: not a model folder (no config.json)")
    if is_lora_checkpoint(path):  # a LoRA run's checkpoint: its base, the adapters merged in where it is placed
        return merge_into(load_model(lora_base(path), placement), path).eval()
    check_checkpoint(path)
    try:
        where = {} if placement.on_cpu else {"device_map": device_map(AutoConfig.from_pretrained(path), placement,
                                                                      path)}
        model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype="auto", **where)
    except (OSError, ValueError, SafetensorError) as err:
        raise UserInputError(f"{path}: cannot load the model ({str(err).splitlines()[0]})") from None
    if placement.on_cpu and model.dtype in (torch.float16, torch.bfloat16):
        model = model.float()
    if not placement.on_cpu:
        log_device_map(model)
    return model.eval()


def load_model_and_tokenizer(model_path, tokenizer_path=None, device: Union[str, Placement] = "auto", tokenizer=None):
    """Model + tokenizer (``tokenizer_path`` defaults to ``model_path``; ``tokenizer``: the one already loaded from
    there). Returns ``(model, tokenizer)``. ``device``: a ``--device`` value (one process on this machine) or the
    :class:`Placement` of this process."""
    placement = device if isinstance(device, Placement) else placement_for(device)  # a missing GPU: before loading
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_path or model_path)
    model = load_model(model_path, placement)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UserInputError(
            f"{tokenizer_path or model_path}: tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"only {model.get_input_embeddings().num_embeddings} rows (wrong --tokenizer_path?)"
        )
    return model, tokenizer


def context_length(model) -> int:
    """The number of positions the model was built for (``max_position_embeddings``)."""
    return int(getattr(model.config, "max_position_embeddings", 2048))


def configured_context_length(model_path) -> Optional[int]:
    """``max_position_embeddings`` of the model folder's ``config.json``, read without loading any weights (checks
    of the inputs before a large model loads); None when the folder or the field is missing (loading says why)."""
    config = read_json(Path(model_path) / "config.json", missing_ok=True)
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None
