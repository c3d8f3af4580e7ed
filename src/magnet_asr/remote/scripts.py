"""The bash scripts run on the remote, built as text (pure functions: easy to read and to test).

Every value that comes from the user goes through :func:`shlex.quote`; paths are absolute
(resolved against the remote home beforehand), so no script depends on the remote's working directory.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from magnet_asr.remote.ssh import SECRET_NAMES, RemoteInfo

q = shlex.quote

DEFAULT_REMOTE_DIR = "/workspace/magnet-asr"
DEFAULT_STATE_DIR = "~/.magnet-asr"
DEFAULT_CACHE_DIR = "/workspace/.cache"


@dataclass(frozen=True)
class RemoteLayout:
    """Where things live on the remote.

    ``remote_dir`` holds the synced checkout and ``logs/``; ``state_dir`` (default ``~/.magnet-asr``,
    outside the checkout and off the shared ``/workspace`` volume) holds the run scripts and the 0600
    secrets file; ``cache_dir`` holds the Hugging Face and magnet-asr caches (on the volume, so they
    survive a pod restart).
    """

    remote_dir: str
    state_dir: str
    cache_dir: str
    tmux_socket: str | None = None

    @classmethod
    def resolved(
        cls,
        info: RemoteInfo,
        remote_dir: str = DEFAULT_REMOTE_DIR,
        state_dir: str = DEFAULT_STATE_DIR,
        cache_dir: str = DEFAULT_CACHE_DIR,
        tmux_socket: str | None = None,
    ) -> RemoteLayout:
        """A layout with ``~`` and relative paths made absolute against the remote home."""

        def absolute(path: str) -> str:
            return info.resolve(path).rstrip("/") or "/"

        return cls(absolute(remote_dir), absolute(state_dir), absolute(cache_dir), tmux_socket)

    @property
    def logs_dir(self) -> str:
        return f"{self.remote_dir}/logs"

    @property
    def secrets_file(self) -> str:
        return f"{self.state_dir}/secrets.env"

    def log_file(self, session: str) -> str:
        return f"{self.logs_dir}/{session}.log"

    def run_file(self, session: str) -> str:
        return f"{self.state_dir}/run-{session}.sh"

    def tmux_prefix(self) -> list[str]:
        """``tmux`` or ``tmux -L SOCKET`` (a private server, e.g. for tests)."""
        return ["tmux", "-L", self.tmux_socket] if self.tmux_socket else ["tmux"]

    def tmux_function(self) -> str:
        """A shell function ``tm`` standing for the right tmux invocation."""
        return f'tm() {{ {shlex.join(self.tmux_prefix())} "$@"; }}\n'

    def run_environment(self) -> dict[str, str]:
        hf_home = f"{self.cache_dir}/huggingface"
        return {
            "HF_HOME": hf_home,
            "HF_DATASETS_CACHE": f"{hf_home}/datasets",
            # hf_transfer for huggingface_hub < 1.0 (deploy installs it); Xet's fast path for >= 1.0,
            # which also silences the newer hub's deprecation warning about HF_HUB_ENABLE_HF_TRANSFER.
            "HF_HUB_ENABLE_HF_TRANSFER": "1",
            "HF_XET_HIGH_PERFORMANCE": "1",
            "MAGNET_ASR_HOME": f"{self.cache_dir}/magnet_asr",
            # Tokenizers' thread pool deadlocks in forked DataLoader workers.
            "TOKENIZERS_PARALLELISM": "false",
            # A piped stdout is block-buffered: without this the log would lag by kilobytes.
            "PYTHONUNBUFFERED": "1",
        }


def session_name(name: str) -> str:
    """tmux treats ``.`` and ``:`` in a target specially; keep names to ``[A-Za-z0-9_-]``."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", name).strip("_")
    if not cleaned:
        raise ValueError(f"unusable tmux session name: {name!r}")
    return cleaned


_MISSING_TMUX = (
    'command -v tmux >/dev/null 2>&1 || { echo "magnet-asr-error: tmux is not installed on the remote '
    '(run deploy without --skip-setup)" >&2; exit 3; }\n'
)


