"""Training building blocks, in one process: flags, manifest checks, sampler, collation/masking, schedule, NEFTune."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from colossal_llama.training.checkpoint import latest_checkpoint, resolve_load_target
from colossal_llama.training.collate import PackedCollator, block_causal_mask
from colossal_llama.utils.labels import IGNORE_INDEX
from colossal_llama.training.config import parse_config, resolve_warmup
from colossal_llama.dataset.prepared import read_manifest
from colossal_llama.training.data import (StepBatchSampler, check_manifest_against_model, collect_parts,
                                          epoch_order, expand_dataset_args, load_prepared)
from colossal_llama.training.model import NEFTune, freeze_non_embeddings
from colossal_llama.training.optim import WarmupCosineLR, warmup_cosine_factor
from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.fingerprint import tokenizer_fingerprint
from tests.support.launch import REPO


# ------------------------------------------------------------------------------------------------ flags
def test_readme_aliases_and_boolean_flags(tiny_llama):
    cfg = parse_config(["--pretrained", str(tiny_llama), "--dataset", "a", "b", "--micro_batch_size", "3",
                        "--gradient_clipping", "0.5", "-w", "0.01", "-s", "7", "--zero", "2", "--use_neft",
                        "--use_grad_checkpoint", "False", "--plugin", "zero2"])
    assert (cfg.batch_size, cfg.grad_clip, cfg.weight_decay, cfg.warmup_steps, cfg.zero_stage) == (3, 0.5, 0.01, 7, 2)
    assert cfg.dataset == ["a", "b"] and cfg.use_neft is True and cfg.use_grad_checkpoint is False
    assert cfg.neft_alpha == 0.1  # the original's activate_neftune(model) default: --use_neft alone, the same noise


def test_max_steps_beyond_the_epochs_is_said(tiny_llama, caplog):
    """--num_epochs caps the run: --max_steps 5 over data of 2 steps an epoch trained 2 and exited 0 without a
    word about the 3 asked for. The plan says it (and --max_steps within the epochs says nothing)."""
    from types import SimpleNamespace

    from colossal_llama.training.loop import _plan_steps

    data = SimpleNamespace(bucket_sizes=[9])  # 2 global batches of 4 (1 sequence dropped)
    parallel = SimpleNamespace(layout=SimpleNamespace(dp_rank=0, dp_size=1))
    for max_steps, said in (("5", True), ("2", False)):
        cfg = parse_config(["--pretrained", str(tiny_llama), "--dataset", "d", "--batch_size", "4",
                            "--max_steps", max_steps])
        caplog.clear()
        with caplog.at_level("WARNING"):
            _, plan = _plan_steps(cfg, data, parallel, None)
        assert plan["total_steps"] == 2
        assert (caplog.messages == ["--max_steps 5: --num_epochs 1 of this data holds 2 steps (2 an epoch): the run "
                                    "ends there; raise --num_epochs to train longer"]) == said, caplog.messages


def test_the_parser_is_the_config_dataclass(tiny_llama):
    """Every TrainConfig field is a flag whose default is the field's own (no second list of defaults)."""
    import dataclasses

    from colossal_llama.training.config import TrainConfig, build_parser

    parsed = vars(build_parser().parse_args(["--pretrained", "p", "--dataset", "d"]))
    fields = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
              for f in dataclasses.fields(TrainConfig)}
    assert set(parsed) == set(fields)
    assert {k: v for k, v in parsed.items() if k not in ("pretrained", "dataset")} == \
        {k: v for k, v in fields.items() if k not in ("pretrained", "dataset")}


def test_warmup_defaults_to_2_5_percent_of_steps(tiny_llama):
    cfg = parse_config(["--pretrained", str(tiny_llama), "--dataset", "d"])
    assert resolve_warmup(cfg, total_steps=400).warmup_steps == 10


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size 0: must be >= 1"),
    (["--tp", "2"], "needs --plugin 3d"),
    (["--dist_timeout_minutes", "0"], r"^--dist_timeout_minutes 0.0: must be > 0$"),
    (["--plugin", "zero3"], r"^train.py: argument --plugin: invalid choice: 'zero3'"),
    (["--use_neft", "maybe"], r"argument --use_neft/--use_neftune: expected a boolean .*, got 'maybe' \(see --help\)$"),
    (["--stop_signals", "SIGTERM,SIGKILL"], r"^--stop_signals SIGTERM,SIGKILL: SIGKILL is not a signal to stop on"),
    (["--stop_signals", "int"], r"^--stop_signals int: INT is not a signal to stop on"),
])
def test_bad_flags_are_one_line_errors(tiny_llama, flags, message):
    with pytest.raises(UserInputError, match=message):
        parse_config(["--pretrained", str(tiny_llama), "--dataset", "d", *flags])


def test_stop_signals_default_to_term_and_usr1_and_take_short_names_or_none(tiny_llama):
    def signals(*flags):
        return parse_config(["--pretrained", str(tiny_llama), "--dataset", "d", *flags]).stop_signals

    assert signals() == ["SIGTERM", "SIGUSR1", "SIGHUP"]
    assert signals("--stop_signals", "term, usr2,SIGTERM") == ["SIGTERM", "SIGUSR2"]
    assert signals("--stop_signals", "none") == []


def test_a_stop_signal_is_recorded_once_and_the_handlers_are_put_back():
    import os
    import signal

    from colossal_llama.training.stop_signals import StoppedBySignal, StopRequest

    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest(["SIGUSR1", "SIGUSR2"])
    stop.install()
    try:
        assert stop.vote == 0.0
        os.kill(os.getpid(), signal.SIGUSR2)  # the handler runs before the next bytecode: the process lives on
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal is ignored
        assert (stop.received, stop.vote) == (signal.SIGUSR2, 1.0)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before
    stopped = StoppedBySignal(signal.SIGTERM, 5)
    assert (stopped.exit_code, stopped.signal_name) == (143, "SIGTERM")


def _stop_agreement(ranks) -> tuple:
    """Rank 1 receives SIGTERM, rank 0 SIGUSR1 half a second later: what agreed() and stopped() tell each rank."""
    import os
    import signal
    import time

    from colossal_llama.training.stop_signals import StopRequest

    stop, cpu = StopRequest(["SIGTERM", "SIGUSR1"]), torch.device("cpu")
    stop.install()
    try:
        before = stop.agreed(cpu)
        if ranks.rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        after = stop.agreed(cpu)
        time.sleep(0.5)
        if ranks.rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        stopped, seconds = stop.stopped(7, cpu)
    finally:
        stop.uninstall()
    return before, after, stopped.exit_code, stopped.step, seconds


def test_every_rank_stops_once_any_one_received_a_signal_and_all_leave_with_the_same_code():
    """No signal anywhere: training goes on. A signal on one rank alone (one node of many preempted) stops every
    rank; they all exit with the code of the largest signal number any rank received (SIGTERM's 143 over SIGUSR1's
    138, not a sum of them) and report the seconds since the first rank received one."""
    from tests.support.gloo_world import run_in_gloo_world

    for before, after, code, step, seconds in run_in_gloo_world(_stop_agreement, 2):
        assert (before, after, code, step) == (False, True, 143, 7)
        assert 0.5 <= seconds < 60


@pytest.mark.parametrize("signum, silent, code, line", [
    (15, 2, 143, "error: stopped by SIGTERM: rank 2 gave no sign of life for 30 s (dead, or its machine hangs), so "
                 "the step in flight can never finish: leaving without a checkpoint of it, exit code 143"),
    (0, None, 75, "error: the launcher's store has not answered for 30 s (the launcher that holds it died, or its "
                  "machine is lost), so the next collective can never finish: every rank leaves now"),
])
def test_a_rank_that_finds_a_peer_silent_says_why_once_and_leaves_at_once(monkeypatch, capfd, signum, silent, code,
                                                                           line):
    """With the stop signal's code when one came (the job was being stopped anyway), else 75 (EX_TEMPFAIL: a failure
    torchrun --max_restarts restarts). The rank that found the silence says so; one that read its verdict is quiet."""
    from types import SimpleNamespace

    from colossal_llama.training import stop_signals
    from colossal_llama.training.peer_watch import Silence

    class Left(BaseException):
        pass

    def leave(status):
        raise Left(status)

    monkeypatch.setattr(stop_signals.os, "_exit", leave)
    peers = SimpleNamespace(rank=1, silence_s=30.0)
    for seen_here in (True, False):
        with pytest.raises(Left) as left:
            stop_signals.leave_on_silence(peers, Silence(signum, silent, seen_here))
        assert left.value.args == (code,)
        said = capfd.readouterr().err
        assert said.startswith(f"\n[rank 1] {line}") if seen_here else said == ""


def _watches(port: int, world: int, silence_s: float):
    """A store like torchrun's (a server) and each rank's watch with its own client connection."""
    from datetime import timedelta

    import torch.distributed as dist

    from colossal_llama.training.peer_watch import PeerWatch

    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)

    def connect():
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=2))
        return dist.PrefixStore("alive", client)

    watches = [PeerWatch(connect, rank, world, silence_s) for rank in range(world)]
    for watch in watches:
        watch.begin()
    return server, watches


