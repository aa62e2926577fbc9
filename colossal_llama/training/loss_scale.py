"""The fp16 loss scaler: found in each plugin's optimizer, saved with a checkpoint and put back on resume.

Under fp16 the optimizer multiplies the loss by a scale before the backward pass, skips a step whose gradients
overflow and halves the scale (after ``hysteresis`` such steps), and doubles it after ``growth_interval`` clean
steps. colossalai's checkpoints leave the scaler out: a resumed run started again at the initial 2**16, and a run
whose scale had settled lower skipped steps after every resume (their batches untrained) until it came down again.
So the checkpoint's ``optimizer/loss-scale.json`` holds it: the scale and the counters of clean and overflowing
steps. One for the job: an overflow is agreed over all ranks before anyone steps, so every rank's scaler is the
same, and rank 0 writes it. The growth and backoff settings stay this run's.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from colossal_llama.utils.json_files import read_json, write_json

log = logging.getLogger(__name__)

LOSS_SCALE_FILE = "loss-scale.json"
_HELPERS = ("mixed_precision_mixin", "mix_precision_mixin", "mixed_precision")  # ZeRO, gemini, 3d without ZeRO


def fp16_helper(optimizer):
    """colossalai's fp16 helper of ``optimizer`` under ZeRO, gemini or 3d (named differently in each): it holds
    the loss scale and whether this step overflowed. None otherwise (bf16/fp32, or ddp, where torch's GradScaler
    does the scaling)."""
    for name in _HELPERS:
        helper = getattr(optimizer, name, None)
        if getattr(helper, "loss_scale", None) is not None:
            return helper
    return None


def _scaler(optimizer):
    """The optimizer's dynamic loss scaler (colossalai's DynamicGradScaler under ZeRO, gemini and 3d; torch's
    GradScaler in colossalai's ddp wrapper), or None when nothing scales the loss."""
    helper = fp16_helper(optimizer)
    if helper is not None:
        return getattr(helper, "grad_scaler", None)
    scaler = getattr(optimizer, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def scaler_state(optimizer) -> Optional[dict]:
    """``{"scale", "growth_step", "hysteresis_step"}`` of the optimizer's loss scaler, or None without one."""
    scaler = _scaler(optimizer)
    if scaler is None:
        return None
    if hasattr(scaler, "get_scale"):  # torch's GradScaler: no hysteresis (it backs off at the first overflow)
        return {"scale": float(scaler.get_scale()), "growth_step": int(scaler._get_growth_tracker()),
                "hysteresis_step": 0}
    return {"scale": float(scaler.scale.item()), "growth_step": int(scaler._growth_step),
            "hysteresis_step": int(scaler._hysteresis_step)}


def _set_state(scaler, state: dict) -> None:
    if hasattr(scaler, "get_scale"):
        scaler.load_state_dict({**scaler.state_dict(), "scale": state["scale"],
                                "_growth_tracker": state["growth_step"]})
    else:
        scaler._scale.fill_(state["scale"])  # in place: the tensor stays on the scaler's device
        scaler._growth_step, scaler._hysteresis_step = state["growth_step"], state["hysteresis_step"]


def save_loss_scale(optimizer, directory: Path) -> Optional[dict]:
    """Write the loss scaler's state under ``directory`` (the checkpoint's ``optimizer/``; rank 0 writes, every
    rank may call). Returns the state, None without a scaler."""
    state = scaler_state(optimizer)
    if state is not None and dist.get_rank() == 0:
        Path(directory).mkdir(parents=True, exist_ok=True)
        write_json(Path(directory) / LOSS_SCALE_FILE, state)
    return state


def restore_loss_scale(optimizer, directory: Path) -> Optional[bool]:
    """Put the saved loss scaler's state back. True: restored; False: the checkpoint holds none (saved without
    fp16, or by an older version: the scale starts again at its initial value), logged; None: this run has no
    loss scaler."""
    scaler = _scaler(optimizer)
    if scaler is None:
        return None
    path = Path(directory) / LOSS_SCALE_FILE
    if not path.is_file():
        if dist.get_rank() == 0:
            log.warning("%s: holds no loss scale (saved without fp16, or by an older version): the fp16 loss scale "
                        "starts again at its initial value", Path(directory).parent)
        return False
    state = read_json(path)
    _set_state(scaler, state)
    if dist.get_rank() == 0:
        log.info("fp16 loss scale %g restored (%d clean steps since it last grew, %d overflowing)", state["scale"],
                 state["growth_step"], state["hysteresis_step"])
    return True
