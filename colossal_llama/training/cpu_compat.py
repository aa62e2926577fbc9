"""Make colossalai 0.5.0's LowLevelZero (zero2) and tensor/pipeline-parallel (3d) paths run on CPU (gloo).

``train.py`` applies it on a machine without CUDA (:func:`colossal_llama.training.distributed.init_distributed`):
the test suite, CI and a laptop run the same plugins as a GPU cluster, on gloo.

What fails on CPU (torch 2.13, 2 ranks) and what stands in, method by method on ``CpuAccelerator``:
- RNG: ``get_rng_state(device)`` passes the device to ``torch.get_rng_state`` ("takes 0 positional arguments");
  ``manual_seed``/``seed``/``initial_seed`` raise. Stand-ins use torch's CPU generator (shardformer's Randomizer
  saves and restores it around every use, so the training RNG stream is not disturbed).
- ``synchronize`` / ``empty_cache`` raise: CPU work is synchronous and has no cache, so they become no-ops.
- Streams/events (LowLevelZero's reduce bucket): a single in-line "stream" whose waits and records do nothing;
  correct because CPU collectives complete before returning. The plugin is also built with
  ``overlap_communication=False`` on CPU (colossal_llama.training.plugin).
- ``LowLevelZeroOptimizer._sanity_checks`` asserts the accelerator is cuda/npu ("device is required"); the
  stand-in keeps its other check (all params share the optimizer dtype).
- ``torch.distributed.is_hccl_available`` and ``Backend.HCCL`` no longer exist in recent torch; pipeline code reads
  them (the latter only when NCCL is available, i.e. with a CUDA build of torch on a machine without a GPU).

``apply()`` does nothing when CUDA is available, so the same launcher is safe on a GPU machine.
"""
from __future__ import annotations

import contextlib

import torch


class _InlineStream:
    """A stand-in for a CUDA stream on CPU: everything already runs in order on the calling thread."""

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event or _InlineEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _InlineEvent:
    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_STREAM = _InlineStream()


def _cpu_methods() -> dict:
    return {
        "synchronize": lambda self, device=None: None,
        "empty_cache": lambda self: None,
        "get_rng_state": lambda self, device=None: torch.get_rng_state(),
        "set_rng_state": lambda self, new_state, device=None: torch.set_rng_state(new_state),
        "get_rng_state_all": lambda self: [torch.get_rng_state()],
        "set_rng_state_all": lambda self, states: torch.set_rng_state(states[0]),
        "manual_seed": lambda self, seed: torch.manual_seed(seed),
        "manual_seed_all": lambda self, seed: torch.manual_seed(seed),
        "seed": lambda self: torch.seed(),
        "seed_all": lambda self: torch.seed(),
        "initial_seed": lambda self: torch.initial_seed(),
        "device_count": lambda self: 1,
        "current_device": lambda self: torch.device("cpu"),
        "Stream": lambda self, device=None, priority=0, **kwargs: _STREAM,
        "Event": lambda self, enable_timing=False, blocking=False, interprocess=False: _InlineEvent(),
        "current_stream": lambda self, device=None: _STREAM,
        "default_stream": lambda self, device=None: _STREAM,
        "set_stream": lambda self, stream_: None,
        "stream": lambda self, stream_: contextlib.nullcontext(),
    }


def _allow_cpu_zero() -> None:
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    def sanity_checks(self) -> None:
        for group in self.optim.param_groups:
            for param in group["params"]:
                if not getattr(param, "skip_zero_check", False) and param.dtype != self._dtype:
                    raise TypeError(f"parameters must all be {self._dtype}, got {param.dtype}")

    LowLevelZeroOptimizer._sanity_checks = sanity_checks


def apply() -> bool:
    """Patch colossalai's CPU accelerator in this process; returns whether anything was patched."""
    if torch.cuda.is_available():
        return False
    from colossalai.accelerator.cpu_accelerator import CpuAccelerator

    for name, fn in _cpu_methods().items():
        setattr(CpuAccelerator, name, fn)
    _allow_cpu_zero()
    if not hasattr(torch.distributed, "is_hccl_available"):
        torch.distributed.is_hccl_available = lambda: False
    if not hasattr(torch.distributed.Backend, "HCCL"):
        torch.distributed.Backend.HCCL = "hccl"  # a name no gloo group has: the comparison is simply False
    # Tensors on CPU have no record_stream; the stand-in stream makes it meaningless anyway.
    if not hasattr(torch.Tensor, "_colossal_llama_record_stream"):
        original = torch.Tensor.record_stream

        def record_stream(tensor, stream):
            if isinstance(stream, _InlineStream):
                return None
            return original(tensor, stream)

        torch.Tensor._colossal_llama_record_stream = original
        torch.Tensor.record_stream = record_stream
    return True
