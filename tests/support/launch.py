"""Launching training under ``torchrun`` from tests: real processes, gloo, the colossalai CPU patches applied."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
TRAIN_ENTRY = REPO / "tests" / "support" / "train_entry.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(train_args: List[str], nproc: int = 2) -> List[str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), str(TRAIN_ENTRY), *train_args]


def worker_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """One thread per rank (2 ranks on 2 cores, and the same thread count keeps runs bitwise reproducible)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def run_training(train_args: List[str], log_path: Path, nproc: int = 2, env: Optional[Dict[str, str]] = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """Run to completion; stdout+stderr go to ``log_path`` (read it in assertion messages)."""
    with open(log_path, "w") as log:
        return subprocess.run(torchrun_command(train_args, nproc), stdout=log, stderr=subprocess.STDOUT,
                              env=worker_env(env), cwd=REPO, timeout=timeout)


def start_training(train_args: List[str], log_path: Path, nproc: int = 2,
                   env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """Start in its own process group, so :func:`kill_group` can SIGKILL torchrun and every rank at once."""
    log = open(log_path, "w")
    return subprocess.Popen(torchrun_command(train_args, nproc), stdout=log, stderr=subprocess.STDOUT,
                            env=worker_env(env), cwd=REPO, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """kill -9 the launcher and all ranks (no handler runs, no cleanup: a real crash)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


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
