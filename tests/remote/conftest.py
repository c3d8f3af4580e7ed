"""A real OpenSSH server on loopback for the remote tests: temporary host key, authorized key and config.

The server runs as the current user (root here), listens on 127.0.0.1 only, accepts that one key and
nothing else, and is stopped at the end of the module.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
NEEDED = ("ssh", "ssh-keygen", "tmux", "rsync", "git")


@dataclass(frozen=True)
class LoopbackSshd:
    port: int
    key: Path
    known_hosts: Path
    host_key_line: str
    root: Path

    def conn_args(self, known_hosts: Path | None = None) -> list[str]:
        """Connection arguments for every remote command; BatchMode: fail instead of prompting."""
        kh = known_hosts or self.known_hosts
        return [
            "127.0.0.1",
            str(self.port),
            "-i",
            str(self.key),
            "--known-hosts",
            str(kh),
            "-o",
            "BatchMode=yes",
        ]


def _missing_tools() -> list[str]:
    missing = [t for t in NEEDED if shutil.which(t) is None]
    return missing + ([SSHD] if not os.access(SSHD, os.X_OK) else [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "magnet-asr-test", "-f", str(path)], check=True
    )
    return path.with_suffix(".pub").read_text().strip()


def _config(root: Path, port: int) -> Path:
    config = root / "sshd_config"
    config.write_text(
        f"""Port {port}
ListenAddress 127.0.0.1
HostKey {root}/host_ed25519
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding no
X11Forwarding no
PrintMotd no
"""
    )
    return config


def _wait_listening(proc: subprocess.Popen, port: int, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {log.read_text()[-500:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("sshd did not start listening")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackSshd]:
    if not sys.platform.startswith("linux"):
        pytest.skip("the loopback sshd test uses a Linux OpenSSH server and /proc")
    missing = _missing_tools()
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/install_system_deps.sh installs them)")
    # Debian's sshd refuses to start without its privilege separation directory (made at boot normally).
    if not Path("/run/sshd").is_dir() and os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, parents=True)
    root = tmp_path_factory.mktemp("sshd")
    host_pub = _keygen(root / "host_ed25519")
    (root / "authorized_keys").write_text(_keygen(root / "client_ed25519") + "\n")
    port = _free_port()
    config = _config(root, port)
    check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"sshd cannot run here: {check.stderr.strip()}")
    host_key_line = f"[127.0.0.1]:{port} {' '.join(host_pub.split()[:2])}"
    (root / "known_hosts").write_text(host_key_line + "\n")
    log = root / "sshd.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=log_file)
    try:
        _wait_listening(proc, port, log)
        yield LoopbackSshd(port, root / "client_ed25519", root / "known_hosts", host_key_line, root)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tmux_socket() -> Iterator[str]:
    """A private tmux server for the test's sessions; killed afterwards, leaving others' tmux alone."""
    name = f"magnet-asr-test-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True)