def _wait_for(condition, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_peer_watch_finds_a_silent_rank_and_tells_every_other_rank():
    """Rank 1 watches rank 2 (a ring): it finds rank 2 silent and says so in the store; rank 0 reads it there. A
    stop signal reaches the watch as Python's C-level handler writes it (signal.set_wakeup_fd), written by hand
    here; SIGINT is not a stop signal and arms nothing."""
    import os
    import signal
    import time

    from colossal_llama.training.peer_watch import Silence
    from tests.support.launch import free_port

    server, watches = _watches(free_port(), 3, silence_s=1.5)
    calls = {}
    try:
        for rank, watch in enumerate(watches[:2]):
            watch.listen([signal.SIGTERM, signal.SIGUSR1], lambda silence, rank=rank: calls.setdefault(rank, silence))
        os.write(watches[0].signal_fd, bytes([signal.SIGINT]))
        os.write(watches[0].signal_fd, bytes([signal.SIGTERM]))
        time.sleep(2.0)
        assert calls == {}  # every rank beats: waited for however long it takes
        watches[2].close()  # rank 2 dies
        time.sleep(1.0)
        assert calls == {}  # silent for 1 s of 1.5
        _wait_for(lambda: len(calls) == 2)
        assert calls == {1: Silence(0, 2, seen_here=True), 0: Silence(signal.SIGTERM, 2, seen_here=False)}
    finally:
        for watch in watches[:2]:
            watch.close()
    del server


def test_peer_watch_judges_nobody_once_the_run_stopped_listening():
    """The run ended (its ranks leave one by one): a rank that stops beating then is no fault."""
    import time

    from tests.support.launch import free_port

    server, watches = _watches(free_port(), 2, silence_s=0.6)
    calls = []
    try:
        watches[0].listen([], calls.append)
        time.sleep(0.3)  # the watch's thread takes a few readings while listening
        watches[0].stop_listening()
        watches[1].close()
        time.sleep(1.5)
        assert calls == []
    finally:
        watches[0].close()
    del server


def test_a_rank_is_silent_while_its_counter_stands_still_by_this_threads_own_readings():
    from colossal_llama.training.peer_watch import Sighting

    sighting = Sighting()
    assert sighting.silent_for(b"1", 100.0, max_gap=5) == 0
    assert sighting.silent_for(b"1", 104.0, max_gap=5) == 4
    assert sighting.silent_for(b"2", 108.0, max_gap=5) == 0  # it moved
    assert sighting.silent_for(b"2", 112.0, max_gap=5) == 4
    # 18 s without a reading: this thread could not run (the whole job suspended): no verdict, a fresh look
    assert sighting.silent_for(b"2", 130.0, max_gap=5) == 0
    assert sighting.silent_for(b"2", 134.0, max_gap=5) == 4


def _keep_training(watch, until):
    """The main thread of a rank whose steps go on: marks progress every 0.1 s until ``until`` is set."""
    import threading

    def steps():
        while not until.wait(0.1):
            watch.progressed()

    thread = threading.Thread(target=steps, daemon=True)
    thread.start()
    return thread


def test_a_rank_whose_own_training_goes_on_judges_no_silent_peer():
    """A heartbeat that cannot reach the store (a flapping management network) while the collectives work: the
    watcher trains on, so the peer is not dead. Once its own training stands still for the silence too (a dead
    peer holds it in the step's all-reduce), it judges."""
    import threading
    import time

    from colossal_llama.training.peer_watch import Silence
    from tests.support.launch import free_port

    server, watches = _watches(free_port(), 2, silence_s=1.0)
    calls, training_stops = [], threading.Event()
    try:
        stepping = _keep_training(watches[0], training_stops)
        watches[0].listen([], calls.append)
        watches[1].close()  # rank 1's heartbeat falls silent
        time.sleep(2.5)
        assert calls == []  # silent for 2.5 s, but rank 0's steps go on
        training_stops.set()
        stepping.join()
        _wait_for(lambda: calls)
        assert calls == [Silence(0, 1, seen_here=True)]
    finally:
        training_stops.set()
        watches[0].close()
    del server


def test_peer_watch_leaves_when_the_launchers_store_is_gone_and_training_stands_still():
    """The launcher that holds the store died (or its machine was lost) and the ranks' training stands still: no
    rank can learn anything more. A rank that trains on (its collectives do not need the store) waits for it."""
    import gc
    import os
    import signal
    import threading

    from colossal_llama.training.peer_watch import Silence
    from tests.support.launch import free_port

    server, watches = _watches(free_port(), 3, silence_s=0.6)
    calls, training_stops = [], threading.Event()
    try:
        _keep_training(watches[2], training_stops)
        for rank, watch in enumerate(watches):
            watch.listen([signal.SIGTERM], lambda silence, rank=rank: calls.append((rank, silence)))
        os.write(watches[0].signal_fd, bytes([signal.SIGTERM]))
        _wait_for(lambda: False, timeout=0.3)
        assert calls == []  # every rank beats
        del server
        gc.collect()  # the store's server is gone (torchrun's agent died with it)
        _wait_for(lambda: len(calls) == 2, timeout=30)
        _wait_for(lambda: len(calls) > 2, timeout=1.5)
        assert sorted(calls) == [(0, Silence(signal.SIGTERM, None, seen_here=True)),
                                 (1, Silence(0, None, seen_here=True))]
    finally:
        training_stops.set()
        for watch in watches:
            watch.close()


class _FlakyStore:
    """A c10d store stand-in shared by several watches, which stops answering while ``down``."""

    def __init__(self):
        self.values, self.down, self.calls = {}, False, 0

    def _answer(self) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("Failed to recv, got 0 bytes")

    def add(self, key, amount):
        self._answer()
        self.values[key] = self.values.get(key, 0) + amount
        return self.values[key]

    def check(self, keys):
        self._answer()
        return all(k in self.values for k in keys)

    def get(self, key):
        self._answer()
        return str(self.values[key]).encode()

    def set(self, key, value):
        self._answer()
        self.values[key] = value

    def connect(self):
        self._answer()
        return self


def test_a_store_that_stopped_answering_is_asked_again_after_a_back_off():
    """Each failed call makes torch print a C++ stack trace: while the store is gone and training goes on, the
    watch asks again after 2 beats, then 3 (a quarter of the silence), not at every beat; the rank whose training
    then stands still asks at once and leaves; the store back, the other beats again."""
    import threading
    import time

    from colossal_llama.training.peer_watch import PeerWatch, Silence

    store = _FlakyStore()
    watches = [PeerWatch(store.connect, rank, 2, silence_s=1.2) for rank in range(2)]  # a beat every 0.1 s
    calls, stops = [], [threading.Event(), threading.Event()]
    try:
        for rank, watch in enumerate(watches):
            _keep_training(watch, stops[rank])
            watch.begin()
            watch.listen([], lambda silence, rank=rank: calls.append((rank, silence)))
        time.sleep(0.5)
        store.down, before = True, store.calls
        time.sleep(3.0)
        asked = store.calls - before
        assert calls == [] and 2 <= asked <= 60, asked  # at every beat: about 120 (a call and a reconnect each)
        stops[0].set()  # rank 0's training stands still
        _wait_for(lambda: calls, timeout=5)
        assert calls == [(0, Silence(0, None, seen_here=True))]
        store.down, before = False, store.calls
        _wait_for(lambda: store.calls - before > 10, timeout=5)
        assert store.calls - before > 10 and calls == [(0, Silence(0, None, seen_here=True))]  # rank 1 beats again
    finally:
        for stop in stops:
            stop.set()
        for watch in watches:
            watch.close()


def test_checkpoints_at_intervals_at_the_end_and_after_every_epoch():
    from colossal_llama.training.loop import checkpoint_due

    due = [s for s in range(1, 11) if checkpoint_due(s, 10, save_interval=4, epoch_done=s in (3, 6, 9),
                                                     skip_save_each_epoch=False)]
    assert due == [3, 4, 6, 8, 9, 10]
    skipped = [s for s in range(1, 11) if checkpoint_due(s, 10, 4, s in (3, 6, 9), skip_save_each_epoch=True)]
    assert skipped == [4, 8, 10]


@pytest.mark.parametrize("flag, name", [("eos", "eos_token"), ("unk", "unk_token")])
def test_pad_token_flag_picks_the_padding_id(mistral_dir, flag, name):
    from colossal_llama.tokenizer.loading import load_tokenizer
    from colossal_llama.training.loop import pad_token_id

    tokenizer = load_tokenizer(mistral_dir)
    assert tokenizer.pad_token is None
    before = tokenizer_fingerprint(tokenizer)
    pad = pad_token_id(tokenizer, flag)
    assert pad == tokenizer.convert_tokens_to_ids(getattr(tokenizer, name))
    assert tokenizer_fingerprint(tokenizer) == before  # data prepared for this tokenizer still matches it


@pytest.mark.parametrize("flags, message", [
    (["--plugin", "3d", "--pp", "2", "--accumulation_steps", "2"], "the pipeline accumulates over its micro-batches"),
    (["--plugin", "3d", "--pp", "2", "--batch_size", "3", "--microbatch_size", "2"], "not a multiple of"),
    (["--plugin", "3d", "--enable_sequence_parallelism"], "--sp_mode split_gather splits sequences over the tensor"),
    (["--plugin", "ddp", "--sp", "2"], "--sp 2: tensor/pipeline/sequence parallelism needs --plugin 3d"),
    (["--plugin", "3d", "--lora_rank", "8"], "--lora_rank with --plugin 3d: LoRA runs with ddp, zero2, zero2_cpu"),
    (["--plugin", "ddp", "--lora_rank", "8", "--freeze_non_embeds_params"], "both choose what trains"),
    (["--plugin", "3d", "--zero_cpu_offload", "--zero_stage", "0"], "--zero_cpu_offload needs --zero_stage 1 or 2"),
])
def test_parallelism_and_lora_combinations_are_checked_up_front(tiny_llama, flags, message):
    with pytest.raises(UserInputError, match=message):
        parse_config(["--pretrained", str(tiny_llama), "--dataset", "d", *flags])


def test_async_save_needs_cuda(tiny_llama):
    from colossal_llama.training.config import resolve_for_device

    cfg = parse_config(["--pretrained", str(tiny_llama), "--dataset", "d", "--async_save"])
    with pytest.raises(UserInputError, match="--async_save needs CUDA"):
        resolve_for_device(cfg, cuda=False)


def test_save_dir_that_is_a_file_is_a_one_line_error(tiny_llama, tmp_path):
    regular = tmp_path / "ckpt"
    regular.write_text("not a directory")
    with pytest.raises(UserInputError, match=f"--save_dir {regular}: exists and is not a directory"):
        parse_config(["--pretrained", str(tiny_llama), "--dataset", "d", "--save_dir", str(regular)])


# The CPU of a CI machine with AVX512-BF16 and no `kernels` package: bitsandbytes (imported by colossalai) logs this
# at import, which came before train.py's one-line error. Forced here by reloading its CPU backend with the check true.
# The reload registers no kernels: PyTorch 2.11 (the GPU image's) refuses a second registration of a CPU kernel.
_BNB_ON_AVX512BF16 = """
import importlib, sys
if sys.argv[1] == "quiet":
    from colossal_llama.training.cli import quiet_library_warnings
    quiet_library_warnings()
import colossalai.booster
import bitsandbytes._ops
import bitsandbytes.backends.cpu.ops as ops
import bitsandbytes.functional
bitsandbytes.functional.has_avx512bf16 = lambda: True
bitsandbytes._ops.register_kernel = lambda *args, **kwargs: (lambda kernel: kernel)
importlib.reload(ops)
print("imported")
"""


@pytest.mark.parametrize("mode", ["loud", "quiet"])
def test_bitsandbytes_import_warning_stays_out_of_the_training_output(mode):
    proc = subprocess.run([sys.executable, "-c", _BNB_ON_AVX512BF16, mode], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "imported", proc.stderr[-2000:]
    logged = "Failed to load CPU gemm_4bit_forward" in proc.stderr
    assert logged == (mode == "loud"), proc.stderr[-2000:]  # loud: the warning really is produced by this check


# ------------------------------------------------------------------------------------------------ manifest
def test_manifest_is_checked_against_the_model(prepared_pretrain, tiny_llama):
    from transformers import AutoTokenizer

    manifest_path = prepared_pretrain / "manifest.json"
    manifest = read_manifest(manifest_path)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    check_manifest_against_model(manifest, manifest_path, tok, len(tok), 128, str(tiny_llama))  # matches
    with pytest.raises(UserInputError, match=r"manifest.json: vocab_size: 49152 exceeds the model's 49000"):
        check_manifest_against_model(manifest, manifest_path, tok, 49000, 128, str(tiny_llama))
    with pytest.raises(UserInputError, match=r"max_length: data sequences go up to 128 tokens but --max_length is 64"):
        check_manifest_against_model(manifest, manifest_path, tok, len(tok), 64, str(tiny_llama))


def test_data_from_another_tokenizer_is_refused_before_training(tmp_path, prepared_pretrain, tiny_llama,
                                                                 mistral_sp_model):
    """CLI, single process: data prepared with SmolLM2's tokenizer, model folder carrying Mistral's."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / f).unlink()
    shutil.copy(mistral_sp_model, model / "tokenizer.model")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--pretrained", str(model), "--dataset",
                           str(prepared_pretrain / "arrow"), "--plugin", "ddp", "--save_dir", str(tmp_path / "ck")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {prepared_pretrain / 'manifest.json'}: tokenizer_fingerprint: "), last
    assert not (tmp_path / "ck" / "modeling").exists()


def test_missing_manifest_names_the_file(tmp_path, prepared_pretrain):
    copy = tmp_path / "out"
    shutil.copytree(prepared_pretrain / "arrow", copy / "arrow")
    with pytest.raises(UserInputError, match=f"{copy / 'manifest.json'}: manifest missing"):
        collect_parts(expand_dataset_args([str(copy / "arrow")]))


# ------------------------------------------------------------------------------------------------ buckets, sampler
def test_buckets_are_walked_in_order_and_reshuffled_each_epoch():
    sizes = [5, 7, 3]
    e0, e1 = epoch_order(sizes, seed=1, epoch=0, shuffle_buckets=False), epoch_order(sizes, 1, 1, False)
    for order in (e0, e1):
        assert sorted(order[:5]) == list(range(5)) and sorted(order[5:12]) == list(range(5, 12))
        assert sorted(order[12:]) == [12, 13, 14]
    assert not np.array_equal(e0, e1)
    assert np.array_equal(e0, epoch_order(sizes, 1, 0, False))  # a pure function of (seed, epoch)
    mixed = epoch_order(sizes, 1, 0, shuffle_buckets=True)
    assert sorted(mixed) == list(range(15)) and max(mixed[:5]) >= 5  # buckets no longer contiguous


def test_the_epoch_order_takes_4_bytes_a_sequence_and_is_the_order_checkpoints_were_made_with():
    """Checkpoints of earlier versions resume at the same sample: the order is still numpy's permutation per bucket
    (``start + permutation(size)``), now shuffled in place in 4-byte indices."""
    sizes = [1000, 1, 0, 2345]
    for shuffle in (False, True):
        rng = np.random.default_rng([7, 2])
        if shuffle:
            previous = rng.permutation(sum(sizes))
        else:
            starts = np.cumsum([0, *sizes[:-1]])
            previous = np.concatenate([start + rng.permutation(size) for start, size in zip(starts, sizes)])
        order = epoch_order(sizes, seed=7, epoch=2, shuffle_buckets=shuffle)
        assert order.itemsize == 4 and np.array_equal(order, previous), shuffle


def test_sampler_splits_each_global_batch_across_ranks_and_resumes_exactly():
    sizes = [11, 10]
    common = dict(bucket_sizes=sizes, micro_batch=2, accumulation_steps=2, dp_size=2, seed=3, shuffle_buckets=False)
    ranks = [list(StepBatchSampler(dp_rank=r, **common)) for r in range(2)]
    sampler = StepBatchSampler(dp_rank=0, **common)
    assert (sampler.global_batch, sampler.steps_per_epoch, sampler.dropped_per_epoch) == (8, 2, 5)
    order = epoch_order(sizes, 3, 0, False)
    for step in range(2):
        seen = sorted(i for r in range(2) for mb in ranks[r][2 * step:2 * step + 2] for i in mb)
        assert seen == sorted(order[8 * step:8 * step + 8])
    resumed = list(StepBatchSampler(dp_rank=1, start_offset=8, **common))
    assert resumed == ranks[1][2:] and len(StepBatchSampler(dp_rank=1, start_offset=8, **common)) == 2


def test_a_resume_with_another_global_batch_walks_full_batches_to_the_epochs_end():
    """Saved after 40 samples with a global batch of 8, resumed with 12 (more machines): full batches from sample
    40 on, the last one ending at 88 (100 > 96), where the epoch ends. The last step's ranks got short or empty
    micro-batches (the collator fails on an empty one, on those ranks only)."""
    from colossal_llama.training.data import ends_epoch

    common = dict(bucket_sizes=[50, 46], micro_batch=2, accumulation_steps=3, dp_size=2, seed=5, shuffle_buckets=True,
                  start_offset=40)
    ranks = [list(StepBatchSampler(dp_rank=r, **common)) for r in range(2)]
    assert all(len(micro) == 2 for rank in ranks for micro in rank)
    assert [len(rank) for rank in ranks] == [len(StepBatchSampler(dp_rank=0, **common))] * 2 == [4 * 3] * 2
    order = epoch_order([50, 46], 5, 0, True)
    assert sorted(i for rank in ranks for micro in rank for i in micro) == sorted(order[40:88])
    assert not ends_epoch(76, 12, 96) and ends_epoch(88, 12, 96) and ends_epoch(96, 8, 96)
    assert not ends_epoch(88, 8, 96)


# ------------------------------------------------------------------------------------------------ collation, masks
def test_attention_comes_from_lengths_so_real_eos_stays_visible():
    eos = 2  # pad == eos, as in many tokenizers
    rows = [{"input_ids": np.array([5, 6, eos, 7]), "labels": np.array([-100, 6, eos, 7]),
             "position_ids": np.array([0, 1, 2, 0])},
            {"input_ids": np.array([9, eos]), "labels": np.array([9, eos]), "position_ids": np.array([0, 1])}]
    batch = PackedCollator(pad_token_id=eos, max_length=8)(rows)
    mask = batch["attention_mask"][:, 0]
    assert batch["input_ids"].shape == (2, 4) and batch["lengths"].tolist() == [4, 2]
    assert mask[0, 2, 2] and mask[0, 2, :3].all()  # the EOS at position 2 is seen and sees its document
    assert not mask[0, 3, :3].any() and mask[0, 3, 3]  # a new document (position 0) does not see the previous one
    assert mask[1, 1, :2].all() and not mask[1, 2, :2].any()  # real eos visible; padding never attended by real
    assert not mask[1, :2, 2:].any()
    assert batch["labels"][1, 2:].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert mask.diagonal(dim1=-2, dim2=-1).all()  # no empty query rows (sdpa would give NaN)


def test_block_mask_is_causal_and_block_diagonal():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m = block_causal_mask(pos)[0, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for a, b in ((0, 3), (3, 5), (5, 6)):
        expected[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    assert torch.equal(m, expected)



def test_padding_mode_and_sequence_multiple_set_the_width_and_rows_keep_their_figures():
    """``--padding_mode max_length`` pads every batch to max_length; sequence parallelism rounds the width up to a
    multiple of its size (never cutting a row). The additive mask (colossalai's sequence-parallel attention adds it to
    the scores) is 0 exactly where the bool mask allows and the dtype's minimum elsewhere. Each row keeps its own
    length and category code, in row order (the per-category token counts add them up)."""
    rows = [{"input_ids": np.arange(1, n + 1), "labels": np.arange(1, n + 1), "position_ids": np.arange(n),
             "category_code": c} for n, c in ((5, 2), (3, 0), (7, 1))]
    longest = PackedCollator(pad_token_id=0, max_length=16)(rows)
    assert longest["input_ids"].shape == (3, 7)
    assert longest["lengths"].tolist() == [5, 3, 7] and longest["category_codes"].tolist() == [2, 0, 1]
    assert PackedCollator(0, 16, "max_length")(rows)["input_ids"].shape == (3, 16)
    for multiple, width in ((2, 8), (4, 8), (7, 7), (3, 9)):
        batch = PackedCollator(0, 16, pad_multiple=multiple)(rows)
        assert batch["input_ids"].shape == (3, width), multiple
        assert batch["input_ids"][2].tolist() == list(range(1, 8)) + [0] * (width - 7)
    allowed = PackedCollator(0, 16, pad_multiple=4)(rows)["attention_mask"]
    additive = PackedCollator(0, 16, pad_multiple=4, additive_mask_dtype=torch.bfloat16)(rows)["attention_mask"]
    assert additive.dtype == torch.bfloat16 and additive.shape == allowed.shape == (3, 1, 8, 8)
    assert torch.equal(additive == 0, allowed) and (additive[~allowed] == torch.finfo(torch.bfloat16).min).all()

def test_packed_row_logits_equal_its_documents_run_separately(prepared_pretrain, tiny_llama):
    """A real packed row (several real documents) through the tiny LLaMA with sdpa."""
    from transformers import AutoModelForCausalLM

    parts, manifests = collect_parts(expand_dataset_args([str(prepared_pretrain / "arrow")]))
    data = load_prepared(parts, manifests)
    row = next(data.dataset[i] for i in range(len(data.dataset)) if (data.dataset[i]["position_ids"] == 0).sum() >= 2)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    batch = PackedCollator(pad_token_id=0, max_length=128)([row])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[0]
        starts = np.flatnonzero(row["position_ids"] == 0).tolist() + [len(row["input_ids"])]
        for a, b in zip(starts[:-1], starts[1:]):
            alone = model(input_ids=torch.as_tensor(row["input_ids"][a:b], dtype=torch.long)[None]).logits[0]
            torch.testing.assert_close(packed[a:b], alone, rtol=1e-5, atol=1e-5)
        # Without the block mask the later documents would see the earlier ones: the test can fail.
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        assert (leaky[starts[1]:starts[2]] - packed[starts[1]:starts[2]]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ schedule, model
def test_warmup_then_cosine_to_a_tenth_and_exact_resume():
    assert warmup_cosine_factor(0, 4, 20) == 0.25 and warmup_cosine_factor(3, 4, 20) == 1.0
    assert warmup_cosine_factor(19, 4, 20) == pytest.approx(0.1) and warmup_cosine_factor(30, 4, 20) == 0.1
    factors = [warmup_cosine_factor(s, 4, 20) for s in range(4, 20)]
    assert all(a > b for a, b in zip(factors, factors[1:]))  # strictly decaying after warm-up

    def lrs(sched, opt, n):
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = WarmupCosineLR(opt, 4, 20)
    first = lrs(sched, opt, 7)
    state = sched.state_dict()
    rest = lrs(sched, opt, 13)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched2 = WarmupCosineLR(opt2, 4, 20)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    assert lrs(sched2, opt2, 13) == rest and first[0] == 1e-3 / 4


def test_a_resumed_schedule_takes_this_runs_lr_steps_and_weight_decay_and_names_the_changes():
    from colossal_llama.training.optim import follow_settings, param_groups, settings_of

    model = torch.nn.Linear(4, 4)  # a weight (decayed) and a bias (not)

    def schedule(lr: float, weight_decay: float, total: int) -> WarmupCosineLR:
        return WarmupCosineLR(torch.optim.AdamW(param_groups(model, weight_decay), lr=lr), 2, total)

    def walked(sched: WarmupCosineLR, steps: int) -> WarmupCosineLR:
        for _ in range(steps):
            sched.optimizer.step()
            sched.step()
        return sched

    old = walked(schedule(1e-3, 0.1, 8), 5)
    resumed = schedule(2e-3, 0.01, 16)
    wanted = settings_of(resumed)
    resumed.optimizer.load_state_dict(old.optimizer.state_dict())
    resumed.load_state_dict(old.state_dict())
    assert settings_of(resumed) == settings_of(old)  # what loading a checkpoint does by itself
    changes, saved_lr, next_lr = follow_settings(resumed, wanted)
    assert changes == ["total steps 8 -> 16", "lr 0.001 -> 0.002", "weight decay 0.1 -> 0.01"]
    fresh = walked(schedule(2e-3, 0.01, 16), 5)
    assert (saved_lr, next_lr) == (old.get_last_lr()[0], fresh.get_last_lr()[0])
    assert [(g["lr"], g["weight_decay"]) for g in resumed.optimizer.param_groups] == \
        [(g["lr"], g["weight_decay"]) for g in fresh.optimizer.param_groups]
    assert walked(resumed, 3).get_last_lr() == walked(fresh, 3).get_last_lr()

    same = schedule(1e-3, 0.1, 8)
    unchanged = settings_of(same)
    same.load_state_dict(old.state_dict())
    assert follow_settings(same, unchanged) == ([], old.get_last_lr()[0], old.get_last_lr()[0])


def test_neftune_adds_bounded_noise_only_in_training(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.tensor([[1, 2, 3, 4]])
    clean = model.get_input_embeddings()(ids)
    NEFTune(alpha=5.0, seed=1, dp_rank=0).attach(model)
    model.train()
    noisy = model.get_input_embeddings()(ids)
    bound = 5.0 / (4 * 64) ** 0.5
    assert 0 < (noisy - clean).abs().max() <= bound
    # and uniform over the whole of (-bound, bound): of 256 draws none above 0.9 bound has chance 0.9^256 < 1e-11;
    # a magnitude of alpha / (L d), say (the sqrt forgotten), is 16 times smaller
    noise = (noisy - clean).detach()
    assert noise.numel() == 256 and (noise.abs().max() >= 0.9 * bound)
    assert noise.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1)
    model.eval()
    assert torch.equal(model.get_input_embeddings()(ids), clean)


def test_neftune_noise_is_a_function_of_seed_rank_step_and_micro_batch(tiny_llama):
    """What makes resume exact: the noise ignores torch's global RNG and depends only on its key."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).train()
    embed, ids = model.get_input_embeddings(), torch.tensor([[1, 2, 3, 4]])
    clean = embed(ids).detach()
    neft = NEFTune(alpha=5.0, seed=1, dp_rank=0)
    neft.attach(model)

    def noise(step):  # the noise of micro-batches 0 and 1 of a step
        neft.start_step(step)
        return [(embed(ids) - clean).detach() for _ in range(2)]

    first = noise(3)
    torch.manual_seed(1234)  # the global stream moves: the noise must not
    torch.rand(100)
    again = noise(3)
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert not torch.equal(first[0], first[1]) and not torch.equal(noise(4)[0], first[0])
    other_rank = NEFTune(alpha=5.0, seed=1, dp_rank=1)
    other_rank.start_step(3)
    assert not torch.equal(other_rank(embed, (ids,), clean) - clean, first[0])


def test_freeze_non_embeds_keeps_only_embeddings_trainable(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    trainable = freeze_non_embeddings(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"model.embed_tokens.weight"}  # lm_head is tied to it
    assert trainable == model.model.embed_tokens.weight.numel()


# ------------------------------------------------------------------------------------------------ checkpoints
def test_latest_ignores_half_written_checkpoints(tmp_path):
    for name, complete in (("epoch-0_step-9", True), ("epoch-0_step-10", True), ("epoch-0_step-20", True),
                           (".tmp-epoch-0_step-30", True), ("epoch-1_step-40", False)):
        (tmp_path / name / "modeling").mkdir(parents=True)
        if complete:
            (tmp_path / name / "running_states.json").write_text(json.dumps({}))
    assert latest_checkpoint(tmp_path).name == "epoch-0_step-20"
    assert resolve_load_target("latest", tmp_path).path.name == "epoch-0_step-20"
    with pytest.raises(UserInputError, match="incomplete checkpoint"):
        resolve_load_target(str(tmp_path / "epoch-1_step-40"), tmp_path)
    assert resolve_load_target("latest", tmp_path / "nothing") is None


def test_weight_names_must_be_the_models_apart_from_a_tied_head_and_old_rotary_tables():
    from colossal_llama.training.checkpoint import check_weight_names

    model = {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"}
    stored = model - {"lm_head.weight"}
    assert check_weight_names(model, stored, True, "X") == {"lm_head.weight"}  # HF writes a tied head once
    assert check_weight_names(model, model, False, "X") == set()
    # older transformers saved LLaMA's rotary tables (many hub folders have them); they are recomputed
    assert check_weight_names(model, model | {"model.layers.0.self_attn.rotary_emb.inv_freq"}, False, "X") == set()
    with pytest.raises(UserInputError, match=r"^X: weights do not match .*missing \['lm_head.weight'\]"):
        check_weight_names(model, stored, False, "X")
    with pytest.raises(UserInputError, match=r"unexpected \['model.layers.1.mlp.up_proj.weight'\]"):
        check_weight_names(model, model | {"model.layers.1.mlp.up_proj.weight"}, False, "X")


@pytest.mark.parametrize("plugin, precision, dtype", [
    ("ddp", "bf16", torch.float32), ("ddp", "fp32", torch.float32), ("zero2", "bf16", torch.bfloat16),
    ("zero2_cpu", "fp16", torch.float16), ("3d", "bf16", torch.bfloat16), ("gemini", "bf16", torch.bfloat16),
    ("zero2", "fp32", torch.float32)])
def test_the_model_is_built_in_the_precision_the_plugin_casts_it_to(tiny_llama, plugin, precision, dtype):
    from colossal_llama.training.plugin import param_dtype

    cfg = parse_config(["--pretrained", str(tiny_llama), "--dataset", "d", "--plugin", plugin, "--mixed_precision",
                        precision])
    assert param_dtype(cfg) == dtype  # ddp autocasts over fp32 weights; the others cast the model at boost


def test_a_model_read_in_bf16_is_the_fp32_one_cast(tiny_llama):
    """What ZeRO/gemini/3d do at boost (``module.to(bf16)``, master weights copied from it) gives the same tensors
    whether the model was read in fp32 (4 bytes a parameter in host memory) or in bf16 (2)."""
    from colossal_llama.training.model import load_causal_lm

    fp32 = load_causal_lm(str(tiny_llama), "sdpa")
    bf16 = load_causal_lm(str(tiny_llama), "sdpa", torch.bfloat16)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}  # the tiny model is saved in fp32
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}  # read in bf16, not cast after
    cast, read = fp32.to(torch.bfloat16).state_dict(), bf16.state_dict()
    assert cast.keys() == read.keys()
    different = [name for name in cast
                 if cast[name].dtype != read[name].dtype or not torch.equal(cast[name], read[name])]
    assert not different, different
    assert bf16.lm_head.weight is bf16.model.embed_tokens.weight
    # read straight onto a device (ddp and ZeRO on CUDA: no whole copy in host memory); here the CPU stands in
    on_device = load_causal_lm(str(tiny_llama), "sdpa", torch.bfloat16, device=torch.device("cpu")).state_dict()
    assert all(torch.equal(on_device[name], read[name]) for name in read) and on_device.keys() == read.keys()


def test_the_trash_renames_aside_at_once_and_deletes_in_the_background(tmp_path, monkeypatch):
    import threading

    from colossal_llama.training import trash as trash_module

    release = threading.Event()
    remove_tree = trash_module._remove_tree
    monkeypatch.setattr(trash_module, "_remove_tree", lambda path: (release.wait(30), remove_tree(path)))
    old = tmp_path / "epoch-0_step-1"
    (old / "modeling").mkdir(parents=True)
    leftover = tmp_path / ".tmp-deleting-0123abcd-epoch-0_step-0"  # left aside by a crashed run
    leftover.mkdir()
    trash = trash_module.Trash(".tmp-")
    aside = trash.discard(old)
    assert not old.exists() and aside.is_dir() and aside.name.startswith(".tmp-deleting-")  # aside, not yet deleted
    assert trash.holds(aside) and trash.discard(aside) is None and trash.discard(tmp_path / "missing") is None
    assert trash.discard(leftover) == leftover  # not renamed again
    release.set()
    trash.wait()
    assert not aside.exists() and not leftover.exists() and trash.deleted == 2 and list(tmp_path.iterdir()) == []


def test_a_change_of_epoch_order_is_described_in_words():
    from colossal_llama.training.inputs import epoch_order_changes

    saved = {"seed": 42, "shuffle_buckets": False, "bucket_sizes": [600, 647], "mixture": None}
    assert epoch_order_changes(saved, dict(saved)) == []
    assert epoch_order_changes(saved, {**saved, "seed": 7, "shuffle_buckets": True}) == \
        ["seed 42 -> 7", "shuffle_buckets False -> True"]
    assert epoch_order_changes(saved, {**saved, "bucket_sizes": [600, 700, 10]}) == \
        ["data 1,247 sequences in 2 buckets -> 1,310 in 3"]
    assert epoch_order_changes(saved, {**saved, "bucket_sizes": [647, 600]}) == \
        ["data 1,247 sequences in 2 buckets -> 1,247 in 2 (other bucket sizes)"]
    assert epoch_order_changes(saved, {**saved, "mixture": [[[0, "news", 600, 1.0]]]}) == \
        ["mixture groups or shares (--category_weights, --dataset weights)"]


@pytest.mark.parametrize("numel", [1, 7, 12, 13])
def test_zero_master_slices_are_recut_for_another_rank_count(numel):
    """ZeRO pads a flat parameter to a multiple of its rank count and gives rank r the r-th equal piece. A job
    resumed on another count cuts each new slice out of the old ones: for every old and new count (1-4) the new
    slices are those ZeRO would cut from the whole parameter, their padding zeros; the old padding is never read
    (nan here), nor any old piece but those ``pieces_covered`` names (only they are given)."""
    from colossal_llama.training.master_weights import pieces_covered, recut

    whole = torch.randn(numel, dtype=torch.float32)

    def zero_cut(count, padding=0.0):
        padded = torch.cat([whole, torch.full((-numel % count,), padding)])
        return list(padded.split(padded.numel() // count))

    for old in range(1, 5):
        pieces = zero_cut(old, padding=float("nan"))
        for new in range(1, 5):
            covered = [pieces_covered(numel, index, new, old) for index in range(new)]
            got = [recut({i: pieces[i] for i in covered[index]}, numel, index, new, old) for index in range(new)]
            assert all(torch.equal(g, w) for g, w in zip(got, zero_cut(new))), (old, new)
            assert len(got) == new and torch.equal(torch.cat(got)[:numel], whole)
            # each new slice overlaps at most old/new + 1 old pieces, in order, and together they are all
            assert all(len(c) <= -(-old // new) + 1 for c in covered), (old, new, covered)
            assert sorted({i for c in covered for i in c}) == [i for i in range(old) if i * -(-numel // old) < numel]


def _zero_masters_saved_then_restored(ranks, directory, whole, saving):
    """On each rank: a bf16 model under colossalai's ZeRO optimizer (CPU) whose fp32 masters are set to ZeRO's
    cut of ``whole`` (``{name: flat fp32}``) over the ranks, saved (``saving``); else a fresh one's masters
    restored from ``directory``, with the names of the files this rank opened and the masters it holds."""
    import types

    from colossal_llama.training import cpu_compat, master_weights

    cpu_compat.apply()
    from colossalai.zero.low_level import LowLevelZeroOptimizer

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 3)).bfloat16()
    optimizer = LowLevelZeroOptimizer(torch.optim.AdamW(module.parameters(), lr=1e-3), partition_grad=True)
    model = types.SimpleNamespace(unwrap=lambda: module)
    parallel = types.SimpleNamespace(saves_master_weights=True, plugin=None, sizes={"tp_size": 1, "pp_size": 1})
    masters = master_weights._masters_by_name(model, optimizer)
    if saving:
        with torch.no_grad():
            for name, (_, master) in masters.items():
                padded = torch.cat([whole[name], torch.zeros(-whole[name].numel() % ranks.size)])
                master.copy_(padded.chunk(ranks.size)[ranks.rank])
        return master_weights.save_master_weights(model, optimizer, directory, parallel)
    opened, load = [], master_weights._load
    master_weights._load = lambda path: opened.append(path.name) or load(path)
    restored = master_weights.restore_master_weights(model, optimizer, directory, parallel)
    return restored, opened, {name: master.clone() for name, (_, master) in masters.items()}


def test_zero_masters_of_4_ranks_resumed_on_2_open_only_the_files_they_overlap(tmp_path):
    """A job on 512 ranks resumed on 256 used to open all 512 files on every rank (262,144 opens). The save now
    writes an index of which file holds which slice, and each rank opens only the old files its new slices
    overlap: of 4 ranks' files, new rank 0 of 2 opens the old ranks 0 and 1, new rank 1 the old 2 and 3, and each
    holds exactly ZeRO's 2-rank cut of the masters the 4 ranks held (padding zeros)."""
    from colossal_llama.training.master_weights import INDEX_FILE, MASTER_DIR
    from tests.support.gloo_world import run_in_gloo_world

    shapes = {"0.weight": 32, "0.bias": 4, "1.weight": 12, "1.bias": 3}  # 1.bias: one element of padding on 4
    whole = {name: torch.arange(numel, dtype=torch.float32) + 0.1 for name, numel in shapes.items()}
    assert run_in_gloo_world(_zero_masters_saved_then_restored, 4, tmp_path, whole, True) == [4] * 4
    index = json.loads((tmp_path / MASTER_DIR / INDEX_FILE).read_text())
    assert [(e["file"], e["slice"]) for e in index["files"]] == [(f"rank-{r:05d}.pt", [r, 4]) for r in range(4)]
    for indexed in (True, False):  # without the index (a checkpoint of an older version): every file is read
        if not indexed:
            (tmp_path / MASTER_DIR / INDEX_FILE).unlink()
        results = run_in_gloo_world(_zero_masters_saved_then_restored, 2, tmp_path, whole, False)
        for rank, (restored, opened, masters) in enumerate(results):
            assert restored is True
            olds = (2 * rank, 2 * rank + 1) if indexed else range(4)
            assert opened == [f"rank-{old:05d}.pt" for old in olds], indexed
            for name, numel in shapes.items():
                padded = torch.cat([whole[name], torch.zeros(-numel % 2)])
                assert torch.equal(masters[name], padded.chunk(2)[rank]), (rank, name, indexed)


def _fp16_zero_scaler_round_trip(ranks, directory):
    """On each rank: a ZeRO fp16 optimizer (colossalai's, on CPU) whose loss scaler three overflowing steps and a
    clean one moved; its state saved; then a fresh optimizer's scaler before and after the restore."""
    from colossal_llama.training import cpu_compat
    from colossal_llama.training.loss_scale import restore_loss_scale, save_loss_scale, scaler_state

    cpu_compat.apply()
    from colossalai.zero.low_level import LowLevelZeroOptimizer

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4).half()
        return model, LowLevelZeroOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), partition_grad=True)

    model, optimizer = fresh()
    for blow_up in (1e6, 1e6, 1e6, 1.0):  # x 65,536 overflows fp16's gradients; 1.0 does not
        optimizer.backward(model(torch.ones(2, 8, dtype=torch.half)).float().sum() * blow_up)
        optimizer.step()
        optimizer.zero_grad()
    saved = save_loss_scale(optimizer, directory)
    torch.distributed.barrier()  # rank 0 wrote it: the checkpoint is complete before any rank resumes from it
    _, again = fresh()
    before = scaler_state(again)
    return saved, before, restore_loss_scale(again, directory), scaler_state(again)


def test_the_fp16_loss_scale_goes_on_after_a_resume(tmp_path):
    """colossalai's checkpoints leave the loss scaler out: a resumed fp16 run started again at 2**16 and skipped
    steps until the scale came down. The checkpoint holds the scale and the counters of clean and overflowing
    steps, and every rank of the resumed run takes them (2 ranks, colossalai's ZeRO fp16 optimizer)."""
    from colossal_llama.training.loss_scale import LOSS_SCALE_FILE
    from tests.support.gloo_world import run_in_gloo_world

    results = run_in_gloo_world(_fp16_zero_scaler_round_trip, 2, tmp_path)
    moved = {"scale": 16384.0, "growth_step": 1, "hysteresis_step": 3}  # 2 overflows halve it (hysteresis 2)
    assert json.loads((tmp_path / LOSS_SCALE_FILE).read_text()) == moved
    for saved, before, restored, after in results:
        assert saved == moved and before == {"scale": 65536.0, "growth_step": 0, "hysteresis_step": 0}
        assert restored is True and after == moved


def _torch_scaler_round_trip(ranks, directory):
    import types

    from colossal_llama.training.loss_scale import restore_loss_scale, save_loss_scale, scaler_state

    param = torch.nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for blow_up in (float("inf"), 1.0):  # an overflowing step (skipped, the scale halved), then a clean one
        scaler.scale((param * blow_up).sum()).backward()
        scaler.step(sgd)
        scaler.update()
        sgd.zero_grad()
    saved = save_loss_scale(types.SimpleNamespace(scaler=scaler), directory)
    again = types.SimpleNamespace(scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    before = scaler_state(again)
    return saved, before, restore_loss_scale(again, directory), scaler_state(again)


def test_torchs_grad_scaler_under_ddp_goes_on_after_a_resume(tmp_path):
    """ddp in fp16 scales with torch's GradScaler (colossalai's wrapper holds it as ``optimizer.scaler``; its CUDA
    scaler is off on CPU, so torch's CPU scaler stands in): its scale and clean-step count are saved and restored."""
    from tests.support.gloo_world import run_in_gloo_world

    [(saved, before, restored, after)] = run_in_gloo_world(_torch_scaler_round_trip, 1, tmp_path)
    moved = {"scale": 512.0, "growth_step": 1, "hysteresis_step": 0}
    assert saved == moved and before == {"scale": 1024.0, "growth_step": 0, "hysteresis_step": 0}
    assert restored is True and after == moved


def test_a_checkpoint_without_a_loss_scale_is_said_and_starts_at_the_initial_one(tmp_path):
    """A checkpoint saved without fp16 (or before the scale was saved) resumed in fp16: the scale starts at its
    initial value, and the log says so. Without fp16 there is nothing to restore."""
    from colossal_llama.training.loss_scale import restore_loss_scale
    from tests.support.gloo_world import run_in_gloo_world

    checkpoint = tmp_path / "epoch-0_step-3"
    [(restored, scale, said)] = run_in_gloo_world(_fp16_restore_from_nothing, 1, checkpoint / "optimizer")
    assert (restored, scale) == (False, 65536.0)
    assert said == [f"{checkpoint}: holds no loss scale (saved without fp16, or by an older version): the fp16 loss "
                    "scale starts again at its initial value"]
    assert restore_loss_scale(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0), tmp_path) is None
    # ddp's wrapper holds a GradScaler that is off (bf16 or fp32, or CUDA's scaler on CPU): nothing saved nor restored
    import types

    from colossal_llama.training.loss_scale import save_loss_scale, scaler_state

    off = types.SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert scaler_state(off) is None and save_loss_scale(off, tmp_path / "bf16") is None
    assert restore_loss_scale(off, tmp_path) is None and not (tmp_path / "bf16").exists()


def _fp16_restore_from_nothing(ranks, directory):
    from colossal_llama.training import cpu_compat
    from colossal_llama.training.loss_scale import restore_loss_scale, scaler_state

    cpu_compat.apply()
    from colossalai.zero.low_level import LowLevelZeroOptimizer

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("colossal_llama.training.loss_scale").addHandler(handler)
    model = torch.nn.Linear(8, 4).half()
    optimizer = LowLevelZeroOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), partition_grad=True)
    return restore_loss_scale(optimizer, directory), scaler_state(optimizer)["scale"], said


# ------------------------------------------------------------------------------------------------ metrics on resume
def _log_steps(save_dir, tb_dir, start_step: int, steps, loss: float) -> None:
    from colossal_llama.training.metrics import RunMetrics, StepStats

    metrics = RunMetrics(True, save_dir, str(tb_dir), 6, start_step, 100, 1000, False, [], None)
    for step in steps:
        metrics.record(StepStats(step, 0, loss, 1e-3, 1.0, 128, 0.1))
    metrics.close()


def test_a_resume_purges_the_crashed_runs_points_after_its_checkpoint(tmp_path):
    """The crashed run logged steps 1-6, its checkpoint was step 3: the resumed run's steps 4-6 replace its 4-6,
    in losses.jsonl and in TensorBoard (which showed both before: a line that doubles back)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from colossal_llama.training.metrics import read_loss_log

    _log_steps(tmp_path / "run", tmp_path / "tb", 0, range(1, 7), loss=5.0)
    _log_steps(tmp_path / "run", tmp_path / "tb", 3, range(4, 7), loss=4.0)
    assert [(r["step"], r["loss"]) for r in read_loss_log(tmp_path / "run" / "losses.jsonl")] == [
        (1, 5.0), (2, 5.0), (3, 5.0), (4, 4.0), (5, 4.0), (6, 4.0)]
    points = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    points.Reload()
    assert [(e.step, e.value) for e in points.Scalars("train/loss")] == [
        (1, 5.0), (2, 5.0), (3, 5.0), (4, 4.0), (5, 4.0), (6, 4.0)]


def test_a_loss_log_line_cut_short_by_a_crash_is_dropped_with_a_warning(tmp_path, caplog):
    from colossal_llama.training.metrics import trim_loss_log

    log = tmp_path / "losses.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 5)) + '{"step": 5, "lo')
    with caplog.at_level("WARNING"):
        assert trim_loss_log(log, 3) == 2  # step 4, and the torn line
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert f"{log}:5: not a record" in caplog.text


def _on_rank0_outcomes(ranks) -> list:
    """What each use of on_rank0 gives on this rank: a result, or the exception's type and message."""
    from colossal_llama.training.distributed import on_rank0

    def listing():
        return ["epoch-0_step-6"] if ranks.rank == 0 else ["epoch-0_step-3"]  # another machine's stale view

    def broken():
        raise OSError(38, "Function not implemented")  # flock on a filesystem mounted without it

    outcomes = [on_rank0(listing, shared=True), on_rank0(listing)]
    try:
        on_rank0(broken)
    except Exception as err:  # noqa: BLE001
        outcomes.append((type(err).__name__, str(err)))
    return outcomes


def test_rank0s_answer_is_every_ranks_and_its_failure_too():
    """What every rank must see alike comes from rank 0 (shared=True); a failure there that is not a user error
    (an OSError) is raised on every rank: before, the others waited for rank 0 in their next collective."""
    from tests.support.gloo_world import run_in_gloo_world

    rank0, rank1 = run_in_gloo_world(_on_rank0_outcomes, 2)
    assert rank0[:2] == [["epoch-0_step-6"], ["epoch-0_step-6"]] and rank1[:2] == [["epoch-0_step-6"], None]
    assert rank0[2] == ("OSError", "[Errno 38] Function not implemented")
    assert rank1[2] == ("RuntimeError", "rank 0 failed: OSError: [Errno 38] Function not implemented")


def test_a_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, caplog):
    """Back to step 3 after a loss spike at step 8: checkpoints 6 and 8 stayed the newest, so a restart with
    --load_checkpoint latest went back to the abandoned branch, and --keep_last_k deleted the new branch's first
    checkpoints instead of the abandoned ones. They are moved aside, nothing deleted."""
    from colossal_llama.training.checkpoint import set_aside_newer_checkpoints

    save_dir = tmp_path / "ckpt"
    for step in (3, 6, 8):
        (save_dir / f"epoch-0_step-{step}").mkdir(parents=True)
        (save_dir / f"epoch-0_step-{step}" / "running_states.json").write_text("{}")
    with caplog.at_level("WARNING"):
        moved = set_aside_newer_checkpoints(save_dir / "epoch-0_step-3", save_dir)
    assert moved == [save_dir / "abandoned" / "epoch-0_step-6", save_dir / "abandoned" / "epoch-0_step-8"]
    assert latest_checkpoint(save_dir) == save_dir / "epoch-0_step-3"
    assert all((m / "running_states.json").is_file() for m in moved)
    assert "its 2 newer checkpoints (epoch-0_step-6, epoch-0_step-8) are moved to" in caplog.text
    assert set_aside_newer_checkpoints(save_dir / "epoch-0_step-3", save_dir) == []  # the newest: nothing to move
    assert set_aside_newer_checkpoints(tmp_path / "elsewhere" / "epoch-0_step-1", save_dir) == []  # another dir


