"""Where a process puts a model for inference and evaluation: the CPU, one GPU, or several GPUs filled in order.

A 70B model in bfloat16 is 140 GB of weights: more than one 80 GB GPU. So ``--device auto`` / ``cuda`` give a
process every GPU that is its own on the machine (all of them for a single process; with P processes per machine
and G >= P GPUs, a block of G // P each) and the weights fill the first GPU, then the next, layer by layer
(accelerate's device map, a decoder layer never split): a model that fits one GPU stays on it, exactly as before,
and a larger one spreads instead of running out of memory (the other GPUs are not touched when the first
suffices: asking a GPU for its free memory creates a CUDA context there). ``cuda:N`` is GPU N alone.

Each GPU takes weights up to ``--max_gpu_memory`` (default: 90 % of its free memory, leaving the rest for
activations and the KV cache; a GPU shared by several processes splits that between them). Weights that do not
fit are a one-line error before any is read, never a silent offload to CPU or disk.
"""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from colossal_llama.utils.errors import UserInputError

log = logging.getLogger(__name__)
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_DEVICE_RE = re.compile(r"auto|cpu|cuda(?::(\d+))?")
FREE_MEMORY_SHARE = 0.9  # of a GPU's free memory, for weights by default; the rest holds activations and KV cache
GIB = 2 ** 30


def parse_device(text: str) -> str:
    """argparse ``type`` for ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (any case, spaces trimmed).

    Only the spelling is checked here; whether the device exists is :func:`resolve_device`'s job (at load time).
    """
    device = str(text).strip().lower()
    if not _DEVICE_RE.fullmatch(device):
        raise argparse.ArgumentTypeError(f"expected {DEVICE_FORMS}, got {text!r}")
    return device


def parse_memory_size(text: str) -> int:
    """argparse ``type`` for ``--max_gpu_memory``: a size with its unit (``70GiB``, ``80GB``, ``512MiB``) -> bytes."""
    from accelerate.utils import convert_file_size_to_int

    value = str(text).strip()
    if not re.fullmatch(r"\d+(\.\d+)?\s*[KMG]i?B", value, flags=re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"expected a size with its unit, such as 70GiB or 512MiB, got {text!r}")
    size = convert_file_size_to_int(value.replace(" ", "").upper().replace("IB", "iB"))
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return size


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


def process_gpus(processes: int, local_rank: int, gpu_count: int) -> Tuple[int, ...]:
    """The GPUs of process ``local_rank`` of the ``processes`` a launcher started on a machine with ``gpu_count``:
    a block of ``gpu_count // processes`` GPUs each when there are at least as many GPUs as processes (the
    remainder unused), else the one GPU ``local_rank % gpu_count``, shared."""
    if processes <= gpu_count:
        per_process = gpu_count // max(processes, 1)
        return tuple(range(local_rank * per_process, (local_rank + 1) * per_process))
    return (local_rank % gpu_count,)


@dataclass(frozen=True)
class Placement:
    """Where this process puts the model's weights: ``gpus`` empty is the CPU; else those GPUs, filled in order,
    each up to ``memory_limit`` bytes (None: :data:`FREE_MEMORY_SHARE` of its free memory / ``sharers``)."""

    gpus: Tuple[int, ...] = ()
    memory_limit: Optional[int] = None
    sharers: int = 1  # processes that put a model on each of these GPUs

    @property
    def on_cpu(self) -> bool:
        return not self.gpus

    def describe(self) -> str:
        if self.on_cpu:
            return "cpu"
        if len(self.gpus) == 1:
            return f"cuda:{self.gpus[0]}"
        return f"cuda:{self.gpus[0]}-{self.gpus[-1]}"

    def budgets(self, count: Optional[int] = None) -> Dict[int, int]:
        """Bytes of weights each GPU may take (the first ``count`` GPUs; default all)."""
        gpus = self.gpus[:count]
        if self.memory_limit is not None:
            return {g: self.memory_limit for g in gpus}
        return {g: int(free_gpu_memory(g) * FREE_MEMORY_SHARE / self.sharers) for g in gpus}


def free_gpu_memory(gpu: int) -> int:
    """Bytes free on GPU ``gpu`` now (what the driver reports, other processes' use excluded)."""
    return torch.cuda.mem_get_info(gpu)[0]


def placement_for(device: str, processes: int = 1, local_rank: int = 0,
                  memory_limit: Optional[int] = None) -> Placement:
    """The placement of ``--device`` for process ``local_rank`` of ``processes`` on this machine (see the module
    docstring). A CUDA device the machine lacks is a :class:`UserInputError`."""
    resolved = resolve_device(device)
    if resolved.type == "cpu":
        return Placement()
    if resolved.index is not None:  # every process of this machine puts its model on GPU N
        return Placement((resolved.index,), memory_limit, sharers=max(1, processes))
    count = torch.cuda.device_count()
    gpus = process_gpus(processes, local_rank, count)
    return Placement(gpus, memory_limit, sharers=max(1, -(-processes // count)))


def device_map(config, placement: Placement, model_path) -> Dict[str, int]:
    """accelerate's device map of the model ``config`` describes (its saved dtype) over ``placement.gpus``: module
    name -> GPU, in layer order, each GPU up to its budget. Weights that do not fit are a :class:`UserInputError`."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoModelForCausalLM

    dtype = weights_dtype(config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    model.tie_weights()  # tied embeddings count once and stay with the LM head
    for count in sorted({1, len(placement.gpus)}):  # the other GPUs are not even touched when the first suffices
        budgets = placement.budgets(count)
        plan = infer_auto_device_map(model, max_memory=budgets, dtype=dtype,
                                     no_split_module_classes=model._no_split_modules or [])
        if all(isinstance(where, int) for where in plan.values()):
            return dict(plan)
    raise _does_not_fit(model, dtype, placement, budgets, model_path)


def _does_not_fit(model, dtype: torch.dtype, placement: Placement, budgets: Dict[int, int],
                  model_path) -> UserInputError:
    """The one-line error: what the weights need, what each GPU takes and why, what to do."""
    from accelerate.utils import compute_module_sizes

    need = compute_module_sizes(model, dtype=dtype)[""]
    limit = ("--max_gpu_memory" if placement.memory_limit is not None
             else f"{FREE_MEMORY_SHARE:.0%} of free memory" + (f" / {placement.sharers} processes"
                                                               if placement.sharers > 1 else ""))
    return UserInputError(
        f"{model_path}: the weights need {need / GIB:.2f} GiB ({str(dtype).replace('torch.', '')}) but "
        f"{placement.describe()} take(s) {' + '.join(f'{b / GIB:.2f}' for b in budgets.values())} GiB ({limit}): "
        "give each process more GPUs (fewer processes per machine, --device cuda rather than cuda:N) or raise "
        "--max_gpu_memory")


def weights_dtype(config) -> torch.dtype:
    """The dtype the checkpoint's weights load in (``torch_dtype="auto"``): the config's, float32 when unset."""
    dtype = getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


def log_device_map(model) -> None:
    """One line: which GPUs hold how many GiB of the loaded model's parameters."""
    per_device: Dict[str, int] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        per_device[str(tensor.device)] = per_device.get(str(tensor.device), 0) + tensor.numel() * tensor.element_size()
    log.info("model weights: %s", ", ".join(f"{d} {n / GIB:.2f} GiB" for d, n in sorted(per_device.items())))