def setup_script() -> str:
    """Install tmux and rsync with apt when missing (root, or passwordless sudo)."""
    return """set -eu
need=""
for tool in tmux rsync; do command -v "$tool" >/dev/null 2>&1 || need="$need $tool"; done
if [ -z "$need" ]; then echo "magnet-asr: tmux and rsync are already installed"; exit 0; fi
if [ "$(id -u)" -eq 0 ]; then sudo=""
elif command -v sudo >/dev/null 2>&1; then sudo="sudo -n"
else echo "magnet-asr-error: need root or sudo to install:$need" >&2; exit 3; fi
command -v apt-get >/dev/null 2>&1 || { echo "magnet-asr-error: no apt-get; install$need by hand" >&2; exit 3; }
echo "magnet-asr: installing$need"
$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
# shellcheck disable=SC2086
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need
"""


def mkdir_script(path: str) -> str:
    return f"set -eu\nmkdir -p {q(path)}\n"


def deps_script(layout: RemoteLayout, python: str, extras: Sequence[str] = ()) -> str:
    """Install the project with the remote's own Python, keeping its preinstalled (CUDA) torch.

    A pip constraint ``torch==<installed version>`` makes every dependency resolve against the torch
    that is there; pip fails loudly rather than swapping in a CPU or different-CUDA build.
    ``PIP_BREAK_SYSTEM_PACKAGES``: on a rented GPU container the system Python *is* the environment
    (that is where CUDA torch lives), so Debian's PEP 668 guard must be waived for it.
    """
    spec = f".[{','.join(extras)}]" if extras else "."
    constraints = f"{layout.state_dir}/constraints.txt"
    return f"""set -eu
py={q(python)}
command -v "$py" >/dev/null 2>&1 || {{ echo "magnet-asr-error: $py not found on the remote (see --python)" >&2; exit 3; }}
cd {q(layout.remote_dir)}
mkdir -p {q(layout.state_dir)}
export PIP_ROOT_USER_ACTION=ignore PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if torch_version="$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
  echo "torch==$torch_version" > {q(constraints)}
  echo "magnet-asr: keeping the preinstalled torch $torch_version"
else
  : > {q(constraints)}
  echo "magnet-asr: warning: $py has no torch; pip will install one from PyPI" >&2
fi
"$py" -m pip install -c {q(constraints)} -e {q(spec)} hf_transfer
"$py" -c 'import magnet_asr, torch; print("magnet-asr", magnet_asr.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())'
"""


def training_command(
    python: str, experiment: str, overrides: Sequence[str] = (), accelerate_config: str | None = None
) -> str:
    """``python -m magnet_asr train +experiments=NAME ...``, under ``accelerate launch`` if asked."""
    train = ["-m", "magnet_asr", "train", f"+experiments={experiment}", *overrides]
    if accelerate_config:
        config = (
            accelerate_config if "/" in accelerate_config else f"configs/accelerate/{accelerate_config}.yaml"
        )
        return shlex.join([python, "-m", "accelerate.commands.launch", "--config_file", config, *train])
    return shlex.join([python, *train])


def run_file_text(
    layout: RemoteLayout, session: str, command: str, secret_names: Sequence[str] = SECRET_NAMES
) -> str:
    """The script tmux runs: environment, secrets from the 0600 file, the command teed into the log."""
    exports = "\n".join(f"export {k}={q(v)}" for k, v in layout.run_environment().items())
    log = q(layout.log_file(session))
    stamp = "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    return f"""#!/usr/bin/env bash