def test_an_index_is_checked_only_when_it_is_the_one_read(tmp_path):
    """A HF folder downloaded with its safetensors only keeps pytorch_model.bin.index.json naming .bin files it
    does not have: the safetensors index is the one read, and the folder loads. The index that is read must name
    only files that are there."""
    from colossal_llama.training.checkpoint_files import verify_checkpoint_files

    model = tmp_path / "model"
    model.mkdir()
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "pytorch_model-1.bin"}}))
    with pytest.raises(UserInputError, match="pytorch_model-1.bin: missing, though pytorch_model.bin.index.json"):
        verify_checkpoint_files(model)  # the .bin index alone: it is read, and its file is missing
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    (model / "model-1.safetensors").write_bytes(b"")
    import colossal_llama.training.checkpoint_files as files

    checked = []
    real = files.check_safetensors_file
    files.check_safetensors_file = checked.append  # the empty stand-in is no safetensors file: not the point here
    try:
        verify_checkpoint_files(model)  # the safetensors index is read: the leftover .bin index is not checked
    finally:
        files.check_safetensors_file = real
    assert checked == [model / "model-1.safetensors"]


def test_newer_checkpoints_go_aside_on_a_resume_but_not_in_a_torchrun_restart(tmp_path):
    from colossal_llama.training.checkpoint import LoadTarget
    from colossal_llama.training.loop import newer_checkpoints_go_aside

    resume, weights = LoadTarget("resume", tmp_path / "epoch-0_step-3"), LoadTarget("weights", tmp_path / "m")
    assert newer_checkpoints_go_aside(resume, restarted=False)
    assert not newer_checkpoints_go_aside(resume, restarted=True)  # a job that claimed the save dir before
    assert not newer_checkpoints_go_aside(weights, False) and not newer_checkpoints_go_aside(None, False)
    # the store unreachable (restarted unknown, so False): the restart count still keeps the job's checkpoints
    assert not newer_checkpoints_go_aside(resume, False, {"TORCHELASTIC_RESTART_COUNT": "1"})


