"""Host memory of every training rank while it builds the model: loaded whole vs built lazily (``3d``/``gemini``),
in fp32 vs in the training precision.

Loaded whole, every rank first reads the whole model into host memory (in fp32 4 bytes a parameter: 28 GB for 7B,
280 GB for 70B, in each of a node's 8 processes) and only then does the plugin shard it. Built lazily
(``--lazy_init``, the default for ``3d`` and ``gemini``) the model holds no memory until boost, each rank
materialises only its tensor-parallel slice or pipeline stage, and the weights are read in one safetensors shard at
a time. ZeRO, gemini and 3d build the model in their precision (bf16: half of fp32); ddp keeps fp32. On CUDA,
ddp and ZeRO read the model straight onto the GPU: not measured here (CPU).

The benchmark writes a checkpoint of LLaMA-2-7B's layer shape (hidden 4096, intermediate 11008, vocab 32000,
bf16 safetensors in 1 GiB shards, like a hub download) with 2, 4 and 8 decoder layers, then starts ``train.py``
under torchrun with 2 ranks on CPU (gloo, the test suite's colossalai CPU patches) for each layout and stops it
once its log says the model is ready: the peak resident memory of the largest and the smallest rank then
(``ru_maxrss``, reported by ``train.py`` itself) and the seconds from launch. Adam's moments are allocated at the
first step, so they are not part of it; ZeRO's fp32 master copy of each rank's shard, made at boost, is (on GPUs it
is on the GPU).

    python benchmarks/train_init_memory.py                  # 2, 4 and 8 layers: about 17 minutes, 4 GB of disk
    python benchmarks/train_init_memory.py --layers 2       # one size
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import torch  # noqa: E402

from colossal_llama.model.from_config import SHAPES  # noqa: E402
from init_model_memory import build_checkpoint, tensor_shapes  # noqa: E402
from tests.support.launch import kill_launcher_and_ranks, start_training, tail  # noqa: E402

READY = re.compile(r"model ready: host memory peak ([\d.]+) GiB \(rank (\d+); smallest ([\d.]+) GiB\)")
COMMON = ["--benchmark", "--num_samples", "4", "--max_length", "32", "--batch_size", "1", "--max_steps", "1",
          "--log_interval", "1"]
FP32, BF16 = ["--mixed_precision", "fp32"], ["--mixed_precision", "bf16"]
TP2, PP2 = ["--plugin", "3d", "--tp", "2", "--zero_stage", "0"], ["--plugin", "3d", "--pp", "2", "--zero_stage", "0",
                                                                  "--microbatch_size", "1"]
LAYOUTS = [  # (name, flags); ZeRO/3d read the model in their precision (bf16: 2 bytes a parameter), ddp in fp32
    ("ddp (whole model per rank), fp32", ["--plugin", "ddp", *FP32]),
    ("zero2, fp32", ["--plugin", "zero2", *FP32]),
    ("zero2, bf16", ["--plugin", "zero2", *BF16]),
    ("3d tp 2, loaded whole, fp32", [*TP2, *FP32, "--lazy_init", "False"]),
    ("3d tp 2, lazy, fp32", [*TP2, *FP32]),
    ("3d pp 2, loaded whole, fp32", [*PP2, *FP32, "--lazy_init", "False"]),
    ("3d pp 2, lazy, fp32", [*PP2, *FP32]),
]


@dataclass
class Ready:
    largest_gib: float
    largest_rank: int
    smallest_gib: float
    seconds: float


def until_ready(model: Path, flags: list[str], log: Path, timeout: float = 900) -> Ready:
    """Launch train.py on 2 ranks, wait for its 'model ready' line, then kill -9 the launcher and the ranks."""
    proc = start_training(["--pretrained", str(model), "--save_dir", str(log.with_suffix(".save")), *COMMON, *flags],
                          log)
    started, deadline = time.monotonic(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            found = READY.search(log.read_text(errors="replace")) if log.is_file() else None
            if found:
                return Ready(float(found.group(1)), int(found.group(2)), float(found.group(3)),
                             time.monotonic() - started)
            if proc.poll() is not None:
                raise SystemExit(f"train.py ended (rc {proc.returncode}) before the model was ready:\n{tail(log)}")
            time.sleep(0.2)
        raise SystemExit(f"no 'model ready' line after {timeout:.0f} s:\n{tail(log)}")
    finally:
        if proc.poll() is None:
            kill_launcher_and_ranks(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="decoder layers of the 7B shape")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir (default: system tmp)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="train_init_bench.", dir=args.workdir))
    rows = []
    try:
        for layers in args.layers:
            shape = replace(SHAPES["7b"], num_hidden_layers=layers)
            params = sum(torch.Size(s).numel() for _, s in tensor_shapes(shape))
            model = work / f"llama-{layers}l"
            build_checkpoint(model, shape, torch.bfloat16, 2**30)
            for name, flags in LAYOUTS:
                ready = until_ready(model, flags, work / f"{layers}l-{len(rows)}.log")
                rows.append((layers, params, name, ready))
                print(f"{layers} layers, {name}: {ready}", flush=True)
            shutil.rmtree(model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| model (7B layer shape) | fp32 size | layout (2 ranks) | host peak, largest rank | smallest rank | "
          "vs ddp | s to ready |\n|---|---|---|---|---|---|---|")
    for layers, params, name, ready in rows:
        ddp = next(r for lay, _, n, r in rows if lay == layers and n.startswith("ddp"))
        print(f"| {layers} layers, {params / 1e9:.2f} B params | {params * 4 / 2**30:.1f} GiB | {name} | "
              f"{ready.largest_gib:.2f} GiB (rank {ready.largest_rank}) | {ready.smallest_gib:.2f} GiB | "
              f"{ready.largest_gib / ddp.largest_gib:.2f}x | {ready.seconds:.0f} |")


if __name__ == "__main__":
    main()
