"""``start`` and ``attach``: training in a named tmux session on the remote, and getting back to it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from magnet_asr.remote.scripts import (
    RemoteLayout,
    attach_command,
    list_script,
    logs_script,
    run_file_text,
    session_name,
    start_script,
)
from magnet_asr.remote.ssh import (
    SECRET_NAMES,
    RemoteError,
    SshTarget,
    child_env,
    failure_message,
    run_checked,
    run_script,
)


def collect_secrets(
    names: Iterable[str] = SECRET_NAMES, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The secrets set (non-empty) in the local environment; unset ones are simply not forwarded."""
    env = os.environ if environ is None else environ
    names = list(dict.fromkeys(names))
    for name in names:
        # The names end up in `export NAME=...` lines on the remote: only shell identifiers.
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"not an environment variable name: {name!r}")
    return {name: env[name] for name in names if env.get(name)}


def default_session(experiment: str, now: datetime | None = None) -> str:
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d_%H%M")
    return session_name(f"train_{experiment}_{stamp}")


def has_terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


@dataclass(frozen=True)
class StartRequest:
    session: str
    command: str
    secrets: Mapping[str, str]
    force: bool = False

    def __post_init__(self) -> None:
        # The name is used unquoted in tmux targets and file names on the remote.
        if session_name(self.session) != self.session:
            raise ValueError(f"tmux session names may only use letters, digits, _ and -: {self.session!r}")


def start(
    target: SshTarget, layout: RemoteLayout, request: StartRequest, say: Callable[[str], None] = print
) -> None:
    """Start ``request.command`` detached in tmux; secrets go to a 0600 file over ssh stdin."""
    if request.secrets:
        say(
            f"forwarding {', '.join(request.secrets)} through a 0600 file on the remote (not the command line)"
        )
    run_text = run_file_text(layout, request.session, request.command, [*SECRET_NAMES, *request.secrets])
    script = start_script(layout, request.session, run_text, request.secrets, request.force)
    print(run_checked(target, script, f"starting tmux session {request.session}", capture=True), end="")


def session_names(target: SshTarget, layout: RemoteLayout) -> list[str]:
    out = run_checked(target, list_script(layout, names_only=True), "listing tmux sessions", capture=True)
    return [line.strip() for line in out.splitlines() if line.strip()]


def list_sessions(target: SshTarget, layout: RemoteLayout) -> str:
    """``tmux list-sessions`` on the remote, or a sentence saying there are none."""
    out = run_checked(target, list_script(layout), "listing tmux sessions", capture=True).strip()
    return out or f"no tmux sessions on {target.host}"


def show_logs(target: SshTarget, layout: RemoteLayout, session: str | None, lines: int, follow: bool) -> None:
    """Stream the tail of the session's log (newest log when ``session`` is None) to our stdout."""
    result = run_script(target, logs_script(layout, session, lines, follow))
    # 130/143: the user stopped `--follow` with Ctrl-C; that is how following ends.
    if result.returncode not in (0, 130, 143):
        raise RemoteError(failure_message(target, "reading the log", result), exit_code=result.returncode)


def choose_session(names: Sequence[str], host: str, ask: Callable[[str], str] | None = None) -> str:
    """The only running session, or the user's pick among several (needs a terminal)."""
    if not names:
        raise RemoteError(f"no tmux sessions on {host}; start one with `magnet-asr remote start`")
    if len(names) == 1:
        return names[0]
    if ask is None:
        raise RemoteError(f"several tmux sessions on {host} ({', '.join(names)}); pass --session-name")
    menu = "\n".join(f"  {i}. {name}" for i, name in enumerate(names, 1))
    answer = ask(f"{menu}\nsession number (1-{len(names)}): ").strip()
    if not answer.isdigit() or not 1 <= int(answer) <= len(names):
        raise RemoteError(f"no session numbered {answer!r}")
    return names[int(answer) - 1]


def attach(target: SshTarget, layout: RemoteLayout, session: str) -> int:
    """Attach interactively (``ssh -t ... tmux attach``); detach with Ctrl-b d."""
    if not has_terminal():
        raise RemoteError("attaching needs a terminal; use --list or --logs instead")
    print(f"attaching to {session} on {target.host} (detach with Ctrl-b d)", flush=True)
    argv = target.ssh_argv(attach_command(layout, session), tty=True)
    return subprocess.run(argv, env=child_env(), check=False).returncode