def test_a_resume_with_another_global_batch_counts_the_rest_of_the_data_in_the_new_size():
    """2 epochs of 96 samples: 12 steps of 8 each. Saved at step 5 (40 samples) with 8, resumed with 12: 4 more
    steps end epoch 0 (samples 40-87), 8 make epoch 1, 17 in all. Counting 2 x 8 steps of 12 ended the run at 16,
    one step short of the data (with other sizes: whole epochs short, or steps past the end)."""
    from colossal_llama.training.checkpoint import RunningState
    from colossal_llama.training.loop import steps_in_all

    saved = RunningState(epoch=0, step=5, sample_offset=40, global_batch=8, world_size=2)
    assert steps_in_all(2, 96, 12, saved) == 5 + 4 + 8
    assert steps_in_all(2, 96, 8, saved) == 2 * 12  # the same batch: as a fresh run
    assert steps_in_all(2, 96, 12, None) == 2 * 8
    later = RunningState(epoch=1, step=14, sample_offset=16, global_batch=8, world_size=2)
    assert steps_in_all(2, 96, 4, later) == 14 + 20  # the rest of the last epoch, 80 samples in 4s
    done = RunningState(epoch=2, step=24, sample_offset=0, global_batch=8, world_size=2)
    assert steps_in_all(2, 96, 12, done) == 24  # nothing left


