"""The CUDA paths, on one GPU (``pytest -m cuda``; skipped without one). ``scripts/gpu_check.sh`` runs them.

Specification (tiny LLaMA with the real SmolLM2 tokenizer, real prepared data, 4 optimizer steps of 4 packed rows):
- each of the six plugins (ddp, zero2, zero2_cpu, gemini, gemini_auto, 3d) trains in bf16, really as itself (the
  plugin class in its run plan), with per-step losses within 2 % of ddp's; ddp and ZeRO read the model straight
  onto the GPU (ddp in fp32, ZeRO in bf16), gemini and 3d build it lazily in bf16 (the run's "model ready" line);
- gemini with 2 accumulation steps (2 micro-batches of 2 rows) trains ddp's curve within 2 % (without
  colossalai's gradient accumulation each micro-batch's gradient replaced the last one's); gemini_auto skips the
  validation before the first step (its warm-up must be a training iteration) and says so;
- fp16 with loss scaling (zero2) runs: finite losses, and its first loss (before any update) within 2 % of ddp's,
  its first gradient norm within 5 % (colossalai measures it on the scaled gradients: it was 65,536x);
- attention: ``auto`` trains with FlexAttention and its document mask when flash-attn is absent, and gives the
  same per-step losses as the dense-mask sdpa path within 1e-2; Liger kernels on vs off likewise (off: the loss on
  scored positions in chunks, on the GPU);
- ``--load_checkpoint`` of step 2 resumes zero2, gemini (ColossalAI issue 5597: the original's gemini resume
  hangs) and zero2 in fp16: steps 3-4 see the same data (token counts) and schedule (lr) exactly, step 3's loss
  (same half-precision weights, same batch) within 1e-4 and step 4's within 2e-3 (zero2 puts its saved fp32
  master weights back; gemini rebuilds its own from the bf16 weights; GPU kernels need not sum in one order);
  fp16 takes the saved loss scale, and overflows (skipped steps) at the same steps;
- ``inference_example.py --device cuda`` and the web chat (``--device cuda``) generate on the GPU what the library
  generates greedily on the GPU in this process;
- ``evaluate.py bpc --device cuda`` under ``torchrun --nproc_per_node 2`` (both processes on the one GPU) reports
  what one process reports on the GPU;
- models load straight onto the GPU through accelerate's device map (whole on GPU 0 when they fit); weights larger
  than ``--max_gpu_memory`` are refused before any is read; with 2 GPUs, a model spread over both scores what one
  GPU does.

The training runs all start when the module starts (a tiny model uses a sliver of the GPU; a resume starts when
its checkpoint is written), and the generation tests run meanwhile: the module takes about its slowest run.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from colossal_llama.training.metrics import read_loss_log
from tests.support.launch import REPO, tail
from tests.support.train_runs import train_args

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")]

STEPS = 4
RUN_TIMEOUT_S = 300  # a run that takes longer hangs (the original's gemini resume did)
# Rows padded to max_length: one shape, so FlexAttention compiles once per process (no dynamic-shape recompiles).
BF16 = ["--mixed_precision", "bf16", "--max_steps", str(STEPS), "--save_interval", "2", "--batch_size", "4",
        "--accumulation_steps", "1", "--log_interval", "1", "--padding_mode", "max_length"]
PLUGINS = ("ddp", "zero2", "zero2_cpu", "gemini", "gemini_auto", "3d")
PLUGIN_CLASS = {"ddp": "TorchDDPPlugin", "zero2": "LowLevelZeroPlugin_ZeRO-2", "zero2_cpu": "LowLevelZeroPlugin_ZeRO-2",
                "gemini": "GeminiPlugin", "gemini_auto": "GeminiPlugin", "3d": "HybridParallelPlugin"}
# name -> flags that differ from BF16
FIRST_PHASE: Dict[str, List[str]] = {
    **{p: ["--plugin", p] for p in PLUGINS},
    "zero2_fp16": ["--plugin", "zero2", "--mixed_precision", "fp16"],
    "gemini_acc2": ["--plugin", "gemini", "--batch_size", "2", "--accumulation_steps", "2"],
    "ddp_sdpa": ["--plugin", "ddp", "--attention", "sdpa"],
    "ddp_no_liger": ["--plugin", "ddp", "--liger", "off"],
}
RESUMED = ("zero2", "gemini", "zero2_fp16")


def free_ports(n: int) -> List[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Runs:
    """The training runs, started in the background when the module starts (the generation tests run meanwhile).

    Every run is a single-rank ``train.py``. A resumed run starts as soon as the step-2 checkpoint it resumes from
    is complete, while the others still train. :meth:`wait` -> name -> {save_dir, log, code}.
    """

    def __init__(self, root: Path, model: Path, data: Path):
        self.root, self.model, self.data = root, model, data
        self.ports = iter(free_ports(len(FIRST_PHASE) + len(RESUMED)))
        self.procs: Dict[str, tuple] = {}
        for name, extra in FIRST_PHASE.items():
            self._start(name, extra)
        self.watcher = threading.Thread(target=self._watch, name="cuda-runs", daemon=True)
        self.watcher.start()

    def _start(self, name: str, extra: List[str]) -> None:
        env = {**os.environ, "MASTER_PORT": str(next(self.ports)), "PYTHONUNBUFFERED": "1",
               "TOKENIZERS_PARALLELISM": "false",
               "TORCHINDUCTOR_COMPILE_THREADS": "1"}  # a dozen processes compiling: no worker pool each
        log = self.root / f"{name}.log"
        fh = open(log, "w")
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                                 *train_args(self.model, self.data, self.root / name, *BF16, *extra)],
                                cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        self.procs[name] = (proc, fh, log, time.monotonic())

    def _watch(self) -> None:
        waiting = set(RESUMED)
        while True:
            for name in sorted(waiting):
                checkpoint = self.root / name / "epoch-0_step-2"
                if (checkpoint / "running_states.json").is_file():
                    self._start(f"{name}_resumed", [*FIRST_PHASE[name], "--load_checkpoint", str(checkpoint)])
                    waiting.discard(name)
                elif self.procs[name][0].poll() is not None:  # ended without that checkpoint: nothing to resume
                    waiting.discard(name)
            running = False
            for proc, _fh, _log, started in list(self.procs.values()):
                if proc.poll() is None:
                    running = True
                    if time.monotonic() - started > RUN_TIMEOUT_S:
                        proc.kill()
            if not running and not waiting:
                return
            time.sleep(0.5)

    def result(self, name: str) -> Optional[dict]:
        """Run ``name`` once it ended (None: a resumed run never started, its first run left no checkpoint). Each
        test waits for its own runs only: when the GPU check's time limit cuts pytest, the tests whose runs ended
        are reported (waiting for every run first reported no training test at all)."""
        while name not in self.procs and self.watcher.is_alive():  # a resumed run starts at its checkpoint
            time.sleep(0.5)
        if name not in self.procs:
            return None
        proc, fh, log, _started = self.procs[name]
        code = proc.wait()  # the watcher kills a run past RUN_TIMEOUT_S
        fh.close()
        return {"save_dir": self.root / name, "log": log,
                "code": code if code >= 0 else f"killed (signal {-code}; hung past {RUN_TIMEOUT_S} s?)"}

    def kill(self) -> None:
        for proc, *_ in self.procs.values():
            if proc.poll() is None:
                proc.kill()


@pytest.fixture(scope="module", autouse=True)
def launched(tmp_path_factory, tiny_llama, prepared_pretrain):
    runs = Runs(tmp_path_factory.mktemp("cuda-runs"), tiny_llama, prepared_pretrain)
    yield runs
    runs.kill()


class RunResults:
    """``runs[name]`` / ``runs.get(name)``: the run's result, waiting for that run alone (:meth:`Runs.result`)."""

    def __init__(self, launched: Runs):
        self.launched, self.done = launched, {}

    def get(self, name: str) -> Optional[dict]:
        if name not in self.done:
            self.done[name] = self.launched.result(name)
        return self.done[name]

    def __getitem__(self, name: str) -> dict:
        result = self.get(name)
        if result is None:
            raise KeyError(f"{name} was not started")
        return result


