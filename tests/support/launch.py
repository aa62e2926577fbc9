"""Launching training under ``torchrun`` from tests: real processes, gloo, the colossalai CPU patches applied."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil

REPO = Path(__file__).resolve().parents[2]
TRAIN_ENTRY = REPO / "tests" / "support" / "train_entry.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(args: List[str], nproc: int = 2, entry: Path = TRAIN_ENTRY,
                     launcher_args: Sequence[str] = ()) -> List[str]:
    """``entry args`` on ``nproc`` local ranks (default entry: train.py with the colossalai CPU patches);
    ``launcher_args``: torchrun's own options (e.g. ``--max_restarts 1``)."""
    # torchrun's module, not its console script: an image may keep python and its scripts in different folders
    # a rendezvous endpoint replaces the static master address (an explicit one would override its stores)
    master = [] if "--rdzv_endpoint" in launcher_args else ["--master_addr", "127.0.0.1", "--master_port",
                                                              str(free_port())]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *master, *launcher_args,
            str(entry), *args]


def worker_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """One thread per rank (2 ranks on 2 cores, and the same thread count keeps runs bitwise reproducible)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def run_training(train_args: List[str], log_path: Path, nproc: int = 2, env: Optional[Dict[str, str]] = None,
                 timeout: float = 300, launcher_args: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Run to completion; stdout+stderr go to ``log_path`` (read it in assertion messages)."""
    with open(log_path, "w") as log:
        return subprocess.run(torchrun_command(train_args, nproc, launcher_args=launcher_args), stdout=log,
                              stderr=subprocess.STDOUT, env=worker_env(env), cwd=REPO, timeout=timeout)


def start_training(train_args: List[str], log_path: Path, nproc: int = 2,
                   env: Optional[Dict[str, str]] = None, launcher_args: Sequence[str] = ()) -> subprocess.Popen:
    """Start torchrun (in a session of its own) and return at once; see :func:`kill_launcher_and_ranks`."""
    log = open(log_path, "w")
    return subprocess.Popen(torchrun_command(train_args, nproc, launcher_args=launcher_args), stdout=log,
                            stderr=subprocess.STDOUT,
                            env=worker_env(env), cwd=REPO, start_new_session=True)


def rank_processes(proc: subprocess.Popen) -> List[psutil.Process]:
    """The ranks torchrun started (its child processes running the training entry point)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for child in children:
        try:
            if any(str(TRAIN_ENTRY) in part for part in child.cmdline()):
                ranks.append(child)
        except psutil.NoSuchProcess:
            pass
    return ranks


def alive(processes: List[psutil.Process]) -> List[psutil.Process]:
    """Those still running (a zombie, dead but not yet reaped, is not running)."""
    running = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            pass
    return running


def kill_processes(processes: List[psutil.Process], timeout: float = 30) -> List[psutil.Process]:
    """SIGKILL each (gone ones are fine) and wait for them; returns those still alive after ``timeout``."""
    for victim in processes:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    _gone, still = psutil.wait_procs(processes, timeout=timeout)
    return alive(still)


def kill_launcher_and_ranks(proc: subprocess.Popen, expected_ranks: int = 2) -> List[int]:
    """kill -9 torchrun *and* every rank (no handler runs, no cleanup: a real crash), then make sure they are gone.

    torchrun starts each rank in a session of its own, so killing the launcher's process group would leave the
    ranks training; they are found as the launcher's children and killed by pid. Returns the rank pids.
    """
    ranks = rank_processes(proc)
    if len(ranks) != expected_ranks:
        raise AssertionError(f"expected {expected_ranks} live ranks under torchrun {proc.pid}, found "
                             f"{[r.pid for r in ranks]}")
    survivors = kill_processes([psutil.Process(proc.pid), *ranks])
    proc.wait(timeout=60)
    if survivors:
        raise AssertionError(f"{[p.pid for p in survivors]} survived kill -9")
    return [r.pid for r in ranks]


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    """Poll until ``path`` has at least ``count`` lines (or the process ended); returns the lines seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = len(path.read_text().splitlines()) if path.is_file() else 0
        if lines >= count or proc.poll() is not None:
            return lines
        time.sleep(0.05)
    raise TimeoutError(f"{path}: fewer than {count} lines after {timeout} s")


def tail(path: Path, chars: int = 4000) -> str:
    text = Path(path).read_text(errors="replace") if Path(path).is_file() else "(no log)"
    return text[-chars:]