def test_mfu_is_per_device_of_the_run(tmp_path, monkeypatch):
    """A step's tokens are the global batch's: 64 GPUs of 3,000 tokens/s each on a 7 B model were reported at
    2,585 % MFU (the world's tokens over one device's peak). MFU divides by every device's peak."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from colossal_llama.training import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "peak_flops", lambda cuda: 312e12)  # an A100's bf16 peak
    params, devices, per_device = 7_000_000_000, 64, 3000.0
    run = metrics_module.RunMetrics(True, tmp_path / "run", str(tmp_path / "tb"), 1, 0, 1, params, False, [],
                                    devices=devices)
    run.record(metrics_module.StepStats(1, 0, 2.0, 1e-4, 1.0, int(per_device * devices), 1.0))
    run.close()
    points = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    points.Reload()
    (mfu,) = [e.value for e in points.Scalars("train/mfu")]
    assert mfu == pytest.approx(6 * params * per_device / 312e12, rel=1e-6)  # 40.4 %
    assert 0.40 < mfu < 0.41


def test_a_skipped_step_is_logged_as_skipped_not_as_a_loss(tmp_path, caplog):
    """losses.jsonl holds null for a step without trained tokens; the log's mean loss leaves it out and says so."""
    from colossal_llama.training import metrics as metrics_module

    run = metrics_module.RunMetrics(True, tmp_path / "run", None, 3, 0, 3, 1000, False, [])
    with caplog.at_level("INFO", logger=metrics_module.__name__):
        for step, loss in ((1, 2.0), (2, None), (3, 4.0)):
            run.record(metrics_module.StepStats(step, 0, loss, 1e-4, None if loss is None else 1.0, 100, 1.0))
        run.close()
    assert [r["loss"] for r in metrics_module.read_loss_log(tmp_path / "run" / "losses.jsonl")] == [2.0, None, 4.0]
    assert "loss 3.0000 (mean of 2 steps); 1 step(s) skipped: no trained token" in caplog.text


