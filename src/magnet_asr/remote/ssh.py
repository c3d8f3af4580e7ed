"""Talking to the remote machine through the system ``ssh`` and ``rsync``.

Every remote step is a small bash script sent on ssh's **stdin** (``bash -s``), never as an
argument: what travels on stdin is invisible to ``ps`` on both ends, which is how secrets reach
the remote without ever sitting on a command line.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Values of these local variables are forwarded to the remote run (only when set).
SECRET_NAMES: tuple[str, ...] = ("HF_TOKEN", "WANDB_API_KEY")

# Our remote scripts print their fatal errors as `magnet-asr-error: MESSAGE` on stderr; we show
# MESSAGE once, in the local one-line error, instead of echoing it too.
ERROR_MARK = "magnet-asr-error: "

# ssh exits with 255 when the connection itself failed (unreachable, refused, host key, auth).
SSH_CONNECTION_FAILED = 255

_INSTALL_HINTS = {"ssh": "openssh-client", "rsync": "rsync", "git": "git"}


class RemoteError(RuntimeError):
    """A one-line, user-facing failure of a remote step."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class SshTarget:
    """Where and how to connect: ``ssh -p PORT [-i KEY] USER@HOST``."""

    host: str
    port: int = 22
    user: str = "root"
    identity: str | None = None
    known_hosts: str | None = None
    accept_new_host_key: bool = False
    connect_timeout: int = 10
    options: tuple[str, ...] = field(default_factory=tuple)

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    @property
    def label(self) -> str:
        return f"{self.destination} port {self.port}"

    def ssh_options(self) -> list[str]:
        """Options shared by every ssh call and by rsync's ``-e`` transport."""
        opts = ["-p", str(self.port), "-o", f"ConnectTimeout={self.connect_timeout}"]
        # Notice a dead pod within about a minute instead of hanging on a silent TCP connection.
        opts += ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if self.identity:
            # IdentitiesOnly: an agent full of keys can otherwise exhaust the server's MaxAuthTries first.
            opts += ["-i", os.path.expanduser(self.identity), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            opts += ["-o", f"UserKnownHostsFile={_ssh_config_value(os.path.expanduser(self.known_hosts))}"]
        if self.accept_new_host_key:
            # Trust on first use, but still refuse a host whose key *changed* (unlike =no).
            opts += ["-o", "StrictHostKeyChecking=accept-new"]
        for option in self.options:
            opts += ["-o", option]
        return opts

    def ssh_argv(self, remote_command: str, tty: bool = False) -> list[str]:
        return ["ssh", *self.ssh_options(), "-t" if tty else "-T", self.destination, remote_command]

    def rsync_destination(self, remote_dir: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        return f"{self.user}@{host}:{remote_dir.rstrip('/')}/"


def _ssh_config_value(value: str) -> str:
    """ssh splits ``-o`` values on whitespace; quote paths that contain any."""
    return f'"{value}"' if any(c.isspace() for c in value) else value


def require_binary(name: str) -> str:
    """The full path of a local program, or a one-line error naming the package to install."""
    path = shutil.which(name)
    if path is None:
        hint = _INSTALL_HINTS.get(name, name)
        raise RemoteError(f"`{name}` was not found on PATH; install it (e.g. the `{hint}` package)")
    return path


def child_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for local ssh/rsync: without secrets, so no ``SendEnv`` rule can leak them."""
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if k not in SECRET_NAMES}
    if sys.platform == "darwin":
        # macOS sets LC_CTYPE=UTF-8, which its ssh_config forwards and Linux rejects (locale warnings).
        env = {k: v for k, v in env.items() if not k.startswith("LC_")}
    return env


def wrap_script(body: str) -> str:
    """Make a script safe to feed to ``bash -s``.

    bash reads a script from stdin piece by piece, so a command that reads stdin (apt, pip, ...)
    would swallow the rest of the script. Wrapping it in a function makes bash parse all of it first;
    the call then gets ``/dev/null`` as stdin.
    """
    return f"__magnet_asr_main() {{\n{body.rstrip()}\n}}\n__magnet_asr_main </dev/null\n"


def run_script(target: SshTarget, body: str, *, capture: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a bash script on the remote (sent on stdin).

    ``capture``: return stdout and stderr. Otherwise stream both to ours as they come (apt and pip
    take minutes), keeping stderr's last line for the one-line error message.
    """
    argv = target.ssh_argv("bash -s")
    if capture:
        return subprocess.run(
            argv, input=wrap_script(body), text=True, capture_output=True, env=child_env(), check=False
        )
    sys.stdout.flush()  # our own lines first, then the remote's
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    # Feed stdin from a thread: the remote may write stderr before it has read the whole script.
    feeder = threading.Thread(target=_feed, args=(proc, wrap_script(body)), daemon=True)
    feeder.start()
    tail = ""
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith(ERROR_MARK):
            tail = line
            continue
        sys.stderr.write(line)
        sys.stderr.flush()
        tail = line if line.strip() else tail
    feeder.join()
    return subprocess.CompletedProcess(argv, proc.wait(), stdout=None, stderr=tail)


def _feed(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(text)
        proc.stdin.close()
    except BrokenPipeError:  # ssh gave up (connection refused); its stderr says why
        pass


def run_checked(target: SshTarget, body: str, what: str, *, capture: bool = False) -> str:
    """Like :func:`run_script`, raising a one-line :class:`RemoteError` when the script fails."""
    result = run_script(target, body, capture=capture)
    if result.returncode != 0:
        raise RemoteError(failure_message(target, what, result), exit_code=result.returncode)
    return result.stdout or ""


def failure_message(target: SshTarget, what: str, result: subprocess.CompletedProcess[str]) -> str:
    """One line: the connection problem, or the remote script's own last error line."""
    detail = last_line(result.stderr or "")
    if result.returncode == SSH_CONNECTION_FAILED:
        if "host key verification failed" in detail.lower():
            detail += " (a new pod? pass --accept-new-host-key; a changed key? check known_hosts)"
        return f"cannot reach {target.label} over ssh: {detail or 'connection failed'}"
    detail = detail.removeprefix(ERROR_MARK)
    suffix = f": {detail}" if detail else ""
    return f"{what} failed on {target.host} (exit {result.returncode}){suffix}"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


@dataclass(frozen=True)
class RemoteInfo:
    """What a first, cheap connection tells us about the remote."""

    home: str
    tools: frozenset[str]

    def resolve(self, path: str) -> str:
        """An absolute remote path: ``~`` and relative paths are taken from the remote home."""
        if path == "~":
            return self.home
        if path.startswith("~/"):
            path = path[2:]
        return path if path.startswith("/") else f"{self.home.rstrip('/')}/{path}"

    def require(self, tool: str, hint: str) -> None:
        if tool not in self.tools:
            raise RemoteError(f"`{tool}` is not installed on the remote; {hint}")


_PROBE_TOOLS = ("bash", "tmux", "rsync", "python3", "apt-get")


def probe(target: SshTarget) -> RemoteInfo:
    """Check that ssh works (clear error if not) and learn the remote home and tools."""
    require_binary("ssh")
    tools = " ".join(_PROBE_TOOLS)
    script = (
        'echo "magnet-asr-probe home=$HOME"\n'
        f'for t in {tools}; do command -v "$t" >/dev/null 2>&1 && echo "magnet-asr-probe have=$t"; done\n'
        "exit 0\n"
    )
    # `sh -s`, not bash: the probe must work even where bash is missing, so we can say so.
    result = subprocess.run(
        target.ssh_argv("sh -s"), input=script, text=True, capture_output=True, env=child_env(), check=False
    )
    if result.returncode != 0:
        raise RemoteError(failure_message(target, "connection check", result), exit_code=result.returncode)
    return parse_probe(result.stdout)


def parse_probe(stdout: str) -> RemoteInfo:
    values = [line.split(" ", 1)[1] for line in stdout.splitlines() if line.startswith("magnet-asr-probe ")]
    home = next((v[5:] for v in values if v.startswith("home=")), "")
    if not home:
        raise RemoteError("the remote shell did not answer the connection check (is it a POSIX shell?)")
    info = RemoteInfo(home=home, tools=frozenset(v[5:] for v in values if v.startswith("have=")))
    info.require("bash", "the remote scripts need bash")
    return info


def rsync_argv(target: SshTarget, remote_dir: str) -> list[str]:
    """Copy the NUL-separated file list read from stdin into ``remote_dir``.

    Only short options every rsync understands, so macOS's openrsync (macOS 15+) works too:
    ``-l`` links, ``-p`` permissions, ``-t`` times, ``-z`` compression, ``-0`` NUL list. No ``-a``:
    it would also copy the local owner, meaningless on the pod.
    """
    transport = shlex.join(["ssh", *target.ssh_options(), "-T"])
    return [
        "rsync",
        "-lptz",
        "-0",
        "--files-from=-",
        "-e",
        transport,
        "./",
        target.rsync_destination(remote_dir),
    ]


def sync_files(target: SshTarget, source: Path, files: Sequence[str], remote_dir: str) -> None:
    """rsync ``files`` (relative to ``source``) to ``remote_dir`` on the target."""
    require_binary("rsync")
    listing = "".join(f"{name}\0" for name in files).encode()
    result = subprocess.run(
        rsync_argv(target, remote_dir), input=listing, cwd=source, env=child_env(), capture_output=True
    )
    if result.returncode != 0:
        # rsync's first line names the cause (ssh refused, rsync missing); its last is a generic code.
        detail = first_line(result.stderr.decode(errors="replace")) or "no error output"
        raise RemoteError(f"rsync to {target.label} failed (exit {result.returncode}): {detail}")
