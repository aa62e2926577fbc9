"""Training throughput per plugin: tokens/s, MFU and peak GPU memory of train.py's own loop, as a markdown table.

Each run trains ``train.py`` (one process per rank) for ``--steps`` optimizer steps on a LLaMA of a named shape
(``colossal_llama.model.from_config.SHAPES``), the real Mistral tokenizer (vocab 32,000) and real pre-training text
packed to ``--seq_len`` (several documents per row, so the attention keeps documents apart: flex attention with a
document mask on CUDA, the dense block mask with sdpa on CPU). Rows are padded to ``--seq_len`` (one shape, no
recompilation in the measured steps). Figures are read back from the run's TensorBoard scalars
(``train/tokens_per_s``, ``train/mfu``) without the first ``--skip_steps`` steps (compilation, allocator warm-up);
the table shows their median, the attention and Liger setting the run really used (its ``train_config.json``),
and the peak GPU memory (``torch.cuda.max_memory_allocated`` of rank 0). Checkpoints are not written: the
benchmark measures steps, not saving.

A run is ``PLUGIN[,liger=auto|on|off][,mb=N][,acc=N][,attention=auto|flash|flex|sdpa]`` (mb: micro-batch, default
``--micro_batch_size``; acc: accumulation steps). On CPU, plugins and Liger that need CUDA are reported as skipped.

    # one H100/H200: the 1.1B reference shape (TinyLlama: hidden 2048, 22 layers, 32 heads, 4 KV heads)
    python benchmarks/train_throughput.py --shape 1b --seq_len 4096 --steps 8 --skip_steps 3 \\
        --runs zero2,liger=on,mb=4,acc=2 zero2,liger=off,mb=2 ddp 3d gemini
    # CPU (what the test suite runs): a tiny shape, fp32, colossalai's CPU patches (training.cpu_compat)
    python benchmarks/train_throughput.py --shape tiny --seq_len 256 --micro_batch_size 2 --runs ddp zero2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from colossal_llama.utils.cli import str2bool  # noqa: E402
from colossal_llama.utils.errors import UserInputError, cli_entry  # noqa: E402

RANK_ENTRY = "--rank_entry"  # internal: this file is also each rank's entry point (see rank_main)
PEAK_FILE = "peak_memory.json"
GIB = 1 << 30


@dataclass(frozen=True)
class RunSpec:
    label: str
    plugin: str
    liger: str = "auto"
    micro_batch: Optional[int] = None  # None: --micro_batch_size
    accumulation: int = 1
    attention: str = "auto"


@dataclass(frozen=True)
class BenchConfig:
    shape: str
    seq_len: int
    micro_batch_size: int
    runs: List[RunSpec]
    steps: int
    skip_steps: int
    nproc: int
    use_grad_checkpoint: bool
    workdir: Optional[Path]
    corpus: Optional[Path]
    zero_stage: Optional[int]  # 3d plugin; None: 1 on CUDA, 0 on CPU (colossalai's ZeRO under 3d needs bf16/fp16)
    report: Optional[Path]
    run_timeout: float
    target_run: Optional[str] = None  # label of the run held to target_tokens_per_s
    target_tokens_per_s: float = 0.0


@dataclass(frozen=True)
class RunResult:
    spec: RunSpec
    status: str  # "ok", "skipped: why", "failed (exit N): last line"
    steps_measured: int = 0
    tokens_per_s: float = float("nan")
    mfu: float = float("nan")
    peak_gib: Optional[float] = None
    attention: str = "-"
    liger: str = "-"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok" or self.status.startswith("skipped")


def parse_run(text: str) -> RunSpec:
    """``zero2,liger=off,mb=8`` -> RunSpec (a one-line error for anything else)."""
    from colossal_llama.training.config import ATTENTION_CHOICES, PLUGINS

    plugin, *options = text.split(",")
    if plugin not in PLUGINS:
        raise UserInputError(f"--runs {text}: plugin must be one of {', '.join(PLUGINS)}")
    fields = {}
    for option in options:
        key, _, value = option.partition("=")
        if key == "liger" and value in ("auto", "on", "off"):
            fields["liger"] = value
        elif key == "attention" and value in ATTENTION_CHOICES:
            fields["attention"] = value
        elif key in ("mb", "acc") and value.isdigit() and int(value) > 0:
            fields["micro_batch" if key == "mb" else "accumulation"] = int(value)
        else:
            raise UserInputError(f"--runs {text}: bad option {option!r} (liger=auto|on|off, mb=N, acc=N, "
                                 f"attention={'|'.join(ATTENTION_CHOICES)})")
    return RunSpec(text, plugin, **fields)


# ---------------------------------------------------------------------------------------------- inputs
def corpus_slice(source: Path, out_dir: Path, max_chars: int) -> Path:
    """The first rows of every pre-training jsonl in ``source``, taken in turn until ``max_chars`` characters of
    text: enough for the steps measured, without tokenising the whole corpus."""
    files = sorted(source.glob("*.jsonl")) if source.is_dir() else [source]
    if not files:
        raise UserInputError(f"--corpus {source}: no .jsonl files")
    out_dir.mkdir(parents=True, exist_ok=True)
    handles = [open(f, encoding="utf-8") for f in files]
    outs = [open(out_dir / f.name, "w", encoding="utf-8") for f in files]
    chars = 0
    try:
        live = list(range(len(files)))
        while live and chars < max_chars:
            for i in list(live):
                line = handles[i].readline()
                if not line:
                    live.remove(i)
                    continue
                outs[i].write(line)
                chars += len(json.loads(line).get("target", ""))
    finally:
        for fh in handles + outs:
            fh.close()
    return out_dir


def say(cfg: BenchConfig, line: str) -> None:
    """A progress line for the console and, before the table starts, the report."""
    print(f"[throughput] {line}", flush=True)
    append(cfg.report, [f"- {line}"])


def prepare_inputs(cfg: BenchConfig, work: Path, cuda: bool) -> tuple[Path, Path]:
    """(model dir, arrow dir): a randomly initialised LLaMA of ``cfg.shape`` (bf16 weights on disk when CUDA
    trains it) and enough real text packed to ``cfg.seq_len`` for every run's steps."""
    import torch

    from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig
    from colossal_llama.dataset.prepare import prepare_pretrain
    from colossal_llama.model.from_config import SHAPES, build_llama
    from colossal_llama.tokenizer.loading import load_tokenizer, sentencepiece_to_hf_dir
    from colossal_llama.utils.paths import data_root, mistral_tokenizer_model

    for stale in ("tokenizer", "model", "corpus", "data"):  # a reused --workdir starts afresh
        shutil.rmtree(work / stale, ignore_errors=True)
    tokenizer_dir = sentencepiece_to_hf_dir(mistral_tokenizer_model(), work / "tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    start = time.perf_counter()
    with torch.device("cuda" if cuda else "cpu"):  # initialising 1B parameters is seconds on a GPU, minutes on CPU
        model = build_llama(tokenizer, SHAPES[cfg.shape], torch_dtype="bfloat16" if cuda else "float32")
    model.save_pretrained(str(work / "model"), safe_serialization=True)
    tokenizer.save_pretrained(str(work / "model"))
    n_params = sum(p.numel() for p in model.parameters())
    del model
    if cuda:
        torch.cuda.empty_cache()  # the runs are other processes: leave them the memory
    say(cfg, f"model: LLaMA '{cfg.shape}', {n_params / 1e6:,.0f} M parameters, vocab {len(tokenizer)} "
             f"({time.perf_counter() - start:.1f} s)")
    sequences = cfg.steps * max((r.micro_batch or cfg.micro_batch_size) * r.accumulation for r in cfg.runs) * cfg.nproc
    corpus = corpus_slice(cfg.corpus or data_root() / "pretrain", work / "corpus", 2 * sequences * cfg.seq_len)
    start = time.perf_counter()
    summary = prepare_pretrain(PretrainPrepConfig(
        input_dirs=[corpus], tokenizer_dir=tokenizer_dir, output=OutputLayout.under(work / "data"),
        max_length=cfg.seq_len, num_bins=1, num_proc=min(8, os.cpu_count() or 1) if cuda else 1, strict=False,
    ))
    counts = summary.counts
    say(cfg, f"data: {counts.documents_in} real documents packed into {counts.sequences} rows of <= "
             f"{cfg.seq_len} tokens ({time.perf_counter() - start:.1f} s)")
    return work / "model", summary.arrow_dir


# ---------------------------------------------------------------------------------------------- one run
def skip_reason(spec: RunSpec, cuda: bool) -> Optional[str]:
    from colossal_llama.training.plugin import CUDA_ONLY_PLUGINS

    if cuda:
        return None
    if spec.plugin in CUDA_ONLY_PLUGINS:
        return f"{spec.plugin} needs CUDA (HybridAdam, chunk manager)"
    if spec.liger == "on":
        return "Liger's Triton kernels need CUDA"
    if spec.attention == "flex":
        return "FlexAttention has no backward on CPU"
    return None


def train_args(cfg: BenchConfig, spec: RunSpec, model_dir: Path, arrow_dir: Path, run_dir: Path, cuda: bool) -> list:
    return [
        "--pretrained", str(model_dir), "--dataset", str(arrow_dir), "--plugin", spec.plugin,
        "--micro_batch_size", str(spec.micro_batch or cfg.micro_batch_size),
        "--accumulation_steps", str(spec.accumulation), "--max_length", str(cfg.seq_len),
        "--padding_mode", "max_length", "--max_steps", str(cfg.steps), "--num_epochs", "1000",
        "--save_interval", str(10**9), "--log_interval", str(cfg.steps),
        "--save_dir", str(run_dir / "save"), "--tensorboard_dir", str(run_dir / "tb"),
        "--mixed_precision", "bf16" if cuda else "fp32", "--lr", "1e-4", "--warmup_steps", "1",
        "--use_grad_checkpoint", str(cfg.use_grad_checkpoint), "--attention", spec.attention, "--liger", spec.liger,
        "--zero_stage", str(cfg.zero_stage if cfg.zero_stage is not None else int(cuda)),
    ]


def launch_command(cfg: BenchConfig, run_dir: Path, args: list) -> list:
    """This file as every rank's entry point; a single rank needs no launcher."""
    entry = [str(Path(__file__).resolve()), RANK_ENTRY, str(run_dir), "--", *args]
    if cfg.nproc == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.nproc), *entry]