@pytest.mark.parametrize("collective", [False, True])
def test_every_dp_rank_runs_as_many_validation_forwards_where_forwards_are_collective(collective):
    """Batch i of the plan is dp rank ``i % dp``'s: 4 batches on 3 ranks give rank 0 two and the others one. Under
    gemini each forward all-gathers the sharded parameters over the dp ranks, so rank 0's second forward waited
    for ranks that had none (a hang, or mismatched collectives). There every rank runs two forwards, the extra
    ones unscored fillers; elsewhere the ranks run only their own batches."""
    from types import SimpleNamespace

    from colossal_llama.training.validation import Validator

    def batches(rank: int):
        layout = SimpleNamespace(dp_size=3, dp_rank=rank)
        parallel = SimpleNamespace(layout=layout, pipeline_microbatch_size=0, reports_loss=False,
                                   forwards_are_collective=collective)
        validator = Validator([], ["a", "a", "b", "b"], None, None, SimpleNamespace(parallel=parallel), 1, 100)
        return [(category, rows.tolist()) for category, rows in validator.my_batches()]

    assert batches(0) == [("a", [0]), ("b", [3])]
    filler = [(None, [0])] if collective else []
    assert batches(1) == [("b", [2])] + filler
    assert batches(2) == [("a", [1])] + filler


def test_validation_with_fewer_batches_than_categories_scores_those_it_covers_and_says_which_not():
    """Categories take turns in name order: --eval_batches 2 over 3 held-out categories scores 2. The third was a
    table row of ``loss nan (0 tokens)``, ``NaN`` in eval.jsonl (not JSON) and TensorBoard; it is left out, and the
    run says so and how many batches would score it. Under a pipeline (full batches only) a category with fewer
    rows than a batch is left out too, and said."""
    from types import SimpleNamespace

    from colossal_llama.training.validation import CategoryScore, Validator

    def validator(batches: int, pipeline: int = 0) -> Validator:
        layout = SimpleNamespace(dp_size=1, dp_rank=0)
        parallel = SimpleNamespace(layout=layout, pipeline_microbatch_size=pipeline, reports_loss=False,
                                   forwards_are_collective=False)
        return Validator([], ["news", "news", "novel", "review", "review"], None, None,
                         SimpleNamespace(parallel=parallel), 2, batches)

    few = validator(2)
    assert few.categories == ["news", "novel"] and few.left_out == ["review"]
    assert few.left_out_note() == ("validation leaves 1 held-out categories out of its table (review: --eval_batches 2 "
                                   "gives categories a batch each in name order; 3 would score them)")
    assert validator(3).categories == ["news", "novel", "review"] and validator(3).left_out_note() is None
    piped = validator(8, pipeline=1)  # batches of 2 rows: novel has 1
    assert piped.categories == ["news", "review"] and piped.left_out == ["novel"]
    assert piped.left_out_note().endswith("(novel: fewer held-out rows than a full batch of --batch_size, which a "
                                          "pipeline needs)")
    assert CategoryScore(0.0, 0, 0).to_json() == {"loss": None, "bpc": None, "tokens": 0, "characters": 0}


def test_validation_batches_take_turns_and_are_full_under_a_pipeline():
    """Each category's held-out rows in order, cut into batches, categories taking turns, at most ``--eval_batches``;
    colossalai's pipeline schedule wants every batch of the training batch's size, so there a category's last,
    smaller batch is cut to full batches (its rows beyond them are not scored) instead of being sent short."""
    from colossal_llama.training.validation import batch_plan

    categories = ["news"] * 7 + ["novel"] * 5 + ["news"] * 2
    news, novel = [0, 1, 2, 3, 4, 5, 6, 12, 13], [7, 8, 9, 10, 11]

    def plan(**kw):
        return [(category, rows.tolist()) for category, rows in batch_plan(categories, 4, **kw)]

    assert plan(max_batches=100) == [("news", news[:4]), ("novel", novel[:4]), ("news", news[4:8]),
                                     ("novel", novel[4:]), ("news", news[8:])]
    assert plan(max_batches=3) == plan(max_batches=100)[:3]
    assert plan(max_batches=100, multiple=4) == [("news", news[:4]), ("novel", novel[:4]), ("news", news[4:8])]


def test_liger_is_off_where_colossalai_runs_the_forward_and_refused_when_asked(monkeypatch):
    """Tensor, pipeline and sequence parallelism replace the model's forward and loss with colossalai's: Liger's
    fused loss never ran there, though the run's plan said it trained. ``auto`` is off there, ``on`` refused."""
    import importlib.util

    from colossal_llama.training import model as model_module
    from colossal_llama.utils.errors import UserInputError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: object() if name == "liger_kernel" else real(name, *args))
    assert model_module.apply_liger_kernels("auto", cuda=True, forward_is_the_models=False) is False
    assert model_module.apply_liger_kernels("off", cuda=True, forward_is_the_models=False) is False
    with pytest.raises(UserInputError, match="^--liger on: tensor, pipeline and sequence parallelism"):
        model_module.apply_liger_kernels("on", cuda=True, forward_is_the_models=False)
    with pytest.raises(UserInputError, match="^--liger on: needs CUDA"):
        model_module.apply_liger_kernels("on", cuda=False, forward_is_the_models=True)


def _steps_around_a_batch_without_trained_tokens(ranks, args):
    """Steps 1 and 3 on the data, step 2 on a global batch whose labels are all masked; what each step did."""
    from colossal_llama.training.loop import build_run, micro_batch_groups

    run = build_run(parse_config(args))
    try:
        groups = micro_batch_groups(run, 0, 0)

        def weights():
            return {n: p.detach().clone() for n, p in run.stepper.model.unwrap().named_parameters()}

        def changed(a, b):
            return sorted(n for n in a if not torch.equal(a[n], b[n]))

        first = run.stepper.step(next(groups), 1)
        before = weights()
        masked = next(groups)
        for batch in masked:
            batch["labels"].fill_(IGNORE_INDEX)
        skipped = run.stepper.step(masked, 2)
        after_skip = weights()
        third = run.stepper.step(next(groups), 3)
        return first, skipped, third, changed(before, after_skip), len(changed(after_skip, weights())), len(before)
    finally:
        if run.peers is not None:
            run.peers.close()


@pytest.mark.parametrize("plugin", ["ddp", "zero2"])
def test_a_global_batch_without_trained_tokens_leaves_the_weights_and_the_optimizer_alone(
        plugin, tiny_llama, prepared_pretrain, tmp_path):
    """Chunks of a long source carry no trained token; a global batch of only such rows has no gradient, and an
    optimizer step would still move every weight (Adam's momentum, weight decay). The step is skipped on every
    rank (no loss, no norm), its tokens still count, the schedule moves on, and the next step trains."""
    from tests.support.gloo_world import run_in_gloo_world

    args = ["--pretrained", str(tiny_llama), "--dataset", str(prepared_pretrain / "arrow"), "--plugin", plugin,
            "--save_dir", str(tmp_path / "run"), "--max_length", "128", "--batch_size", "1",
            "--accumulation_steps", "2", "--lr", "1e-3", "--warmup_steps", "0", "--weight_decay", "0.1",
            "--mixed_precision", "fp32", "--max_steps", "3"]
    ranks = run_in_gloo_world(_steps_around_a_batch_without_trained_tokens, 2, args, join=False)
    for first, skipped, third, changed_by_skip, changed_after, num_weights in ranks:
        assert first.loss > 0 and first.grad_norm > 0
        assert skipped.loss is None and skipped.grad_norm is None and skipped.tokens > 0
        assert changed_by_skip == []  # with the optimizer stepped: every weight moves (momentum of step 1)
        assert third.loss > 0 and changed_after == num_weights
        assert first.lr > skipped.lr > third.lr  # cosine decay: the schedule took its step 2


# ---------------------------------------------------------------------------------------- the save dir's earlier run
def _checkpoint(path, step: int) -> None:
    (path / "modeling").mkdir(parents=True)
    (path / "modeling" / "model.safetensors").write_bytes(b"weights")
    (path / "running_states.json").write_text(json.dumps({"epoch": 0, "step": step, "sample_offset": 4 * step,
                                                          "global_batch": 4, "world_size": 2}))


