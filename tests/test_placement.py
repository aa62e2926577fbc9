"""Where inference and evaluation put a model: the CPU, one GPU, or several GPUs filled in order.

The GPU plans are made by accelerate from the real SmolLM2 config; a machine with several GPUs is simulated
(``torch.cuda`` reports them, their free memory is given), since these machines have none. Loading onto real
GPUs is in tests/test_cuda.py.
"""
from __future__ import annotations

import argparse

import pytest
import torch
from transformers import AutoConfig

from colossal_llama.inference import placement as placement_module
from colossal_llama.inference.cli import parse_args
from colossal_llama.inference.loading import load_model
from colossal_llama.inference.placement import (Placement, device_map, parse_memory_size, placement_for,
                                                process_gpus)
from colossal_llama.utils.errors import UserInputError

MIB, GIB = 2 ** 20, 2 ** 30


@pytest.fixture
def eight_gpus(monkeypatch):
    """A machine with 8 GPUs of 80 GiB free each, as torch and accelerate see it (nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(placement_module, "free_gpu_memory", lambda gpu: 80 * GIB)


@pytest.fixture(scope="module")
def smollm2_config(smollm2_dir):
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.torch_dtype == torch.float32 and config.tie_word_embeddings  # 135M parameters, 0.50 GiB
    return config


def weights_per_gpu(config, plan) -> dict:
    """Bytes of parameters each GPU of ``plan`` holds (tied weights counted once, with their first module)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    held, seen = {}, set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        module = max((m for m in plan if m == "" or name.startswith(m + ".")), key=len)
        held[plan[module]] = held.get(plan[module], 0) + param.numel() * param.element_size()
    return held


# ------------------------------------------------------------------------------------------- which GPUs
@pytest.mark.parametrize("processes,gpus,expected", [
    (1, 8, [tuple(range(8))]),  # one process: every GPU of the machine
    (2, 8, [(0, 1, 2, 3), (4, 5, 6, 7)]),  # torchrun --nproc_per_node 2: half each (a 70B model fits 4 x 80 GB)
    (3, 8, [(0, 1), (2, 3), (4, 5)]),  # blocks of 8 // 3; GPUs 6 and 7 unused
    (8, 8, [(r,) for r in range(8)]),  # one GPU each, as before
    (4, 2, [(0,), (1,), (0,), (1,)]),  # more processes than GPUs: shared in turn
    (2, 1, [(0,), (0,)]),
])
def test_each_process_takes_its_own_block_of_the_machines_gpus(processes, gpus, expected):
    assert [process_gpus(processes, rank, gpus) for rank in range(processes)] == expected


def test_device_flag_places_on_cpu_one_gpu_or_the_process_gpus(eight_gpus):
    assert placement_for("cpu") == Placement()
    assert placement_for("auto") == placement_for("cuda") == Placement(tuple(range(8)))
    assert placement_for("auto", processes=2, local_rank=1) == Placement((4, 5, 6, 7))
    assert placement_for("cuda", processes=16, local_rank=9) == Placement((1,), sharers=2)
    assert placement_for("cuda:3", processes=2, local_rank=0, memory_limit=GIB) == Placement((3,), GIB, sharers=2)
    with pytest.raises(UserInputError, match=r"--device cuda:8: this machine has 8 CUDA device\(s\)"):
        placement_for("cuda:8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the placement of a machine without a GPU")
def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_refused():
    assert placement_for("auto", processes=4, local_rank=3).on_cpu
    with pytest.raises(UserInputError, match="--device cuda: no CUDA device is available"):
        placement_for("cuda")


def test_a_gpu_takes_most_of_its_free_memory_split_between_the_processes_sharing_it(eight_gpus):
    assert Placement((0, 1)).budgets() == {0: int(80 * GIB * 0.9), 1: int(80 * GIB * 0.9)}
    assert Placement((5,), sharers=2).budgets() == {5: int(80 * GIB * 0.9 / 2)}
    assert Placement((0, 1), memory_limit=10 * GIB).budgets() == {0: 10 * GIB, 1: 10 * GIB}


# ------------------------------------------------------------------------------------------- the device map
def test_a_model_that_fits_the_first_gpu_stays_whole_on_it(eight_gpus, smollm2_config, smollm2_dir):
    assert device_map(smollm2_config, Placement(tuple(range(8))), smollm2_dir) == {"": 0}
    assert device_map(smollm2_config, Placement((4, 5, 6, 7)), smollm2_dir) == {"": 4}


