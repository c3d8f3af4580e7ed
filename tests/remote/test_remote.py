"""The remote workflow end to end against a real sshd on loopback: deploy (sync), start, attach.

Runs the three scripts in ``scripts/`` as subprocesses, exactly as a user would, with a secret in
their environment, and checks that the secret reaches the remote run but never a synced file, the
remote log, the run script or any process's command line.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import LoopbackSshd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
SECRET = f"hf_sekrit{uuid.uuid4().hex}"
WANDB_SECRET = f"wandb{uuid.uuid4().hex}"
REMOTE_COMMAND = (
    "echo hello-remote; "
    'test -n "$HF_TOKEN" && echo token-present; '
    'test -n "$WANDB_API_KEY" && echo wandb-present; '
    'echo "hf_home=$HF_HOME transfer=$HF_HUB_ENABLE_HF_TRANSFER"; '
    "sleep 3; echo done-remote"
)


def run_script(
    name: str, *args: str, secrets: bool = True, path: str | None = None
) -> subprocess.CompletedProcess:
    """One of scripts/*.py as a user runs it; secrets come only through the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "WANDB_API_KEY")}
    if secrets:
        env.update(HF_TOKEN=SECRET, WANDB_API_KEY=WANDB_SECRET)
    if path is not None:
        env["PATH"] = path
    argv = [sys.executable, str(REPO / "scripts" / name), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small git checkout: tracked files, plus an untracked .env and an ignored file holding the secret."""
    root = tmp_path_factory.mktemp("project")
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "pkg"\nversion = "0"\n')
    (root / "src" / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (root / "configs").mkdir()
    (root / "configs" / "a b.yaml").write_text("name: spaced\n")
    (root / ".gitignore").write_text("runs/\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "."], check=True)
    (root / ".env").write_text(f"HF_TOKEN={SECRET}\n")
    (root / "runs").mkdir()
    (root / "runs" / "secret.txt").write_text(SECRET)
    return root


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("remote")
    return {
        "dir": base / "workspace" / "magnet-asr",
        "state": base / "home" / ".magnet-asr",
        "cache": base / "cache",
    }


def remote_args(sshd: LoopbackSshd, remote: dict[str, Path], tmux_socket: str | None = None) -> list[str]:
    args = [*sshd.conn_args(), "--remote-dir", str(remote["dir"]), "--state-dir", str(remote["state"])]
    return args + (["--tmux-socket", tmux_socket] if tmux_socket else [])


def wait_for(path: Path, text: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared in {path}: {content!r}")


def command_lines_with(needle: str) -> list[str]:
    """Command lines of all processes on this machine (the 'remote' too) that contain ``needle``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue  # the process ended meanwhile
        if needle.encode() in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_deploy_start_attach(
    sshd: LoopbackSshd, tmux_socket: str, project: Path, remote: dict[str, Path]
) -> None:
    deployed = run_script(
        "deploy_runpod.py",
        *remote_args(sshd, remote),
        "--source",
        str(project),
        "--skip-setup",
        "--skip-deps",
    )
    assert deployed.returncode == 0, deployed.stderr
    synced = sorted(str(p.relative_to(remote["dir"])) for p in remote["dir"].rglob("*") if p.is_file())
    assert synced == [".gitignore", "configs/a b.yaml", "pyproject.toml", "src/pkg/__init__.py"]
    assert (remote["dir"] / "src/pkg/__init__.py").read_text() == "VALUE = 1\n"

    session = "smoke"
    started = run_script(
        "start_remote_training.py",
        *remote_args(sshd, remote, tmux_socket),
        "--cache-dir",
        str(remote["cache"]),
        "--session-name",
        session,
        "--no-attach",
        "--command",
        REMOTE_COMMAND,
    )
    assert started.returncode == 0, started.stderr
    assert "HF_TOKEN" in started.stdout and SECRET not in started.stdout + started.stderr
    log = remote["dir"] / "logs" / f"{session}.log"
    wait_for(log, "wandb-present")
    # The command is sleeping now, with the secrets in its environment: none on any command line.
    assert command_lines_with(SECRET) == [] and command_lines_with(WANDB_SECRET) == []

    listed = run_script("attach_remote_session.py", *remote_args(sshd, remote, tmux_socket), "--list")
    assert listed.returncode == 0, listed.stderr
    assert session in listed.stdout

    logs = run_script(
        "attach_remote_session.py", *remote_args(sshd, remote, tmux_socket), "--logs", "-n", "20"
    )
    assert logs.returncode == 0, logs.stderr
    for expected in (
        "hello-remote",
        "token-present",
        "wandb-present",
        f"hf_home={remote['cache']}/huggingface",
    ):
        assert expected in logs.stdout

    content = wait_for(log, "finished with exit status 0")
    assert "done-remote" in content
    assert SECRET not in content and WANDB_SECRET not in content
    assert files_containing(remote["dir"], SECRET) == []
    secrets_file = remote["state"] / "secrets.env"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert SECRET in secrets_file.read_text()
    assert files_containing(remote["state"], SECRET) == [secrets_file]
    assert files_containing(project, SECRET) == [project / ".env", project / "runs" / "secret.txt"]

    again = run_script(
        "start_remote_training.py",
        *remote_args(sshd, remote, tmux_socket),
        "--session-name",
        session,
        "--no-attach",
    )
    assert again.returncode != 0 and "already running" in again.stderr


def test_start_without_secrets_removes_the_old_file(
    sshd: LoopbackSshd, tmux_socket: str, project: Path, remote: dict[str, Path]
) -> None:
    remote["dir"].mkdir(parents=True, exist_ok=True)
    args = [*remote_args(sshd, remote, tmux_socket), "--session-name", "nosecret", "--no-attach"]
    started = run_script(
        "start_remote_training.py", *args, "--command", 'test -z "$HF_TOKEN" && echo no-token', secrets=False
    )
    assert started.returncode == 0, started.stderr
    assert not (remote["state"] / "secrets.env").exists()
    wait_for(remote["dir"] / "logs" / "nosecret.log", "no-token")
    logs = run_script(
        "attach_remote_session.py", *remote_args(sshd, remote, tmux_socket), "--logs", "-s", "nosecret"
    )
    assert "no-token" in logs.stdout


def test_setup_is_a_no_op_when_tmux_and_rsync_are_there(sshd: LoopbackSshd, remote: dict[str, Path]) -> None:
    result = run_script("deploy_runpod.py", *remote_args(sshd, remote), "--skip-sync", "--skip-deps")
    assert result.returncode == 0, result.stderr
    assert "already installed" in result.stdout


def test_unknown_host_key_is_refused_unless_accepted(sshd: LoopbackSshd, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.touch()
    args = [*sshd.conn_args(known_hosts), "--tmux-socket", "unused", "--list"]
    refused = run_script("attach_remote_session.py", *args)
    assert refused.returncode == 255
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "Host key verification failed" in refused.stderr and "--accept-new-host-key" in refused.stderr

    accepted = run_script("attach_remote_session.py", *args, "--accept-new-host-key")
    assert accepted.returncode == 0, accepted.stderr
    assert "no tmux sessions" in accepted.stdout
    assert sshd.host_key_line.split()[2] in known_hosts.read_text()


def test_unreachable_host_is_one_line(sshd: LoopbackSshd, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # bound but not listening: connections are refused
        args = ["127.0.0.1", str(closed_port), "-o", "BatchMode=yes", "--list"]
        result = run_script("attach_remote_session.py", *args)
    assert result.returncode == 255
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach root@127.0.0.1" in lines[0] and "refused" in lines[0], lines


def test_missing_ssh_binary_is_one_line(tmp_path: Path) -> None:
    result = run_script("attach_remote_session.py", "127.0.0.1", "22", "--list", path=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "magnet-asr remote attach: error: `ssh` was not found on PATH; install it (e.g. the `openssh-client` package)"
    )


@pytest.mark.skipif(
    shutil.which("script") is None, reason="needs `script` (util-linux) for a pseudo-terminal"
)
def test_start_attaches_under_a_terminal(
    sshd: LoopbackSshd, tmux_socket: str, remote: dict[str, Path]
) -> None:
    """Without --no-attach, start attaches (ssh -t + tmux attach); detaching returns 0."""
    remote["dir"].mkdir(parents=True, exist_ok=True)
    start = [
        sys.executable,
        str(REPO / "scripts" / "start_remote_training.py"),
        *remote_args(sshd, remote, tmux_socket),
    ]
    start += ["--session-name", "tty", "--command", "echo in-tty; sleep 60"]
    # `script` runs the command on a pseudo-terminal, as if typed in a terminal.
    proc = subprocess.Popen(
        ["script", "-qfec", shlex.join(start), "/dev/null"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    tmux = ["tmux", "-L", tmux_socket]
    try:
        deadline = time.monotonic() + 20
        while not subprocess.run([*tmux, "list-clients", "-t", "tty"], capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline and proc.poll() is None, "start never attached"
            time.sleep(0.1)
        subprocess.run([*tmux, "detach-client", "-s", "tty"], check=True)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
        subprocess.run([*tmux, "kill-session", "-t", "tty"], capture_output=True)
    assert proc.returncode == 0, out.decode(errors="replace")
    assert b"detached (from session tty)" in out


def test_attach_without_a_terminal_says_so(
    sshd: LoopbackSshd, tmux_socket: str, remote: dict[str, Path]
) -> None:
    result = run_script("attach_remote_session.py", *remote_args(sshd, remote, tmux_socket), "-s", "smoke")
    assert result.returncode == 2
    assert "attaching needs a terminal" in result.stderr
