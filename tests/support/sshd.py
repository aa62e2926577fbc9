"""A private OpenSSH server on loopback addresses, so ``colossalai run --hostfile`` reaches "other nodes" over ssh.

Everything lives in one temporary folder: the server's config, host key, authorized key and log, and a client
``HOME`` whose ``.ssh/config`` points fabric/paramiko (what ``colossalai run`` uses) at the client key. The user's
own ``~/.ssh`` and the system's sshd are never touched. The server listens on a non-standard port on each of the
given addresses; the launcher gets that port with ``--ssh-port``.

    server = start_sshd(tmp_dir, ("127.0.0.2", "127.0.0.3"))
    ... launch with env HOME=server.client_home, colossalai run --ssh-port server.port ...
    server.sessions()  # [Session("127.0.0.2", "root", True), ...]: public-key logins, the address each dialled
    server.stop()

``sshd`` needs root here (it switches to the logged-in user; as another user it could only log in as itself,
which is also supported, with ``UsePAM no``).
"""
from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import psutil

from tests.support.launch import kill_processes

SSHD = Path("/usr/sbin/sshd")


def sshd_missing() -> Optional[str]:
    """Why an ssh server cannot be started here (None when it can)."""
    if not SSHD.is_file():
        return f"{SSHD} not found (Debian: apt-get install openssh-server; scripts/test.sh does it when root)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen not found (Debian: apt-get install openssh-client)"
    return None


def _free_port(addresses: Sequence[str]) -> int:
    """A port free on every address (bound on the first, checked on the others)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((addresses[0], 0))
            port = first.getsockname()[1]
            try:
                for addr in addresses[1:]:
                    with socket.socket() as other:
                        other.bind((addr, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no port free on all of {addresses}")


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


@dataclass(frozen=True)
class Session:
    address: str  # the server address the client dialled (which "node")
    user: str
    ran_command: bool


@dataclass
class SshServer:
    root: Path
    addresses: Tuple[str, ...]
    port: int
    user: str
    client_home: Path  # HOME for the launcher: .ssh/config names the client key and user for these addresses
    log: Path
    proc: subprocess.Popen

    def sessions(self) -> List["Session"]:
        """Every accepted public-key login, in order: the address it dialled, the user, whether it ran a command.

        On loopback the client's source address is 127.0.0.1 whatever address it dialled, so the dialled address
        comes from sshd's "Connection from C port P on A port N" line (LogLevel VERBOSE), matched to the
        "Accepted publickey for U from C port P" and "Starting session: command for U from C port P" lines by the
        client port P.
        """
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        dialled = {m["cport"]: m["addr"] for m in re.finditer(
            r"Connection from \S+ port (?P<cport>\d+) on (?P<addr>\S+) port \d+", text)}
        commands = {m["cport"] for m in re.finditer(r"Starting session: command for \S+ from \S+ port (?P<cport>\d+)",
                                                    text)}
        return [Session(dialled.get(m["cport"], "?"), m["user"], m["cport"] in commands) for m in re.finditer(
            r"Accepted publickey for (?P<user>\S+) from \S+ port (?P<cport>\d+)", text)]

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until every address answers with an SSH banner (or fail with sshd's log)."""
        deadline = time.monotonic() + timeout
        pending = list(self.addresses)
        while pending and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection((pending[0], self.port), timeout=2) as conn:
                    if conn.recv(64).startswith(b"SSH-"):
                        pending.pop(0)
                        continue
            except OSError:
                pass
            time.sleep(0.1)
        if pending:
            raise RuntimeError(f"sshd not answering on {pending} port {self.port} after {timeout} s:\n"
                               f"{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else "(no sshd log)"

    def kill_sessions(self) -> None:
        """SIGKILL every session and the commands started in it (a launcher killed on our side leaves them running:
        without a terminal, ssh does not hang up the remote command); the server keeps listening."""
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        kill_processes(tree, timeout=10)

    def stop(self) -> None:
        """Stop the server and everything still running under it."""
        self.kill_sessions()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_sshd(root: Path, addresses: Sequence[str] = ("127.0.0.2", "127.0.0.3")) -> SshServer:
    """Write a config, make host and client keys, start ``sshd -D`` on ``addresses`` and wait until it answers."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    host_key, client_key = root / "ssh_host_ed25519_key", root / "client_ed25519"
    _keygen(host_key)
    _keygen(client_key)
    authorized = root / "authorized_keys"
    shutil.copyfile(client_key.with_suffix(".pub"), authorized)
    authorized.chmod(0o600)
    port = _free_port(addresses)
    user = getpass.getuser()
    log = root / "sshd.log"
    config = root / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}",
        *(f"ListenAddress {addr}" for addr in addresses),
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized}",
        f"PidFile {root / 'sshd.pid'}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "StrictModes no",  # the tmp folders' modes are not sshd's business here
        "UsePAM no",
        "PrintMotd no",
        "LogLevel VERBOSE",  # logs the address each connection came in on
        "MaxStartups 100",
        "",
    ]))
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir (absent in containers)
    # -D: stay in the foreground (a child of this process); -e/-E: log to a file, not syslog.
    proc = subprocess.Popen([str(SSHD), "-D", "-f", str(config), "-E", str(log)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)

    client_home = root / "client-home"
    ssh_dir = client_home / ".ssh"
    ssh_dir.mkdir(parents=True)
    ssh_dir.chmod(0o700)
    (ssh_dir / "config").write_text(
        f"Host {' '.join(addresses)}\n"
        f"    User {user}\n"
        f"    IdentityFile {client_key}\n"
        f"    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {root / 'known_hosts'}\n"
        f"    StrictHostKeyChecking no\n")
    server = SshServer(root, tuple(addresses), port, user, client_home, log, proc)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server