def test_a_model_that_fits_its_first_gpu_touches_no_other(eight_gpus, smollm2_config, smollm2_dir, monkeypatch):
    """A process given all 8 GPUs asks only GPU 0 for its free memory when the model fits there (asking creates a
    CUDA context, ~0.5 GB, on each GPU asked)."""
    asked = []
    monkeypatch.setattr(placement_module, "free_gpu_memory", lambda gpu: asked.append(gpu) or 80 * GIB)
    assert device_map(smollm2_config, Placement(tuple(range(8))), smollm2_dir) == {"": 0} and asked == [0]
    asked.clear()
    monkeypatch.setattr(placement_module, "free_gpu_memory", lambda gpu: asked.append(gpu) or 400 * MIB)
    assert set(device_map(smollm2_config, Placement(tuple(range(8))), smollm2_dir).values()) == {0, 1}
    assert asked == [0, *range(8)]  # the first alone, then all of them


def test_a_model_larger_than_one_gpu_fills_them_in_layer_order(eight_gpus, smollm2_config, smollm2_dir):
    limit = 200 * MIB  # SmolLM2 in float32 is 513 MiB: three GPUs
    plan = device_map(smollm2_config, Placement((2, 3, 4, 5), memory_limit=limit), smollm2_dir)
    layers = [plan[f"model.layers.{i}"] for i in range(smollm2_config.num_hidden_layers)]
    assert layers == sorted(layers) and set(layers) == {2, 3, 4}  # in order, from the first GPU, GPU 5 unused
    assert plan["model.embed_tokens"] == plan["lm_head"] == 2  # tied: one matrix, on the first GPU
    assert plan["model.norm"] == 4
    held = weights_per_gpu(smollm2_config, plan)
    assert all(size <= limit for size in held.values()), held
    assert sum(held.values()) == sum(p.numel() * 4 for p in _unique_parameters(smollm2_config))


def test_llama2_70b_in_bf16_takes_two_of_eight_80gb_gpus(eight_gpus, monkeypatch):
    """The README's example, with LLaMA-2-70B's shape (no weights needed: the plan is made on the meta device)."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, torch_dtype="bfloat16")
    monkeypatch.setattr(placement_module, "free_gpu_memory", lambda gpu: int(78.5 * GIB))  # an H100 80GB, CUDA up
    assert set(device_map(config, placement_for("auto"), "llama-2-70b").values()) == {0, 1}
    assert set(device_map(config, placement_for("auto", 4, 3), "llama-2-70b").values()) == {6, 7}
    with pytest.raises(UserInputError, match=r"need 128.48 GiB \(bfloat16\) but cuda:5 take\(s\) 70.65 GiB"):
        device_map(config, placement_for("auto", 8, 5), "llama-2-70b")


def _unique_parameters(config):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return list(model.parameters())


def test_weights_that_do_not_fit_are_one_error_before_any_is_read(eight_gpus, smollm2_dir, monkeypatch):
    """No silent offload to CPU or disk: the error names the need, the budgets and what to do."""
    with pytest.raises(UserInputError) as err:
        load_model(smollm2_dir, Placement((0, 1), memory_limit=100 * MIB))  # would read onto GPUs that are not there
    message = str(err.value)
    assert message.startswith(f"{smollm2_dir}: the weights need 0.50 GiB (float32) but cuda:0-1 take(s) "
                              "0.10 + 0.10 GiB (--max_gpu_memory)"), message
    assert "fewer processes per machine" in message and "\n" not in message
    monkeypatch.setattr(placement_module, "free_gpu_memory", lambda gpu: GIB // 2)
    with pytest.raises(UserInputError, match=r"take\(s\) 0.22 GiB \(90% of free memory / 2 processes\)"):
        device_map(AutoConfig.from_pretrained(smollm2_dir), Placement((0,), sharers=2), smollm2_dir)


# ------------------------------------------------------------------------------------------- --max_gpu_memory
@pytest.mark.parametrize("text,size", [("70GiB", 70 * GIB), ("80GB", 80 * 10 ** 9), ("512 MiB", 512 * MIB),
                                       ("1.5gib", int(1.5 * GIB))])
def test_max_gpu_memory_takes_a_size_with_its_unit(text, size):
    assert parse_memory_size(text) == size
    assert parse_args(["--model_path", "m", "--max_gpu_memory", text]).max_gpu_memory == size


@pytest.mark.parametrize("bad", ["70", "lots", "0GiB", "-1GiB", "GiB"])
def test_max_gpu_memory_without_a_unit_or_above_zero_is_a_usage_error(bad):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_memory_size(bad)
    with pytest.raises(UserInputError, match="argument --max_gpu_memory:"):  # one line, exit 2
        parse_args(["--model_path", "m", "--max_gpu_memory", bad])
