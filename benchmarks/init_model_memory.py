"""Peak memory and wall time of model init on a 7B-shaped LLaMA checkpoint (SPEC section 2).

Builds, streamed to disk, a LLaMA-2-7B-shaped checkpoint (hidden 4096, 32 layers, intermediate 11008,
vocab 32000, fp16, ~2 GB safetensors shards) with seeded random values, expands the real Mistral tokenizer
with real jieba words to 69,104 tokens (the Colossal-LLaMA-2 vocabulary size), runs
``colossal_llama/model/init_model.py`` in a child process and prints a table: checkpoint size, wall time,
peak RSS of the child. The original loads the whole model in fp32 (~27 GB for 7B); the target is < 3 GB.

    python benchmarks/init_model_memory.py                # full scale: ~27 GB of disk in a temp dir
    python benchmarks/init_model_memory.py --layers 2     # quick run
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import psutil
import torch

from colossal_llama.model.from_config import SHAPES, LlamaShape
from colossal_llama.model.safetensors_stream import TORCH_TO_ST, OutputTensor, write_safetensors, write_tensor_bytes
from colossal_llama.tokenizer.loading import load_tokenizer
from colossal_llama.utils.paths import data_root, mistral_tokenizer_model

REPO = Path(__file__).resolve().parents[1]
TARGET_VOCAB = 69104


SOURCE_VOCAB = 32000  # LLaMA-2 / Mistral


def tensor_shapes(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """HF LLaMA tensor names and shapes in the order ``save_pretrained`` shards them (MHA: k/v are h x h)."""
    h, i = shape.hidden_size, shape.intermediate_size
    names = [("model.embed_tokens.weight", (SOURCE_VOCAB, h))]
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        names += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        names += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i))]
        names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return names + [("model.norm.weight", (h,)), ("lm_head.weight", (SOURCE_VOCAB, h))]


def random_tensor(name: str, shape: tuple, dtype: torch.dtype, seed: int) -> OutputTensor:
    """An output whose values (N(0, 0.02), norms = 1) are generated only while it is written."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()

    def write_to(fh) -> None:
        if len(shape) == 1:
            value = torch.ones(shape, dtype=dtype)
        else:
            value = torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))
        write_tensor_bytes(fh, value)

    return OutputTensor(name, TORCH_TO_ST[dtype], shape, nbytes, write_to)


def build_checkpoint(folder: Path, shape: LlamaShape, dtype: torch.dtype, shard_bytes: int) -> int:
    """Write config, tokenizer and sharded safetensors into ``folder``; returns the weight bytes."""
    from tqdm import tqdm
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    tensors = [random_tensor(n, s, dtype, seed) for seed, (n, s) in enumerate(tensor_shapes(shape))]
    shards, current = [], []
    for t in tensors:
        if current and sum(x.nbytes for x in current) + t.nbytes > shard_bytes:
            shards.append(current)
            current = []
        current.append(t)
    shards.append(current)
    weight_map, total = {}, sum(t.nbytes for t in tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc="build checkpoint", mininterval=2.0) as bar:
        for k, shard in enumerate(shards, start=1):
            name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(folder / name, shard, {"format": "pt"}, progress=bar.update)
            weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = LlamaConfig(vocab_size=SOURCE_VOCAB, torch_dtype=dtype, **asdict(shape))
    config.save_pretrained(str(folder))
    load_tokenizer(mistral_tokenizer_model().parent).save_pretrained(str(folder))
    return total


def build_expanded_tokenizer(folder: Path, target_size: int) -> int:
    """The real Mistral tokenizer expanded with the most frequent jieba words to ``target_size`` tokens."""
    from colossal_llama.tokenizer.init_tokenizer import expand_tokenizer
    from colossal_llama.tokenizer.mine_pieces import top_cjk_words

    words = top_cjk_words(data_root() / "vocab" / "jieba_dict.txt", 2 * target_size)
    count = target_size - SOURCE_VOCAB
    for _ in range(8):  # pieces already present, added characters and bridges shift the size a little
        report = expand_tokenizer(mistral_tokenizer_model().parent, folder, words[:count], overwrite=True,
                                  report_max_chars=5000)
        if report.vocab_after == target_size:
            break
        count += target_size - report.vocab_after
    return report.vocab_after