# Written by `magnet-asr remote start` for tmux session {session}.
cd {q(layout.remote_dir)} || exit 1
{exports}
# Secrets arrive in a 0600 file written over ssh stdin, never on a command line.
if [ -f {q(layout.secrets_file)} ]; then set -a; . {q(layout.secrets_file)}; set +a; fi
mkdir -p {q(layout.logs_dir)}
{{
  echo "== magnet-asr remote: session {session} started {stamp} on ${{HOSTNAME:-remote}} =="
  printf '== command: %s ==\\n' {q(command)}
}} | tee -a {log}
set -o pipefail
(
{command}
) 2>&1 | tee -a {log}
status=$?
echo "== magnet-asr remote: finished with exit status $status at {stamp} ==" | tee -a {log}
# Keep the pane open to read the output, but not with the secrets in an idle interactive shell.
unset {" ".join(dict.fromkeys(secret_names))}
echo "(tmux session kept open for inspection; type exit to close it)"
exec bash
"""


def secrets_file_lines(secrets: Mapping[str, str]) -> list[str]:
    return [f"export {name}={q(value)}" for name, value in secrets.items()]


def start_script(
    layout: RemoteLayout, session: str, run_text: str, secrets: Mapping[str, str], force: bool
) -> str:
    """Write the secrets file (0600) and the run script, then start the detached tmux session.

    The secrets file always holds exactly the secrets of this start (none: removed), so a token
    revoked locally does not linger on the pod. ``printf`` is a bash builtin: the values never
    become the arguments of a process.
    """
    exists = (
        "tm kill-session -t " + q(f"={session}")
        if force
        else f'echo "magnet-asr-error: tmux session {session} is already running (attach, or pass --force)" >&2; exit 5'
    )
    lines = " ".join(q(line) for line in secrets_file_lines(secrets))
    write_secrets = f"printf '%s\\n' {lines} > {q(layout.secrets_file)}\n" if secrets else ""
    run_file = q(layout.run_file(session))
    return f"""set -eu
{layout.tmux_function()}{_MISSING_TMUX}[ -d {q(layout.remote_dir)} ] || {{ echo {q(f"magnet-asr-error: {layout.remote_dir} does not exist on the remote (run deploy first)")} >&2; exit 4; }}
if tm has-session -t {q(f"={session}")} 2>/dev/null; then {exists}; fi
mkdir -p {q(layout.logs_dir)}
umask 077
mkdir -p {q(layout.state_dir)}
rm -f {q(layout.secrets_file)}
{write_secrets}printf '%s' {q(run_text)} > {run_file}
tm new-session -d -s {q(session)} {q(shlex.join(["bash", layout.run_file(session)]))}
echo {q(f"magnet-asr: started tmux session {session}; log: {layout.log_file(session)}")}
"""


def list_script(layout: RemoteLayout, names_only: bool = False) -> str:
    listing = "tm list-sessions -F '#{session_name}'" if names_only else "tm list-sessions"
    return f"""{layout.tmux_function()}{_MISSING_TMUX}{listing} 2>/dev/null || true
"""


def logs_script(layout: RemoteLayout, session: str | None, lines: int, follow: bool) -> str:
    """Print the tail of a session's log (default: the newest log); fall back to the tmux pane."""
    tail = f"exec tail -n {int(lines)} -F" if follow else f"tail -n {int(lines)}"
    logs = q(layout.logs_dir)
    return f"""{layout.tmux_function()}session={q(session or "")}
if [ -z "$session" ]; then
  log="$(ls -t {logs}/*.log 2>/dev/null | head -n 1)"
  [ -n "$log" ] || {{ echo {q(f"magnet-asr-error: no logs in {layout.logs_dir} yet (start a run first)")} >&2; exit 4; }}
else
  log={logs}/"$session.log"
  if [ ! -f "$log" ]; then
    if tm has-session -t "=$session" 2>/dev/null; then
      echo "== magnet-asr: no log file for $session; the pane's last lines ==" >&2
      tm capture-pane -p -t "$session" -S -{int(lines)}; exit 0
    fi
    echo "magnet-asr-error: no log for session $session in "{logs} >&2; exit 4
  fi
fi
echo "== $log ==" >&2
{tail} "$log"
"""


def attach_command(layout: RemoteLayout, session: str) -> str:
    """The remote command for an interactive ``ssh -t``: attach to the tmux session."""
    return shlex.join([*layout.tmux_prefix(), "attach-session", "-t", f"={session}"])