@pytest.fixture(scope="module")
def runs(launched) -> RunResults:
    return RunResults(launched)


def finished(runs: RunResults, name: str) -> List[dict]:
    run = runs.get(name)
    assert run is not None, f"{name} was not started (the run it resumes failed)"
    assert run["code"] == 0, f"{name}: exit {run['code']}\n{tail(run['log'])}"
    return read_loss_log(run["save_dir"] / "losses.jsonl")


def plan(runs: RunResults, name: str) -> dict:
    return json.loads((runs[name]["save_dir"] / "train_config.json").read_text())["plan"]


def losses(records: List[dict]) -> List[float]:
    return [r["loss"] for r in records]


# ------------------------------------------------------------------------------------------------ generation
# First in the module: the training runs go on in the background meanwhile.
@pytest.fixture(scope="module")
def smollm2_cuda(smollm2_dir):
    from colossal_llama.inference.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(smollm2_dir, device="cuda")
    assert model.device.type == "cuda"
    assert model.hf_device_map == {"": 0}  # through the device map, whole on the first GPU: it fits
    assert {p.device for p in model.parameters()} == {torch.device("cuda", 0)}
    return model, tokenizer


def greedy_reply(smollm2_cuda, smollm2_dir, history, max_new_tokens=16) -> str:
    from colossal_llama.inference.generation import SamplingConfig, generate_text
    from colossal_llama.inference.prompting import resolve_chat_template

    model, tokenizer = smollm2_cuda
    template = resolve_chat_template(smollm2_dir, tokenizer)
    return generate_text(model, tokenizer, template.encode_prompt(history),
                         SamplingConfig(max_new_tokens, False, stop_token_ids=template.stop_token_ids))