def run_init(source: Path, tokenizer: Path, target: Path) -> dict:
    """Run the CLI in a child process; wall time and peak RSS (ru_maxrss and psutil sampling)."""
    report_json = target.with_name("init_report.json")
    cmd = [sys.executable, str(REPO / "colossal_llama" / "model" / "init_model.py"),
           "--source_model_and_tokenizer_path", str(source), "--target_tokenizer_path", str(tokenizer),
           "--target_model_path", str(target), "--report_json", str(report_json)]
    started = time.monotonic()
    child = subprocess.Popen(cmd)
    sampled_peak = 0
    proc = psutil.Process(child.pid)
    while child.poll() is None:
        try:
            sampled_peak = max(sampled_peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    wall = time.monotonic() - started
    if child.returncode != 0:
        raise SystemExit(f"init_model failed with exit code {child.returncode}")
    return {"wall_s": wall, "ru_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "sampled_peak": sampled_peak, "report": json.loads(report_json.read_text())}


def spot_check(source: Path, target: Path, shape: LlamaShape, vocab: int) -> None:
    """A few tensors bit-identical, the embedding resized: the run did what it claims."""
    from safetensors import safe_open

    index = json.loads((target / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("model.layers.0.mlp.down_proj.weight", f"model.layers.{shape.num_hidden_layers - 1}.self_attn.q_proj.weight"):
        with safe_open(str(source / index[name]), "pt") as a, safe_open(str(target / index[name]), "pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    with safe_open(str(target / index["lm_head.weight"]), "pt") as f:
        assert f.get_slice("lm_head.weight").get_shape() == [vocab, shape.hidden_size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = 7B shape)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--shard_gb", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir (default: system tmp)")
    args = parser.parse_args()
    shape = replace(SHAPES["7b"], num_hidden_layers=args.layers)
    dtype = getattr(torch, args.dtype)
    work = Path(tempfile.mkdtemp(prefix="init_model_bench.", dir=args.workdir))
    try:
        need = 2.1 * 2 * sum(torch.Size(s).numel() for _, s in tensor_shapes(shape))
        free = shutil.disk_usage(work).free
        if free < need:
            raise SystemExit(f"{work}: {free / 2**30:.1f} GiB free, need ~{need / 2**30:.1f} GiB (try --layers 2)")
        t0 = time.monotonic()
        weight_bytes = build_checkpoint(work / "source", shape, dtype, int(args.shard_gb * 2**30))
        build_s = time.monotonic() - t0
        vocab = build_expanded_tokenizer(work / "tokenizer", TARGET_VOCAB)
        result = run_init(work / "source", work / "tokenizer", work / "target")
        spot_check(work / "source", work / "target", shape, vocab)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = result["report"]
    rows = [
        ("shape", f"{shape.num_hidden_layers} layers x {shape.hidden_size} hidden, {args.dtype}"),
        ("checkpoint size", f"{weight_bytes / 2**30:.2f} GiB in {report['shards']} shards"),
        ("vocabulary", f"{report['old_vocab_size']} -> {report['new_vocab_size']} (tokenizer {vocab})"),
        ("new rows x matrices", f"{report['new_rows']} x {len(report['vocab_matrices'])}"),
        ("pieces per new row", f"mean {report['pieces_per_new_row']['mean']}, max {report['pieces_per_new_row']['max']}"),
        ("bytes written", f"{report['bytes_written'] / 2**30:.2f} GiB"),
        ("build checkpoint", f"{build_s:.1f} s"),
        ("init wall time (child)", f"{result['wall_s']:.1f} s"),
        ("init throughput", f"{report['bytes_written'] / 2**20 / result['wall_s']:.0f} MiB/s"),
        ("peak RSS, ru_maxrss", f"{result['ru_maxrss'] / 2**30:.2f} GiB"),
        ("peak RSS, psutil 50 ms", f"{result['sampled_peak'] / 2**30:.2f} GiB"),
        ("target", "< 3 GiB " + ("PASS" if result["ru_maxrss"] < 3 * 2**30 else "FAIL")),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n{'metric':<{width}} | value\n{'-' * width}-+-{'-' * 40}")
    for key, value in rows:
        print(f"{key:<{width}} | {value}")


if __name__ == "__main__":
    main()
