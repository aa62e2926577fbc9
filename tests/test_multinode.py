"""Multi-node for real: ``colossalai run --hostfile`` reaches two "nodes" over ssh and trains like one node.

One machine plays two nodes: a private sshd (``tests/support/sshd.py``) listens on the loopback addresses
127.0.0.2 and 127.0.0.3, which colossalai's launcher does not treat as localhost, so it connects to each over ssh
(fabric/paramiko, ``--ssh-port``) and runs ``torchrun --nnodes 2 --node_rank R`` there, in a fresh shell, in the
same folder, with the launcher's environment exported. One rank per node, gloo over loopback.

Specification:
- ``colossalai run --nproc_per_node 1 --hostfile H --master_addr 127.0.0.2 train.py`` with ``H`` listing both
  addresses trains 3 steps whose every ``losses.jsonl`` record (loss, lr, grad norm, tokens) equals, float for
  float, that of a 2-rank single-node ``torchrun`` run with the same flags;
- each machine flushes its writes (syncfs) before rank 0 publishes a checkpoint or the final model, and says so
  (2 machines); a one-machine run has no such round;
- sshd logged exactly one public-key login that ran a command on each address (no localhost shortcut);
- ``train.example.sh`` with ``HOSTFILE=H SSH_PORT=P`` does the same through its own flags (``H`` may carry
  ``#`` comments and blank lines, which colossalai's own parser would take for host names).

Needs ``/usr/sbin/sshd`` (Debian ``openssh-server``; ``scripts/test.sh`` installs it when root): skipped without
it, except under CI (``CI=true``), where a missing sshd fails.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Dict, List

import psutil
import pytest

from colossal_llama.training.checkpoint import FINAL_MODEL, complete_checkpoints
from colossal_llama.training.metrics import read_loss_log
from tests.support.launch import free_port, kill_processes, tail
from tests.support.require_data import in_ci
from tests.support.sshd import SshServer, sshd_missing, start_sshd
from tests.support.train_runs import DP2_BATCH, LOSS_CHUNK, train_args, train_ok

REPO = Path(__file__).resolve().parents[1]
NODES = ("127.0.0.2", "127.0.0.3")
STEPS = 3
RUN_MARK = "CL_TEST_MULTINODE_RUN"  # set for the launcher; colossalai run exports it to every node's command
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> SshServer:
    reason = sshd_missing()
    if reason:
        if in_ci():
            pytest.fail(f"CI=true but no ssh server for the multi-node test: {reason}")
        pytest.skip(f"no ssh server for the multi-node test: {reason}")
    server = start_sshd(tmp_path_factory.mktemp("sshd"), NODES)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hostfile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hosts") / "hostfile"
    path.write_text("\n".join(NODES) + "\n")
    return path


def run_args(model: Path, data: Path, save_dir: Path) -> List[str]:
    """The shared test flags (fp32, lr 2e-3, warm-up 2, global batch 4 = 2 ranks x 1 x 2) for a 3-step run.
    The LR schedule depends on the total step count, so both sides of a comparison train exactly 3 steps."""
    return train_args(model, data, save_dir, "--plugin", "ddp", *DP2_BATCH, "--max_steps", str(STEPS),
                      "--save_interval", "2")


@pytest.fixture(scope="module")
def single_node(tmp_path_factory, tiny_llama, prepared_pretrain) -> Path:
    """The reference: the same flags, one node, 2 ranks under torchrun."""
    root = tmp_path_factory.mktemp("single-node")
    train_ok(root, "single-node", run_args(tiny_llama, prepared_pretrain, root / "run"))
    return root / "run"


def launcher_env(server: SshServer, extra: Dict[str, str] = None) -> Dict[str, str]:
    """What ``colossalai run`` gets, and exports word for word into every node's shell.

    A small explicit environment: the launcher writes ``export K="V"`` for each variable without quoting, so a
    value with a quote or ``$`` (or a name like ``BASH_FUNC_f%%``) from the test's own environment could break
    the remote command. HOME is the server's client home, whose ``.ssh/config`` names the key and user.
    """
    env = {k: os.environ[k] for k in ("PYTHONPATH", "LANG", "LC_ALL", "TMPDIR") if os.environ.get(k)}
    env.update({
        "HOME": str(server.client_home),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def kill_marked(mark: str) -> List[int]:
    """SIGKILL every process whose environment carries ``RUN_MARK=mark``: the launcher, and what it started here
    and over ssh. A killed launcher does not stop the remote side (no terminal: ssh does not hang up the remote
    command, whose torchrun is then re-parented away from sshd), so processes are found by the inherited mark."""
    victims = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(RUN_MARK) == mark:
                victims.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    kill_processes(victims)
    return [p.pid for p in victims]


def launch(cmd: List[str], env: Dict[str, str], log: Path, server: SshServer, timeout: float = 300) -> int:
    """Run the launcher from the repo root; when it returns (or times out) nothing it started is left running."""
    mark = uuid.uuid4().hex
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env={**env, RUN_MARK: mark}, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{cmd[0]} still running after {timeout} s:\n{tail(log)}\nsshd:\n{server.log_tail()}")
    finally:
        kill_marked(mark)


def assert_same_records(reference: Path, got: Path) -> None:
    ref, run = read_loss_log(reference / "losses.jsonl"), read_loss_log(got / "losses.jsonl")
    assert [r["step"] for r in run] == list(range(1, STEPS + 1)), run
    assert run == ref  # json keeps repr precision: float-for-float equality


def assert_one_login_per_node(server: SshServer, since: int) -> None:
    sessions = server.sessions()[since:]
    assert sorted(s.address for s in sessions) == sorted(NODES), (sessions, server.log_tail())
    assert all(s.ran_command and s.user == server.user for s in sessions), (sessions, server.log_tail())


def test_hostfile_launch_over_ssh_matches_single_node(tmp_path, sshd, hostfile, single_node, tiny_llama,
                                                      prepared_pretrain):
    save_dir = tmp_path / "run"
    colossalai = Path(sys.executable).with_name("colossalai")
    cmd = [str(colossalai), "run", "--nproc_per_node", "1", "--hostfile", str(hostfile),
           "--master_addr", NODES[0], "--master_port", str(free_port()), "--ssh-port", str(sshd.port),
           "train.py", *run_args(tiny_llama, prepared_pretrain, save_dir),
           "--config_file", str(tmp_path / "config.json")]
    before = len(sshd.sessions())
    rc = launch(cmd, launcher_env(sshd), tmp_path / "launch.log", sshd)
    assert rc == 0, f"colossalai run failed (rc {rc}):\n{tail(tmp_path / 'launch.log')}\nsshd:\n{sshd.log_tail()}"
    assert_one_login_per_node(sshd, before)
    plan = json.loads((tmp_path / "config.json").read_text())["plan"]
    assert (plan["dp_size"], plan["global_batch"]) == (2, 4), plan
    assert_same_records(single_node, save_dir)
    # each machine flushed its own writes before rank 0 published (on a shared filesystem rank 0's fsync does
    # not reach the other machine's cache); one machine needs no such round
    log = (tmp_path / "launch.log").read_text()
    saved = [c.name for c in complete_checkpoints(save_dir)]
    assert saved == ["epoch-0_step-2", "epoch-0_step-3"], saved  # every 2 steps and at the end
    for name in (*saved, FINAL_MODEL):
        assert f"{name}: 2 machines flushed their writes to the filesystem (syncfs) in " in log, log[-3000:]
    assert "syncfs" not in (single_node.parent / "single-node.log").read_text()


def test_a_crash_on_one_machine_restarts_both_from_the_newest_checkpoint(tmp_path, sshd, hostfile, single_node,
                                                                        tiny_llama, prepared_pretrain):
    """torchrun --max_restarts across machines (``colossalai run --extra_launch_args max_restarts=1``): the rank on
    the second machine is killed (SIGKILL) after step 3, before that step's checkpoint; each machine's torchrun
    starts its own rank again, and both resume from checkpoint 2 to the end, equal to the single-node run."""
    save_dir = tmp_path / "run"
    colossalai = Path(sys.executable).with_name("colossalai")
    cmd = [str(colossalai), "run", "--nproc_per_node", "1", "--hostfile", str(hostfile),
           "--master_addr", NODES[0], "--master_port", str(free_port()), "--ssh-port", str(sshd.port),
           "--extra_launch_args", "max_restarts=1", str(REPO / "tests" / "support" / "train_entry.py"),
           *run_args(tiny_llama, prepared_pretrain, save_dir), "--load_checkpoint", "latest"]
    rc = launch(cmd, launcher_env(sshd, {"CL_TEST_DIE_AT_STEP": str(STEPS)}), tmp_path / "launch.log", sshd)
    log = (tmp_path / "launch.log").read_text(errors="replace")
    assert rc == 0, f"colossalai run failed (rc {rc}):\n{tail(tmp_path / 'launch.log')}\nsshd:\n{sshd.log_tail()}"
    assert re.search(r"failed \(exitcode: -9\) local_rank: 0", log), log[-3000:]  # the rank on machine 2 died
    assert "dropped 1 records after step 2 (steps redone after resume)" in log, log[-3000:]
    assert f"resumed from {save_dir / 'epoch-0_step-2'}" in log, log[-3000:]
    assert_same_records(single_node, save_dir)


def test_train_example_sh_hostfile_over_ssh(tmp_path, sshd, single_node, tiny_llama, prepared_pretrain):
    save_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"  # comments and blank lines: train.example.sh strips them for colossalai
    hostfile.write_text(f"# two loopback nodes, one sshd\n{NODES[0]}\n\n{NODES[1]}  # the second node\n")
    # train.example.sh's knobs set to the reference's flags (it always adds --grad_clip 1.0 --weight_decay 0.1,
    # --tp 1 --zero_stage 1, the defaults the reference runs with).
    env = launcher_env(sshd, {
        "HOSTFILE": str(hostfile), "SSH_PORT": str(sshd.port), "MASTER_PORT": str(free_port()), "NPROC": "1",
        "PRETRAINED": str(tiny_llama), "DATASET": str(prepared_pretrain / "arrow"), "SAVE_DIR": str(save_dir),
        "PLUGIN": "ddp", "BATCH_SIZE": "1", "ACCUMULATION_STEPS": "2", "MAX_LENGTH": "128", "LR": "2e-3",
        "MAX_STEPS": str(STEPS), "MIXED_PRECISION": "fp32",
        "EXTRA_ARGS": f"--warmup_steps 2 --log_interval 4 --loss_chunk_tokens {LOSS_CHUNK}",
    })
    before = len(sshd.sessions())
    rc = launch(["bash", str(REPO / "train.example.sh")], env, tmp_path / "launch.log", sshd)
    assert rc == 0, f"train.example.sh failed (rc {rc}):\n{tail(tmp_path / 'launch.log')}\nsshd:\n{sshd.log_tail()}"
    assert_one_login_per_node(sshd, before)
    plan = json.loads((save_dir / "config.json").read_text())["plan"]
    assert (plan["dp_size"], plan["global_batch"]) == (2, 4), plan
    assert_same_records(single_node, save_dir)