def test_inference_example_generates_on_cuda(smollm2_cuda, smollm2_dir):
    prompt = "Name three primary colours."
    proc = subprocess.run(
        [sys.executable, str(REPO / "inference_example.py"), "--model_path", str(smollm2_dir), "--input_txt", prompt,
         "--do_sample", "False", "--max_new_tokens", "16", "--device", "cuda"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = greedy_reply(smollm2_cuda, smollm2_dir, [{"from": "human", "content": prompt}])  # = sft_prompt_ids
    assert expected.strip() and proc.stdout == f">>> {prompt}\n{expected}\n"


def test_web_chat_streams_a_reply_generated_on_cuda(smollm2_cuda, smollm2_dir):
    server = subprocess.Popen(
        [sys.executable, "-m", "colossal_llama.eval.web", "--model_path", str(smollm2_dir), "--device", "cuda",
         "--port", "0", "--do_sample", "False", "--max_new_tokens", "16"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in server.stdout:  # "serving M (template T) on http://127.0.0.1:PORT/ ..."
            match = re.search(r"on (http://[\d.]+:\d+)/", line)
            if match:
                url = match.group(1)
                break
        assert url, "the server never said where it serves"
        history = [{"from": "human", "content": "What is the capital of France?"}]
        req = urllib.request.Request(url + "/api/chat", data=json.dumps({"messages": history}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            body = resp.read().decode()
        events = [json.loads(b[len("data: "):]) for b in body.split("\n\n") if b.startswith("data: ")]
        assert events and events[-1].get("done") is True, body
        reply = "".join(e.get("delta", "") for e in events)
        assert reply.strip() and reply == greedy_reply(smollm2_cuda, smollm2_dir, history)
    finally:
        server.kill()
        server.wait()


def test_evaluate_under_torchrun_scores_on_cuda_what_one_process_does(smollm2_dir, data_dir, tmp_path):
    from tests.support.launch import torchrun_command, worker_env

    args = ["bpc", "--model_path", str(smollm2_dir), "--data", str(data_dir / "pretrain" / "en_novel_botchan.jsonl"),
            "--max_samples", "3", "--window", "128", "--stride", "64", "--batch_size", "2", "--device", "cuda"]
    reports = []
    for name, command in (("one", [sys.executable, str(REPO / "evaluate.py")]),
                          ("two", torchrun_command([], nproc=2, entry=REPO / "evaluate.py"))):
        out = tmp_path / f"{name}.json"
        proc = subprocess.run([*command, *args, "--output", str(out)], capture_output=True, text=True, cwd=REPO,
                              env=worker_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports.append(json.loads(out.read_text()))
    one, two = reports
    assert one["tokens"] > 3 * 128 and two["tokens"] == one["tokens"] and two["characters"] == one["characters"]
    assert two["bits"] == pytest.approx(one["bits"], rel=1e-6)


BPC_ARGS = ["bpc", "--max_samples", "3", "--window", "128", "--stride", "64", "--batch_size", "2"]


def test_weights_larger_than_max_gpu_memory_are_refused_before_loading(smollm2_dir):
    from colossal_llama.inference.loading import load_model
    from colossal_llama.inference.placement import Placement, placement_for
    from colossal_llama.utils.errors import UserInputError

    allocated = torch.cuda.memory_allocated(0)
    with pytest.raises(UserInputError, match=r"the weights need 0.50 GiB \(float32\) but cuda:0 take\(s\) 0.06 GiB"):
        load_model(smollm2_dir, Placement((0,), memory_limit=64 * 2 ** 20))
    assert torch.cuda.memory_allocated(0) == allocated  # nothing was read onto the GPU
    assert placement_for("cuda:0").budgets()[0] > 0.5 * torch.cuda.mem_get_info(0)[0]  # the default: most of it


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="spreading a model needs >= 2 GPUs")
def test_a_model_spread_over_two_gpus_scores_what_one_gpu_does(smollm2_dir, data_dir, tmp_path):
    """SmolLM2 in float32 (0.5 GiB) with 320 MiB a GPU: layers on cuda:0 and cuda:1, the same bits as cuda:0."""
    reports = {}
    for name, where in (("one", ["--device", "cuda:0"]), ("two", ["--device", "cuda", "--max_gpu_memory", "320MiB"])):
        out = tmp_path / f"{name}.json"
        proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *BPC_ARGS, "--model_path", str(smollm2_dir),
                               "--data", str(data_dir / "pretrain" / "en_novel_botchan.jsonl"), *where,
                               "--output", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[name] = (json.loads(out.read_text()), proc.stderr)
    (one, _), (two, log) = reports["one"], reports["two"]
    assert re.search(r"model weights: cuda:0 0\.\d+ GiB, cuda:1 0\.\d+ GiB", log), log[-3000:]
    assert two["tokens"] == one["tokens"] and two["bits"] == pytest.approx(one["bits"], rel=1e-5)


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("plugin", PLUGINS)
def test_each_plugin_trains_in_bf16_within_2_percent_of_ddp(runs, plugin):
    ddp, got = losses(finished(runs, "ddp")), losses(finished(runs, plugin))
    assert len(got) == len(ddp) == STEPS
    assert all(math.isfinite(x) for x in got), got
    for step, (a, b) in enumerate(zip(ddp, got), start=1):
        assert abs(b - a) <= 0.02 * abs(a), f"{plugin} step {step}: ddp {a:.4f} vs {b:.4f}"
    assert got[-1] < got[0], f"{plugin} did not learn: {got}"
    assert plan(runs, plugin)["plugin_class"] == PLUGIN_CLASS[plugin]
    if plugin == "gemini_auto":
        assert "gemini_auto: no validation before the first step" in runs[plugin]["log"].read_text()
    assert plan(runs, plugin)["cpu_offload"] == (plugin == "zero2_cpu")  # zero2 and zero2_cpu share a class
    # built where and in what it trains: ddp/ZeRO read whole straight onto the GPU (ddp in fp32, it autocasts),
    # gemini/3d built lazily in bf16
    built = {"ddp": "float32 on the GPU", "zero2": "bfloat16 on the GPU", "zero2_cpu": "bfloat16 on the GPU"}
    expected = built.get(plugin, "bfloat16, lazily")
    log = runs[plugin]["log"]
    assert re.search(rf"model ready: host memory peak [\d.]+ GiB .*built in {expected}", log.read_text()), tail(log)


def test_gemini_accumulates_gradients_over_micro_batches(runs):
    ddp, got = losses(finished(runs, "ddp")), losses(finished(runs, "gemini_acc2"))
    assert len(got) == len(ddp) == STEPS
    for step, (a, b) in enumerate(zip(ddp, got), start=1):
        assert abs(b - a) <= 0.02 * abs(a), f"gemini, 2 accumulation steps, step {step}: ddp {a:.4f} vs {b:.4f}"


def test_fp16_with_loss_scaling_runs(runs):
    # the first step the loss scaler did not skip (an overflow logs no norm): the same weights until then
    fp16_records = finished(runs, "zero2_fp16")
    step = next((r["step"] for r in fp16_records if r["grad_norm"] is not None), None)
    assert step is not None, f"every fp16 step overflowed: {fp16_records}"
    norms = {name: finished(runs, name)[step - 1]["grad_norm"] for name in ("ddp", "zero2_fp16")}
    if step == 1:  # later steps start from other weights (skipped updates): only step 1 compares
        assert abs(norms["zero2_fp16"] - norms["ddp"]) <= 0.05 * norms["ddp"], norms
    assert norms["zero2_fp16"] < 100 * norms["ddp"], norms  # not the scaled norm (x 65,536)
    ddp, fp16 = losses(finished(runs, "ddp")), losses(finished(runs, "zero2_fp16"))
    assert len(fp16) == STEPS and all(math.isfinite(x) for x in fp16), fp16
    assert abs(fp16[0] - ddp[0]) <= 0.02 * ddp[0], (fp16, ddp)  # same weights and batch, another precision
    config = json.loads((runs["zero2_fp16"]["save_dir"] / "train_config.json").read_text())
    assert config["mixed_precision"] == "fp16"


def test_auto_attention_is_flex_without_flash_attn_and_matches_sdpa(runs):
    from colossal_llama.training.attention import FLASH, FLEX, flash_attn_installed

    chosen = plan(runs, "ddp")["attn_implementation"]
    assert chosen == (FLASH if flash_attn_installed() else FLEX)
    assert plan(runs, "ddp_sdpa")["attn_implementation"] == "sdpa"
    fast, dense = losses(finished(runs, "ddp")), losses(finished(runs, "ddp_sdpa"))
    assert len(fast) == len(dense) == STEPS, (fast, dense)
    for step, (a, b) in enumerate(zip(fast, dense), start=1):
        assert abs(a - b) <= 1e-2, f"step {step}: {chosen} {a:.5f} vs sdpa {b:.5f}"


def test_liger_on_and_off_give_the_same_losses(runs):
    assert plan(runs, "ddp")["liger"] is True, "liger_kernel is not installed: the kit is incomplete"
    assert plan(runs, "ddp_no_liger")["liger"] is False
    # without Liger the loss runs on scored positions in chunks (its CUDA path), with it Liger's fused loss
    assert (plan(runs, "ddp")["loss"], plan(runs, "ddp_no_liger")["loss"]) == ("liger", "scored_chunks")
    on, off = losses(finished(runs, "ddp")), losses(finished(runs, "ddp_no_liger"))
    assert len(on) == len(off) == STEPS, (on, off)
    for step, (a, b) in enumerate(zip(on, off), start=1):
        assert abs(a - b) <= 1e-2, f"step {step}: Liger {a:.5f} vs plain {b:.5f}"


@pytest.mark.parametrize("plugin", RESUMED)
def test_load_checkpoint_resumes_zero2_and_gemini(runs, plugin):
    whole = finished(runs, plugin)
    resumed = finished(runs, f"{plugin}_resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    if plugin == "zero2_fp16":
        saved = json.loads((runs[plugin]["save_dir"] / "epoch-0_step-2" / "optimizer" / "loss-scale.json")
                           .read_text())
        assert f"fp16 loss scale {saved['scale']:g} restored" in runs[f"{plugin}_resumed"]["log"].read_text()
        overflowed = [[r["grad_norm"] is None for r in records] for records in (whole[2:], resumed)]
        assert overflowed[0] == overflowed[1], (whole, resumed)
    for ref, got in zip(whole[2:], resumed):
        assert (got["tokens"], got["lr"]) == (ref["tokens"], ref["lr"]), (ref, got)
    step3, step4 = (abs(g["loss"] - r["loss"]) / r["loss"] for r, g in zip(whole[2:], resumed))
    assert step3 <= 1e-4, f"step 3 (same weights, same batch) differs by {step3:.2e}"
    assert step4 <= 2e-3, f"step 4 differs by {step4:.2e}"
    # The bounds can fail: a resume that lost the weights would score step 3 with untrained ones, and training had
    # moved the loss by more than 5x the step-4 bound by then.
    assert whole[0]["loss"] - whole[2]["loss"] > 5 * 2e-3 * whole[2]["loss"], losses(whole)