def read_scalars(tb_dir: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tb_dir.is_dir():  # the run failed before its first step
        return []
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return [event.value for event in sorted(acc.Scalars(tag), key=lambda e: e.step)]


def last_error_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    errors = [ln for ln in lines if "Error" in ln or ln.startswith("error")]
    return (errors or lines or ["(no output)"])[-1][:300]


def run_one(cfg: BenchConfig, spec: RunSpec, model_dir: Path, arrow_dir: Path, work: Path, cuda: bool) -> RunResult:
    reason = skip_reason(spec, cuda)
    if reason:
        return RunResult(spec, f"skipped: {reason}")
    run_dir = work / ("run-" + "".join(c if c.isalnum() else "_" for c in spec.label))
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    log = run_dir / "train.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    print(f"[throughput] {spec.label}: training {cfg.steps} steps (log {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        try:
            code = subprocess.run(launch_command(cfg, run_dir, train_args(cfg, spec, model_dir, arrow_dir, run_dir, cuda)),
                                  cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=cfg.run_timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.perf_counter() - start
    tokens_per_s = read_scalars(run_dir / "tb", "train/tokens_per_s")[cfg.skip_steps:]
    mfu = read_scalars(run_dir / "tb", "train/mfu")[cfg.skip_steps:]
    plan_file = run_dir / "save" / "train_config.json"
    plan = json.loads(plan_file.read_text())["plan"] if plan_file.is_file() else {}
    peak_file = run_dir / PEAK_FILE
    peak = json.loads(peak_file.read_text())["max_allocated"] / GIB if peak_file.is_file() and cuda else None
    if code != 0 or not tokens_per_s:
        why = f"timed out after {cfg.run_timeout:.0f} s" if code is None else f"exit {code}"
        status = f"failed ({why}): {last_error_line(log)}"
    else:
        status = "ok"
    return RunResult(spec, status, len(tokens_per_s),
                     statistics.median(tokens_per_s) if tokens_per_s else float("nan"),
                     statistics.median(mfu) if mfu else float("nan"), peak,
                     plan.get("attn_implementation", "-"), ("on" if plan["liger"] else "off") if plan else "-", seconds)


# ---------------------------------------------------------------------------------------------- the table
HEADER = ["| run | attention | Liger | micro-batch x acc | tokens/s | MFU | peak GPU memory | steps measured | wall s | status |",
          "|---|---|---|---|---|---|---|---|---|---|"]


def table_title(cfg: BenchConfig, device: str) -> str:
    return (f"train.py throughput: LLaMA '{cfg.shape}', seq {cfg.seq_len}, {cfg.nproc} rank(s), {device}; "
            f"median of steps {cfg.skip_steps + 1}..{cfg.steps}, tokens/s of all ranks")


def format_row(cfg: BenchConfig, r: RunResult) -> str:
    mb = f"{r.spec.micro_batch or cfg.micro_batch_size} x {r.spec.accumulation}"
    if r.status.startswith("skipped"):
        return f"| {r.spec.label} | - | - | {mb} | - | - | - | 0 | - | {r.status} |"
    peak = f"{r.peak_gib:.1f} GiB" if r.peak_gib is not None else "n/a (CPU)"
    mfu = f"{100 * r.mfu:.1f}%" if r.mfu == r.mfu else "-"
    tps = f"{r.tokens_per_s:,.0f}" if r.tokens_per_s == r.tokens_per_s else "-"
    return (f"| {r.spec.label} | {r.attention} | {r.liger} | {mb} | {tps} | {mfu} | {peak} | {r.steps_measured} | "
            f"{r.seconds:.0f} | {r.status.replace('|', '/')} |")


def target_line(cfg: BenchConfig, results: List[RunResult]) -> Optional[str]:
    """``- target: RUN >= N tokens/s: met (X)`` for ``--target_run``, or why it was not measured."""
    if cfg.target_run is None:
        return None
    want = f"target: {cfg.target_run} >= {cfg.target_tokens_per_s:,.0f} tokens/s"
    result = next((r for r in results if r.spec.label == cfg.target_run), None)
    if result is None or result.status != "ok":
        return f"- {want}: not measured ({result.status if result else 'not run'})"
    verdict = "met" if result.tokens_per_s >= cfg.target_tokens_per_s else "NOT met"
    return f"- {want}: {verdict} ({result.tokens_per_s:,.0f} tokens/s)"


def append(path: Optional[Path], lines: List[str]) -> None:
    """The report grows row by row, so a run stopped half-way still leaves the rows it finished."""
    if path is not None:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> BenchConfig:
    from colossal_llama.model.from_config import SHAPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--micro_batch_size", type=int, default=2, help="default micro-batch of a run")
    p.add_argument("--runs", "--plugins", nargs="+", default=["ddp", "zero2"],
                   help="PLUGIN[,liger=auto|on|off][,mb=N][,acc=N][,attention=...] (see the module doc)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip_steps", type=int, default=2, help="warm-up steps left out of the figures")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: GPUs, or 2 on CPU)")
    p.add_argument("--use_grad_checkpoint", type=str2bool, default=False)
    p.add_argument("--workdir", type=Path, default=None, help="keep inputs and runs here (default: a temp dir)")
    p.add_argument("--corpus", type=Path, default=None, help="pre-training jsonl dir (default: the bundled real corpora)")
    p.add_argument("--zero_stage", type=int, default=None, choices=(0, 1, 2),
                   help="ZeRO stage of the 3d plugin (default 1 on CUDA, 0 on CPU)")
    p.add_argument("--report", type=Path, default=None, help="append the markdown table here, row by row")
    p.add_argument("--run_timeout", type=float, default=900, help="seconds one run may take")
    p.add_argument("--target_run", default=None, help="the run (as given in --runs) held to --target_tokens_per_s")
    p.add_argument("--target_tokens_per_s", type=float, default=0.0)
    a = p.parse_args(argv)
    if a.target_run is not None and a.target_run not in a.runs:
        raise UserInputError(f"--target_run {a.target_run}: not one of --runs")
    if a.steps <= a.skip_steps:
        raise UserInputError(f"--steps {a.steps}: must exceed --skip_steps {a.skip_steps}")
    return BenchConfig(a.shape, a.seq_len, a.micro_batch_size, [parse_run(r) for r in a.runs], a.steps, a.skip_steps,
                       a.nproc or 0, a.use_grad_checkpoint, a.workdir, a.corpus, a.zero_stage, a.report, a.run_timeout,
                       a.target_run, a.target_tokens_per_s)


@cli_entry
def main(argv=None) -> int:
    import torch

    cfg = parse_args(argv)
    cuda = torch.cuda.is_available()
    cfg = replace(cfg, nproc=cfg.nproc or (torch.cuda.device_count() if cuda else 2))
    device = torch.cuda.get_device_name() if cuda else "CPU"
    append(cfg.report, [table_title(cfg, device), ""])
    work = cfg.workdir or Path(tempfile.mkdtemp(prefix="train_throughput-"))
    results = []
    try:
        model_dir, arrow_dir = prepare_inputs(cfg, work, cuda)
        append(cfg.report, ["", *HEADER])
        for spec in cfg.runs:
            result = run_one(cfg, spec, model_dir, arrow_dir, work, cuda)
            results.append(result)
            append(cfg.report, [format_row(cfg, result)])
            print(f"[throughput] {format_row(cfg, result)}", flush=True)
    finally:
        if cfg.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    target = target_line(cfg, results)
    append(cfg.report, [target] if target else [])
    print("\n".join([table_title(cfg, device), "", *HEADER, *(format_row(cfg, r) for r in results),
                      *([target] if target else [])]))
    return 0 if all(r.ok for r in results) else 1


# ---------------------------------------------------------------------------------------------- each rank
def rank_main(run_dir: Path, train_argv: List[str]) -> None:
    """One rank of a benchmark run: train.py with checkpoint writing left out and rank 0's peak GPU memory
    recorded in ``run_dir/peak_memory.json`` when training ends. On CPU, train.py patches colossalai itself."""
    import logging

    import torch

    from colossal_llama.training import checkpoint, metrics
    from colossal_llama.training.cli import main as train_main

    log = logging.getLogger("benchmark")

    def not_saved(self, *args):
        log.info("benchmark: no checkpoint written")
        return self.save_dir / "not-saved"

    checkpoint.Checkpointer.save = not_saved
    checkpoint.Checkpointer.save_final = not_saved
    close = metrics.RunMetrics.close

    def close_and_record_peak(self) -> None:
        close(self)
        if self.enabled and torch.cuda.is_available():
            peak = {"max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved(),
                    "device": torch.cuda.get_device_name()}
            (run_dir / PEAK_FILE).write_text(json.dumps(peak))

    metrics.RunMetrics.close = close_and_record_peak
    train_main(train_argv)


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == RANK_ENTRY and sys.argv[3] == "--":
        rank_main(Path(sys.argv[2]), sys.argv[4:])
    sys.exit(main())
