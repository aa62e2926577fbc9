"""Training throughput per plugin: tokens/s and MFU of train.py's own loop, printed as a table.

Each plugin runs ``train.py`` under ``torchrun`` for a few optimizer steps on a LLaMA of a named shape
(``colossal_llama.model.from_config.SHAPES``), the real Mistral tokenizer (vocab 32,000) and the real
pre-training corpora packed to ``--seq_len``. Figures are read back from the run's TensorBoard scalars
(``train/tokens_per_s``, ``train/mfu``), skipping the first ``--skip_steps`` steps (compilation, allocator
warm-up). The table shows the median per-step figures.

    # one H100/H200 (the issue's 1.1B reference shape)
    python benchmarks/train_throughput.py --shape 1b --seq_len 4096 --micro_batch_size 4 \
        --plugins zero2 ddp 3d gemini --steps 12 --use_grad_checkpoint False
    # CPU (what the test suite runs): a tiny shape, fp32, the colossalai CPU patches of tests/support
    python benchmarks/train_throughput.py --shape tiny --seq_len 256 --micro_batch_size 2 --plugins ddp zero2
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from colossal_llama.utils.cli import str2bool  # noqa: E402
from colossal_llama.utils.errors import UserInputError, cli_entry  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    shape: str
    seq_len: int
    micro_batch_size: int
    plugins: List[str]
    steps: int
    skip_steps: int
    nproc: int
    use_grad_checkpoint: bool
    use_flash_attn: bool
    workdir: Optional[Path]
    corpus: Optional[Path]
    zero_stage: Optional[int]  # 3d plugin; None: 1 on CUDA, 0 on CPU (colossalai's ZeRO under 3d needs bf16/fp16)


@dataclass(frozen=True)
class PluginResult:
    plugin: str
    steps_measured: int
    tokens_per_s: float
    mfu: float
    returncode: int


def prepare_inputs(cfg: BenchConfig, work: Path) -> tuple[Path, Path]:
    """(model dir, arrow dir): a LLaMA of ``cfg.shape`` and the real corpora packed to ``cfg.seq_len``."""
    from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig
    from colossal_llama.dataset.prepare import prepare_pretrain
    from colossal_llama.model.from_config import save_llama_from_config
    from colossal_llama.tokenizer.loading import sentencepiece_to_hf_dir
    from colossal_llama.utils.paths import data_root, mistral_tokenizer_model

    tokenizer_dir = sentencepiece_to_hf_dir(mistral_tokenizer_model(), work / "tokenizer")
    model_dir = save_llama_from_config(tokenizer_dir, work / "model", cfg.shape)
    summary = prepare_pretrain(PretrainPrepConfig(
        input_dirs=[cfg.corpus or data_root() / "pretrain"], tokenizer_dir=tokenizer_dir, output=OutputLayout.under(work / "data"),
        max_length=cfg.seq_len, num_bins=1, num_proc=1, strict=False,
    ))
    return model_dir, summary.arrow_dir


def train_command(cfg: BenchConfig, plugin: str, model_dir: Path, arrow_dir: Path, run_dir: Path, cuda: bool) -> list:
    """torchrun + train.py (the CPU test entry, which only adds colossalai's CPU patches, when there is no CUDA)."""
    entry = REPO / "train.py" if cuda else REPO / "tests" / "support" / "train_entry.py"
    torchrun = Path(sys.executable).with_name("torchrun")
    return [
        str(torchrun), "--standalone", "--nproc_per_node", str(cfg.nproc), str(entry),
        "--pretrained", str(model_dir), "--dataset", str(arrow_dir), "--plugin", plugin,
        "--micro_batch_size", str(cfg.micro_batch_size), "--max_length", str(cfg.seq_len),
        "--max_steps", str(cfg.steps), "--save_interval", str(10**9), "--log_interval", str(cfg.steps),
        "--save_dir", str(run_dir / "save"), "--tensorboard_dir", str(run_dir / "tb"),
        "--mixed_precision", "bf16" if cuda else "fp32", "--lr", "1e-4", "--warmup_steps", "1",
        "--use_grad_checkpoint", str(cfg.use_grad_checkpoint), "--use_flash_attn", str(cfg.use_flash_attn),
        "--zero_stage", str(cfg.zero_stage if cfg.zero_stage is not None else int(cuda)),
    ]


def read_scalars(tb_dir: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tb_dir.is_dir():  # the run failed before its first step
        return []
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return [event.value for event in sorted(acc.Scalars(tag), key=lambda e: e.step)]


def run_plugin(cfg: BenchConfig, plugin: str, model_dir: Path, arrow_dir: Path, work: Path, cuda: bool) -> PluginResult:
    run_dir = work / f"run-{plugin}"
    proc = subprocess.run(train_command(cfg, plugin, model_dir, arrow_dir, run_dir, cuda), cwd=REPO)
    tokens_per_s = read_scalars(run_dir / "tb", "train/tokens_per_s")[cfg.skip_steps:]
    mfu = read_scalars(run_dir / "tb", "train/mfu")[cfg.skip_steps:]
    if proc.returncode != 0 or not tokens_per_s:
        return PluginResult(plugin, len(tokens_per_s), float("nan"), float("nan"), proc.returncode)
    return PluginResult(plugin, len(tokens_per_s), statistics.median(tokens_per_s),
                        statistics.median(mfu) if mfu else 0.0, proc.returncode)


def format_table(cfg: BenchConfig, device: str, results: List[PluginResult]) -> str:
    head = (f"train.py throughput: LLaMA '{cfg.shape}', seq {cfg.seq_len}, micro-batch {cfg.micro_batch_size}, "
            f"{cfg.nproc} rank(s), {device}; median of steps {cfg.skip_steps + 1}..{cfg.steps}")
    rows = ["| plugin | steps measured | tokens/s (all ranks) | MFU | exit |", "|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.plugin} | {r.steps_measured} | {r.tokens_per_s:,.0f} | {100 * r.mfu:.1f}% | {r.returncode} |")
    return "\n".join([head, *rows])


def parse_args(argv=None) -> BenchConfig:
    from colossal_llama.model.from_config import SHAPES
    from colossal_llama.training.config import PLUGINS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--micro_batch_size", type=int, default=2)
    p.add_argument("--plugins", nargs="+", default=["ddp", "zero2"], choices=PLUGINS)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip_steps", type=int, default=2, help="warm-up steps left out of the figures")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: GPUs, or 2 on CPU)")
    p.add_argument("--use_grad_checkpoint", type=str2bool, default=False)
    p.add_argument("--use_flash_attn", type=str2bool, default=True)
    p.add_argument("--workdir", type=Path, default=None, help="keep inputs and runs here (default: a temp dir)")
    p.add_argument("--corpus", type=Path, default=None, help="pre-training jsonl dir (default: the bundled real corpora)")
    p.add_argument("--zero_stage", type=int, default=None, choices=(0, 1, 2),
                   help="ZeRO stage of the 3d plugin (default 1 on CUDA, 0 on CPU)")
    a = p.parse_args(argv)
    if a.steps <= a.skip_steps:
        raise UserInputError(f"--steps {a.steps}: must exceed --skip_steps {a.skip_steps}")
    return BenchConfig(a.shape, a.seq_len, a.micro_batch_size, a.plugins, a.steps, a.skip_steps, a.nproc or 0,
                       a.use_grad_checkpoint, a.use_flash_attn, a.workdir, a.corpus, a.zero_stage)


@cli_entry
def main(argv=None) -> int:
    import torch

    cfg = parse_args(argv)
    cuda = torch.cuda.is_available()
    nproc = cfg.nproc or (torch.cuda.device_count() if cuda else 2)
    cfg = BenchConfig(**{**cfg.__dict__, "nproc": nproc})
    device = torch.cuda.get_device_name() if cuda else "CPU"
    work = cfg.workdir or Path(tempfile.mkdtemp(prefix="train_throughput-"))
    try:
        model_dir, arrow_dir = prepare_inputs(cfg, work)
        results = [run_plugin(cfg, plugin, model_dir, arrow_dir, work, cuda) for plugin in cfg.plugins]
    finally:
        if cfg.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(format_table(cfg, device, results))
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