def _earlier_run(save_dir, steps=(3, 6), final=True, abandoned=()):
    """A save dir as a run leaves it: complete checkpoints, losses.jsonl, a finished run's modeling/, and the
    checkpoints a resume from an older one set aside."""
    save_dir.mkdir(parents=True)
    for step in steps:
        _checkpoint(save_dir / f"epoch-0_step-{step}", step)
    for step in abandoned:
        _checkpoint(save_dir / "abandoned" / f"epoch-0_step-{step}", step)
    if final:
        (save_dir / "modeling").mkdir()
        (save_dir / "modeling" / "model.safetensors").write_bytes(b"weights")
    (save_dir / "losses.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)))
    return save_dir


def _tree(path) -> list:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("flag, inside", [("--pretrained", "modeling"),
                                          ("--load_checkpoint", "epoch-0_step-6/modeling"),
                                          ("--dataset", "abandoned/epoch-0_step-8"), ("--eval_dataset", "losses.jsonl")])
def test_starting_afresh_never_deletes_what_the_run_reads(tmp_path, flag, inside):
    """--pretrained SAVE/modeling --overwrite deleted the model it was about to load, then failed: an input inside
    an entry of the earlier run is refused in one line before anything is touched. Without --overwrite the run is
    refused as any start over an earlier run (no talk of a deletion nobody asked for)."""
    import re

    from colossal_llama.training.run_dir import SaveDirRequest, check_not_clobbering
    from colossal_llama.training.trash import Trash

    save_dir = _earlier_run(tmp_path / "ckpt", abandoned=(8,))
    before, given = _tree(save_dir), save_dir / inside
    request = SaveDirRequest(None, None, inputs=[("--dataset", tmp_path / "data"), (flag, given)])
    with pytest.raises(UserInputError, match=re.escape(f"holds an earlier run ({save_dir / 'epoch-0_step-6'}); "
                                                       "continue it with --load_checkpoint latest")):
        check_not_clobbering(save_dir, request, False, Trash(".tmp-"))
    with pytest.raises(UserInputError) as err:
        check_not_clobbering(save_dir, request, True, Trash(".tmp-"))
    assert str(err.value) == (f"{flag} {given}: lies in {save_dir / inside.split('/')[0]}, part of the earlier "
                              f"run in --save_dir {save_dir}, which starting afresh there (--overwrite) deletes; "
                              "copy it out of the save dir first, or choose another --save_dir")
    assert _tree(save_dir) == before


def test_the_inputs_kept_from_overwrite_are_every_path_the_run_reads(tiny_llama):
    from pathlib import Path

    from colossal_llama.training.run_dir import run_inputs

    cfg = parse_config(["--pretrained", str(tiny_llama), "--dataset", "a:0.7", "b:0.3",
                        "--eval_dataset", "e", "--load_checkpoint", "c"])
    assert run_inputs(cfg) == [("--pretrained", tiny_llama), ("--load_checkpoint", Path("c")), ("--dataset", Path("a")),
                               ("--dataset", Path("b")), ("--eval_dataset", Path("e"))]
    cfg = parse_config(["--pretrained", str(tiny_llama), "--dataset", "a", "--load_checkpoint", "latest"])
    assert [flag for flag, _ in run_inputs(cfg)] == ["--pretrained", "--dataset"]


def test_overwrite_deletes_the_whole_earlier_run_its_abandoned_branch_included(tmp_path):
    """abandoned/ (checkpoints a resume from an older one set aside: whole checkpoints) stayed after --overwrite;
    what is not a run's (the user's own folder, here read as --dataset) stays."""
    from colossal_llama.training.run_dir import SaveDirRequest, check_not_clobbering
    from colossal_llama.training.trash import Trash

    save_dir = _earlier_run(tmp_path / "ckpt", abandoned=(8,))
    for name in ("train_config.json", "eval.jsonl"):
        (save_dir / name).write_text("{}\n")
    (save_dir / ".tmp-epoch-0_step-9" / "modeling").mkdir(parents=True)  # a crashed save
    (save_dir / "notes").mkdir()
    trash = Trash(".tmp-")
    check_not_clobbering(save_dir, SaveDirRequest(None, None, inputs=[("--dataset", save_dir / "notes")]), True, trash)
    trash.wait()
    assert _tree(save_dir) == ["notes"]


def test_a_set_aside_checkpoint_is_resumed_after_moving_it_back_and_the_refusal_says_so(tmp_path):
    """abandoned/ is the save dir's own: resuming from there is named as such, with the way on, and never met with
    talk of a deletion the user did not ask for (without --overwrite)."""
    from colossal_llama.training.checkpoint import LoadTarget
    from colossal_llama.training.run_dir import SaveDirRequest, check_not_clobbering
    from colossal_llama.training.trash import Trash

    save_dir = _earlier_run(tmp_path / "ckpt", steps=(3,), final=False, abandoned=(6,))
    aside = save_dir / "abandoned" / "epoch-0_step-6"
    request = SaveDirRequest(str(aside), LoadTarget("resume", aside))
    with pytest.raises(UserInputError) as err:
        check_not_clobbering(save_dir, request, False, Trash(".tmp-"))
    assert str(err.value) == (f"--load_checkpoint {aside}: a checkpoint --save_dir {save_dir} set aside; move it "
                              f"back first (mv {aside} {save_dir}/) and resume it there, which sets the newer ones "
                              "aside in turn")
    aside.rename(save_dir / aside.name)
    back = save_dir / aside.name
    check_not_clobbering(save_dir, SaveDirRequest(str(back), LoadTarget("resume", back)), False, Trash(".tmp-"))


@pytest.mark.parametrize("named", [None, "weights"])
def test_a_torchrun_restart_with_overwrite_keeps_the_jobs_checkpoints(tmp_path, named):
    """A job started afresh (--overwrite, nothing or a new stage's weights named) dies after its first checkpoint;
    torchrun starts the same command again: it took the job's own checkpoints for an earlier run, deleted them and
    trained from step 0 (or, without --overwrite, was refused). The restart continues the job from them."""
    from colossal_llama.training.run_dir import SaveDirRequest, check_not_clobbering
    from colossal_llama.training.trash import Trash

    save_dir = _earlier_run(tmp_path / "ckpt", final=False)
    before = _tree(save_dir)
    weights = tmp_path / "stage1" / "modeling"
    _checkpoint(tmp_path / "stage1", 4)
    load = None if named is None else str(weights)
    target = resolve_load_target(load, save_dir, restarted=True)
    assert target is not None and target.path == save_dir / "epoch-0_step-6" and target.kind == "resume"
    trash = Trash(".tmp-")
    check_not_clobbering(save_dir, SaveDirRequest(load, target, restarted=True), True, trash)
    trash.wait()
    assert _tree(save_dir) == before
    with pytest.raises(UserInputError, match="holds an earlier run"):  # a first start of that command: refused
        check_not_clobbering(save_dir, SaveDirRequest(load, resolve_load_target(load, save_dir)), False, trash)
    # died before its first checkpoint: what it left (losses.jsonl) is its own too, started over, not refused
    young = tmp_path / "young"
    young.mkdir()
    (young / "losses.jsonl").write_text('{"step": 1}\n')
    target = resolve_load_target(load, young, restarted=True)
    check_not_clobbering(young, SaveDirRequest(load, target, restarted=True), False, trash)


def test_a_resume_from_another_folders_checkpoint_into_an_earlier_run_is_refused_unless_overwrite(tmp_path):
    """It counted as continuing the save dir's run: that run's losses.jsonl was trimmed and mixed with the new one,
    its checkpoints replaced, and --keep_last_k deleted the new ones (rotation goes by step)."""
    import dataclasses

    from colossal_llama.training.checkpoint import LoadTarget
    from colossal_llama.training.run_dir import SaveDirRequest, check_not_clobbering
    from colossal_llama.training.trash import Trash

    other = tmp_path / "other" / "epoch-0_step-6"
    _checkpoint(other, 6)
    request = SaveDirRequest(str(other), LoadTarget("resume", other))
    trash = Trash(".tmp-")
    crashed = _earlier_run(tmp_path / "crashed", steps=(), final=False)  # losses.jsonl alone
    for save_dir in (_earlier_run(tmp_path / "ckpt", steps=(3,), final=False), crashed):
        before = _tree(save_dir)
        with pytest.raises(UserInputError) as err:
            check_not_clobbering(save_dir, request, False, trash)
        evidence = save_dir / ("epoch-0_step-3" if save_dir.name == "ckpt" else "losses.jsonl")
        assert str(err.value) == (f"--save_dir {save_dir}: holds an earlier run ({evidence}), and --load_checkpoint "
                                  f"{other} is not one of its checkpoints: resuming it there would mix the two runs' "
                                  "checkpoints and losses; choose another --save_dir, or pass --overwrite to delete "
                                  "the earlier run first")
        assert _tree(save_dir) == before
    save_dir = tmp_path / "ckpt"
    check_not_clobbering(save_dir, SaveDirRequest("x", LoadTarget("resume", save_dir / "epoch-0_step-3")), False, trash)
    check_not_clobbering(save_dir, dataclasses.replace(request, restarted=True), False, trash)  # the job's own files
    check_not_clobbering(tmp_path / "fresh", request, False, trash)
    assert (save_dir / "epoch-0_step-3").is_dir() and (save_dir / "losses.jsonl").is_file()
    check_not_clobbering(save_dir, request, True, trash)
    trash.wait()
    assert _tree(save_dir) == []


def test_latest_refuses_to_train_afresh_over_a_finished_run_whose_checkpoints_are_gone(tmp_path):
    """It logged "starting from scratch", emptied losses.jsonl, replaced modeling/ and exited 0. A losses.jsonl
    alone (a crash before the first checkpoint) is still started afresh: torchrun restarts rely on it."""
    from colossal_llama.training.run_dir import SaveDirRequest, check_not_clobbering
    from colossal_llama.training.trash import Trash

    finished, trash = _earlier_run(tmp_path / "ckpt", steps=()), Trash(".tmp-")
    request = SaveDirRequest("latest", resolve_load_target("latest", finished))
    assert request.target is None
    with pytest.raises(UserInputError) as err:
        check_not_clobbering(finished, request, False, trash)
    assert str(err.value) == (f"--save_dir {finished}: --load_checkpoint latest found no checkpoint to continue, but "
                              f"the save dir holds a finished run ({finished / 'modeling'}): pass --overwrite to "
                              "delete it and train afresh, or choose another --save_dir")
    assert _tree(finished) == ["losses.jsonl", "modeling", "modeling/model.safetensors"]
    crashed = _earlier_run(tmp_path / "crashed", steps=(), final=False)
    check_not_clobbering(crashed, SaveDirRequest("latest", None), False, trash)
    assert _tree(crashed) == ["losses.jsonl"]  # the run's metrics start it over
    check_not_clobbering(finished, request, True, trash)
    trash.wait()
    assert _tree(finished) == []


def test_a_torchrun_restart_resumes_from_the_jobs_newest_checkpoint_not_the_named_one(tmp_path):
    """The restarted command names the checkpoint the job started from: the restart went back to it (losing the
    steps since) and failed once --keep_last_k had deleted it. Now the save dir's newest checkpoint at or above
    its step is taken; a first start loads what it names."""
    from colossal_llama.training.checkpoint import LoadTarget

    save_dir = tmp_path / "ckpt"
    for step in (6, 9):
        _checkpoint(save_dir / f"epoch-0_step-{step}", step)
    named = save_dir / "epoch-0_step-3"  # deleted by --keep_last_k 2: its step is read from its name
    newest = LoadTarget("resume", save_dir / "epoch-0_step-9")
    assert resolve_load_target(str(named), save_dir, restarted=True) == newest
    with pytest.raises(UserInputError, match="directory does not exist"):
        resolve_load_target(str(named), save_dir)
    copy, later = tmp_path / "backup" / "good", tmp_path / "backup" / "later"  # renamed: steps from running_states
    _checkpoint(copy, 6)
    _checkpoint(later, 12)
    assert resolve_load_target(str(copy), save_dir, restarted=True) == newest
    assert resolve_load_target(str(copy), save_dir) == LoadTarget("resume", copy)
    assert resolve_load_target(str(later), save_dir, restarted=True) == LoadTarget("resume", later)  # none since
    # a new stage (weights named) or nothing named: a first start loads what it names, a restart the job's newest
    weights = tmp_path / "stage1" / "modeling"
    _checkpoint(tmp_path / "stage1", 4)
    assert resolve_load_target(str(weights), save_dir) == LoadTarget("weights", weights)
    assert resolve_load_target(str(weights), save_dir, restarted=True) == newest
    assert resolve_load_target(None, save_dir) is None
    assert resolve_load_target(None, save_dir, restarted=True) == newest
    assert resolve_load_target(None, tmp_path / "empty", restarted=True) is None  # died before its first one


def test_a_restart_is_one_only_once_the_job_claimed_that_save_dir(tmp_path):
    """torchrun restarts a run refused at its claim too: that restart must be checked as a first start, or it
    would take the other run's checkpoints for the job's own. The launcher's store, kept across restarts, says
    whether an earlier incarnation claimed the save dir."""
    import torch.distributed as dist

    from colossal_llama.training.run_dir import claimed_before, job_store, record_claim

    store, save_dir = dist.HashStore(), tmp_path / "ckpt"
    assert not claimed_before(store, save_dir)
    record_claim(store, save_dir)
    assert claimed_before(store, save_dir) and not claimed_before(store, tmp_path / "other")
    assert job_store({}) is None and not claimed_before(None, save_dir)  # not under torchrun: never a restart


def test_a_save_dir_given_as_load_checkpoint_is_named_as_one(tmp_path):
    """It said "incomplete checkpoint (running_states.json missing)"."""
    save_dir = _earlier_run(tmp_path / "ckpt")
    with pytest.raises(UserInputError) as err:
        resolve_load_target(str(save_dir), tmp_path / "next")
    assert str(err.value) == (f"--load_checkpoint {save_dir}: a save dir, not a checkpoint; continue its run with "
                              f"--load_checkpoint latest --save_dir {save_dir}, or name its newest checkpoint: "
                              f"--load_checkpoint {save_dir / 'epoch-0_step-6'}")


# ------------------------------------------------------------------------------------------------ SFT review fixes
def test_a_lora_checkpoint_names_its_base_by_absolute_path_from_any_working_directory(tiny_llama, tmp_path,
                                                                                       monkeypatch):
    """--pretrained tiny_smol (relative) was recorded as typed, so inference run from another folder said the base
    'tiny_smol' "is not a model folder on this machine". A local folder is recorded resolved; a hub id as is."""
    from transformers import AutoModelForCausalLM

    from colossal_llama.model.lora_checkpoint import lora_base
    from colossal_llama.training.lora import _portable_base, apply_lora, save_trainable

    monkeypatch.chdir(tiny_llama.parent)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama.name)  # as train.py --pretrained model
    save_trainable(apply_lora(model, 4, 8, 0.0, ["q_proj"], train_embeddings=False), tmp_path / "modeling")
    config = json.loads((tmp_path / "modeling" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama.resolve())
    monkeypatch.chdir(tmp_path)
    assert lora_base(tmp_path / "modeling") == tiny_llama.resolve()
    assert _portable_base("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_sft_data_rendered_with_another_tokenizers_chat_template_is_refused(prepared_pretrain, tiny_llama):
    """Data prepared with --chat_template tokenizer renders tokenizer A's Jinja template; trained on --pretrained B
    (the same vocabulary: the fingerprints agree) it went silently, and inference then prompted with B's template.
    The manifest records the template's sha256 and training refuses another one, naming both tokenizers. A manifest
    from before the hash was recorded is not checked."""
    import dataclasses

    from transformers import AutoTokenizer

    from colossal_llama.dataset.chat_templates import chat_template_sha256, get_chat_template

    manifest_path = prepared_pretrain / "manifest.json"
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    block = get_chat_template("tokenizer", tok).to_manifest()
    assert block == {"name": "tokenizer", "system_message": None, "jinja_sha256": chat_template_sha256(tok)}
    manifest = dataclasses.replace(read_manifest(manifest_path), kind="sft", chat_template=block)
    check_manifest_against_model(manifest, manifest_path, tok, len(tok), 128, str(tiny_llama))  # its own template
    other = AutoTokenizer.from_pretrained(tiny_llama)
    other.chat_template = tok.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot")
    with pytest.raises(UserInputError) as err:
        check_manifest_against_model(manifest, manifest_path, other, len(tok), 128, "B")
    assert str(err.value) == (f"{manifest_path}: chat_template: data was rendered with the chat template of tokenizer "
                              f"{manifest.tokenizer_dir!r} (sha256 {block['jinja_sha256'][:12]}), and the tokenizer in "
                              f"--pretrained B has another one (sha256 {chat_template_sha256(other)[:12]}); prepare "
                              "the data with --tokenizer_dir B")
    older = dataclasses.replace(manifest, chat_template={"name": "tokenizer", "system_message": None})
    check_manifest_against_model(older, manifest_path, other, len(tok), 128, "B")


def test_sft_outputs_of_one_template_agree_whether_or_not_their_manifests_record_its_hash(tmp_path):
    """Data prepared before the template's hash was recorded, trained together with newer data of the same
    template, is one template; another name, system message or hash is another."""
    from colossal_llama.dataset.manifest import Manifest
    from colossal_llama.training.data import _check_agreement

    def manifest(template: dict) -> Manifest:
        return Manifest(kind="sft", tokenizer_dir="tok", tokenizer_fingerprint="f", vocab_size=10, max_length=8,
                        num_bins=1, seed=0, parts=[], chat_template=template)

    old, new = {"name": "tokenizer", "system_message": None}, {"name": "tokenizer", "system_message": None,
                                                               "jinja_sha256": "a" * 64}
    _check_agreement({tmp_path / "old": manifest(old), tmp_path / "new": manifest(new)})
    _check_agreement({tmp_path / "new": manifest(new), tmp_path / "old": manifest(old)})
    for other in ({**new, "jinja_sha256": "b" * 64}, {**old, "system_message": "Be brief."}):
        with pytest.raises(UserInputError, match="were prepared with different chat templates"):
            _check_agreement({tmp_path / "new": manifest(new), tmp_path / "other": manifest(other)})


def test_the_save_dir_lock_names_its_holder_and_a_dead_runs_record_is_replaced_with_a_warning(tmp_path, caplog):
    """One run per --save_dir, here in one process (flock locks an open file, not a process): the holder's record
    names it in a second run's refusal, a clean release clears it (the next run warns of nothing), and the record
    a killed run left is named in a warning and replaced whole."""
    import os
    import re

    from colossal_llama.training.run_dir import acquire_lock, release_lock

    save_dir = tmp_path / "ckpt"
    lock = acquire_lock(save_dir)
    holder = json.loads((save_dir / ".lock").read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(UserInputError, match=re.escape(f"--save_dir {save_dir}: another training run is using it: "
                                                       f"pid {os.getpid()} on host {holder['host']} (since ")):
        acquire_lock(save_dir)
    release_lock(lock)
    assert (save_dir / ".lock").read_text() == ""
    with caplog.at_level("WARNING"):
        release_lock(acquire_lock(save_dir))
    assert "took over" not in caplog.text
    dead = {"host": "a-login-node-with-a-long-name." + "x" * 60, "pid": 1, "started": 0}
    (save_dir / ".lock").write_text(json.dumps(dead))  # killed: the kernel dropped its flock, its record stayed
    with caplog.at_level("WARNING"):
        lock = acquire_lock(save_dir)
    assert f"took over the lock left by pid 1 on host {dead['host']}" in caplog.text
    assert json.loads((save_dir / ".lock").read_text())["pid"] == os.getpid()  # no tail of the longer record
    release_lock(lock)


def test_the_run_plan_is_written_under_plan_beside_the_flags_and_an_epoch_counts_its_dropped_tail(tmp_path):
    """train_config.json holds every flag at the top level and the plan under "plan" (where reports and the
    multi-process tests read it); an epoch is its full global batches plus the tail too small for one."""
    import dataclasses

    from colossal_llama.training.config import TrainConfig, build_parser
    from colossal_llama.training.plan import RunPlan, write_run_config

    cfg = TrainConfig(**vars(build_parser().parse_args(["--pretrained", "m", "--dataset", "d"])))
    plan = RunPlan(total_steps=10, steps_per_epoch=5, global_batch=8, dropped_per_epoch=3, world_size=2, dp_size=2,
                   plugin_class="TorchDDPPlugin", cpu_offload=False, tp_size=1, pp_size=1, sequence_parallelism=None,
                   sp_size=1, attn_implementation="sdpa", liger=False, loss="scored_chunks", loss_chunk_tokens=32,
                   num_parameters=1000, trainable_parameters=1000)
    assert plan.epoch_samples == 5 * 8 + 3
    path = tmp_path / "run" / "train_config.json"
    write_run_config(cfg, plan, path)
    written = json.loads(path.read_text())
    assert written.pop("plan") == dataclasses.asdict(plan)
    assert written == json.loads(json.dumps(dataclasses.asdict(cfg)))


def test_the_leftovers_removed_at_the_start_are_a_crashed_runs_not_what_this_runs_trash_is_deleting(
        tmp_path, monkeypatch):
    """``.tmp-*`` folders are half-written saves of a crashed run; the folders this run's --overwrite set aside
    (renamed to ``.tmp-deleting-*``, still being deleted) are not reported as such."""
    import threading

    from colossal_llama.training import trash as trash_module
    from colossal_llama.training.run_dir import remove_leftovers

    release = threading.Event()
    remove_tree = trash_module._remove_tree
    monkeypatch.setattr(trash_module, "_remove_tree", lambda path: (release.wait(30), remove_tree(path)))
    save_dir = tmp_path / "ckpt"
    (save_dir / ".tmp-epoch-0_step-9" / "modeling").mkdir(parents=True)
    (save_dir / "epoch-0_step-3").mkdir()
    trash = trash_module.Trash(".tmp-")
    trash.discard(save_dir / "epoch-0_step-3")  # --overwrite's deletion, going on in the background
    assert remove_leftovers(save_dir, trash) == [".tmp-epoch-0_step-9"]
    release.set()
    trash.wait()
    assert list(save_dir.iterdir()) == []


def test_a_torchrun_restart_of_a_job_that_stopped_on_a_signal_knows_the_signal():
    """The ranks that agreed to stop record the signal in the launcher's store (kept across restarts): a restart
    torchrun makes of the stopped job reads it and does not start again."""
    import torch.distributed as dist

    from colossal_llama.training.run_dir import record_stop, stopped_before

    store = dist.HashStore()
    assert stopped_before(store) is None and stopped_before(None) is None
    record_stop(store, 15)
    record_stop(None, 15)  # not under torchrun: nothing to record
    assert stopped_before(store) == 15


def test_a_checkpoint_is_named_after_the_epoch_of_its_last_step():
    """At an epoch's end the state already points at the next epoch's first sample; the checkpoint keeps the name
    of the epoch its last step was in (a 3-epoch run ends with epoch-2, not epoch-3)."""
    from colossal_llama.training.checkpoint import RunningState

    def name(epoch, step, sample_offset):
        return RunningState(epoch=epoch, step=step, sample_offset=sample_offset, global_batch=8, world_size=2).name

    assert name(0, 5, 40) == "epoch-0_step-5"
    assert name(1, 12, 0) == "epoch-0_step-12"  # the last step of epoch 0
    assert name(1, 14, 16) == "epoch-1_step-14"
    assert name(3, 36, 0) == "epoch-2_step-36"
    assert name(0, 0, 0) == "epoch-0_step-0"


def test_a_damaged_checkpoint_is_named_with_the_newest_older_complete_one(tmp_path):
    """The way on is the newest complete checkpoint older than the damaged one (not an older one still, nor a newer
    one), or, for the first, starting afresh."""
    from colossal_llama.training.checkpoint import verify_checkpoint

    for step in (2, 4, 6, 10):
        _checkpoint(tmp_path / f"epoch-0_step-{step}", step)  # their model.safetensors hold no safetensors
    _checkpoint(tmp_path / ".tmp-epoch-0_step-5", 5)  # a half-written save is no way on
    damaged, older = tmp_path / "epoch-0_step-6", tmp_path / "epoch-0_step-4"
    with pytest.raises(UserInputError) as err:
        verify_checkpoint(damaged)
    assert str(err.value).startswith(str(damaged / "modeling" / "model.safetensors"))
    assert str(err.value).endswith(f"checkpoint {damaged} is damaged; the newest older complete checkpoint is {older} "
                                   f"(pass --load_checkpoint {older})")
    with pytest.raises(UserInputError, match="no older complete checkpoint exists"):
        verify_checkpoint(tmp_path / "epoch-0_step-2")


def test_a_checkpoint_without_the_rng_state_of_every_rank_that_saved_it_is_named(tmp_path):
    """A copy that left out one rank's RNG state: the resume went on with a warning that the rank count changed."""
    from colossal_llama.training.checkpoint import verify_checkpoint

    checkpoint = tmp_path / "epoch-0_step-3"
    (checkpoint / "rng").mkdir(parents=True)
    (checkpoint / "running_states.json").write_text(json.dumps({"epoch": 0, "step": 3, "sample_offset": 12,
                                                                "global_batch": 4, "world_size": 3}))
    for rank in (0, 1):
        torch.save({"torch": torch.get_rng_state()}, checkpoint / "rng" / f"rank-{rank:05d}.pt")
    with pytest.raises(UserInputError) as err:
        verify_checkpoint(checkpoint)
    assert str(err.value).startswith(f"{checkpoint / 'rng' / 'rank-00002.pt'}: missing (the checkpoint was saved by "
                                     "3 ranks")
    torch.save({}, checkpoint / "rng" / "rank-00002.pt")
    verify_checkpoint(checkpoint)


def test_weights_of_a_model_with_another_vocabulary_are_refused_before_loading(tmp_path):
    """The base model given after a vocabulary expansion: same layers, another embedding size."""
    from colossal_llama.training.checkpoint import check_same_model

    shape = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 64, "num_hidden_layers": 2}
    for name, vocab in (("base", 49152), ("expanded", 49280), ("same", 49152)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**shape, "vocab_size": vocab}))
    with pytest.raises(UserInputError, match=r"its weights are of another model than --pretrained .*base "
                                             r"\(vocab_size 49280 vs 49152\)"):
        check_same_model(tmp_path / "expanded", str(tmp_path / "base"))
    check_same_model(tmp_path / "same", str(tmp_path / "base"))
    check_same_model(tmp_path / "expanded", "a/hub-id")  # no config.json to compare: the names are checked later


def test_keep_last_k_deletes_the_oldest_complete_checkpoints_and_counts_the_bytes_it_frees(tmp_path):
    from colossal_llama.training.checkpoint import Checkpointer, complete_checkpoints
    from colossal_llama.training.disk_space import tree_bytes
    from colossal_llama.training.trash import Trash

    for step in (3, 6, 9, 12):
        _checkpoint(tmp_path / f"epoch-0_step-{step}", step)
    freed = sum(tree_bytes(tmp_path / f"epoch-0_step-{step}") for step in (3, 6))
    trash = Trash(".tmp-")

    def rotate(keep_last_k):
        return Checkpointer(None, None, None, None, None, tmp_path, None, trash, None, keep_last_k=keep_last_k)._rotate()

    assert rotate(None) == 0 and len(complete_checkpoints(tmp_path)) == 4  # without --keep_last_k all are kept
    assert rotate(2) == freed
    trash.wait()
    assert [c.name for c in complete_checkpoints(tmp_path)] == ["epoch-0_step-9", "epoch-0_step-12"]
