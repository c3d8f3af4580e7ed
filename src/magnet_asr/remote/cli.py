"""Argument parsing for ``magnet-asr remote {deploy,start,attach}`` and the three RunPod scripts.

Wire into the main CLI with :func:`add_remote_parser`; the scripts call :func:`script_main`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from magnet_asr.remote.deploy import DeployOptions, deploy, next_steps
from magnet_asr.remote.scripts import (
    DEFAULT_CACHE_DIR,
    DEFAULT_REMOTE_DIR,
    DEFAULT_STATE_DIR,
    RemoteLayout,
    session_name,
    training_command,
)
from magnet_asr.remote.session import (
    StartRequest,
    attach,
    choose_session,
    collect_secrets,
    default_session,
    has_terminal,
    list_sessions,
    session_names,
    show_logs,
    start,
)
from magnet_asr.remote.ssh import SECRET_NAMES, RemoteError, SshTarget, probe

DEFAULT_EXPERIMENT = "production"

DESCRIPTIONS = {
    "deploy": "set up a remote GPU box over ssh, sync the git-tracked files, install the dependencies",
    "start": "start training (or --command) in a named tmux session on the remote, logging to a file",
    "attach": "attach to a remote tmux session, list the sessions, or print a log's tail",
}


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("host", help="remote host name or IP (USER@HOST also works)")
    p.add_argument("port", type=int, help="ssh port (RunPod: the pod's 'SSH over exposed TCP' port)")
    g = p.add_argument_group("ssh")
    g.add_argument("-i", "--identity", metavar="KEY", help="private key file (ssh -i)")
    g.add_argument("--user", default="root", help="remote user (default: root)")
    g.add_argument(
        "--known-hosts", metavar="FILE", help="known_hosts file to use instead of ~/.ssh/known_hosts"
    )
    g.add_argument(
        "--accept-new-host-key",
        action="store_true",
        help="trust the key of a host seen for the first time (StrictHostKeyChecking=accept-new); "
        "a changed key is still refused",
    )
    g.add_argument(
        "-o",
        "--ssh-option",
        action="append",
        default=[],
        metavar="OPT",
        help="extra ssh -o option (repeatable)",
    )
    g.add_argument("--connect-timeout", type=int, default=10, metavar="S", help="seconds (default: 10)")
    paths = p.add_argument_group("remote paths")
    paths.add_argument(
        "--remote-dir", default=DEFAULT_REMOTE_DIR, help=f"checkout on the remote ({DEFAULT_REMOTE_DIR})"
    )
    paths.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        help=f"remote dir for run scripts and the 0600 secrets file ({DEFAULT_STATE_DIR})",
    )


def _add_tmux_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tmux-socket", metavar="NAME", help="use a private tmux server (tmux -L NAME)")


def _add_deploy_args(p: argparse.ArgumentParser) -> None:
    _add_connection_args(p)
    p.add_argument("--skip-setup", action="store_true", help="skip installing tmux and rsync with apt")
    p.add_argument("--skip-sync", action="store_true", help="skip the rsync of the git-tracked files")
    p.add_argument("--skip-deps", action="store_true", help="skip installing the Python dependencies")
    p.add_argument(
        "--source", metavar="DIR", help="local checkout to sync (default: this package's checkout)"
    )
    p.add_argument("--python", default="python3", help="remote Python with CUDA torch (default: python3)")
    p.add_argument(
        "--extras", action="append", default=[], metavar="NAME", help="optional extras to install, e.g. wandb"
    )


def _add_start_args(p: argparse.ArgumentParser) -> None:
    _add_connection_args(p)
    _add_tmux_arg(p)
    p.add_argument(
        "--experiment", help=f"experiment config (+experiments=NAME; default {DEFAULT_EXPERIMENT})"
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override (repeatable)",
    )
    p.add_argument(
        "--accelerate", metavar="CONFIG", help="run under accelerate launch, e.g. a40 or multi_gpu"
    )
    p.add_argument("--command", help="run this shell command instead of training (in the remote checkout)")
    p.add_argument("--session-name", help="tmux session name (default: train_EXPERIMENT_YYYYmmdd_HHMM)")
    p.add_argument("--no-attach", action="store_true", help="start the session but do not attach to it")
    p.add_argument("--force", action="store_true", help="replace a running session of the same name")
    p.add_argument("--python", default="python3", help="remote Python (default: python3)")
    p.add_argument(
        "--cache-dir",
        default=DEFAULT_CACHE_DIR,
        help=f"remote root of HF_HOME and MAGNET_ASR_HOME ({DEFAULT_CACHE_DIR})",
    )
    p.add_argument(
        "--secret-env",
        action="append",
        default=[],
        metavar="NAME",
        help=f"also forward this local variable like {' and '.join(SECRET_NAMES)} (repeatable)",
    )


def _add_attach_args(p: argparse.ArgumentParser) -> None:
    _add_connection_args(p)
    _add_tmux_arg(p)
    p.add_argument("-s", "--session-name", help="session (default: the only one running / the newest log)")
    p.add_argument("-l", "--list", action="store_true", help="list the tmux sessions and exit")
    p.add_argument(
        "--logs", action="store_true", help="print the tail of the session's log instead of attaching"
    )
    p.add_argument("-n", "--lines", type=int, default=100, help="log lines to print (default: 100)")
    p.add_argument("-f", "--follow", action="store_true", help="with --logs: keep printing new lines")


def _target(args: argparse.Namespace) -> SshTarget:
    user, _, host = args.host.rpartition("@")
    return SshTarget(
        host=host,
        port=args.port,
        user=user or args.user,
        identity=args.identity,
        known_hosts=args.known_hosts,
        accept_new_host_key=args.accept_new_host_key,
        connect_timeout=args.connect_timeout,
        options=tuple(args.ssh_option),
    )


def _layout(args: argparse.Namespace, target: SshTarget) -> RemoteLayout:
    info = probe(target)
    info.require("tmux", "run `magnet-asr remote deploy` without --skip-setup first")
    cache_dir = getattr(args, "cache_dir", DEFAULT_CACHE_DIR)
    return RemoteLayout.resolved(info, args.remote_dir, args.state_dir, cache_dir, args.tmux_socket)


def _cmd_deploy(args: argparse.Namespace) -> int:
    target = _target(args)
    options = DeployOptions(
        source=args.source,
        remote_dir=args.remote_dir,
        state_dir=args.state_dir,
        python=args.python,
        extras=tuple(args.extras),
        skip_setup=args.skip_setup,
        skip_sync=args.skip_sync,
        skip_deps=args.skip_deps,
    )
    print(next_steps(target, deploy(target, options)))
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    target = _target(args)
    experiment = args.experiment or DEFAULT_EXPERIMENT
    command = args.command or training_command(args.python, experiment, args.override, args.accelerate)
    if args.session_name:
        session = session_name(args.session_name)
    else:
        session = default_session(experiment if args.experiment or not args.command else "command")
    secrets = collect_secrets([*SECRET_NAMES, *args.secret_env])
    layout = _layout(args, target)
    start(target, layout, StartRequest(session, command, secrets, args.force))
    if args.no_attach or not has_terminal():
        why = "" if args.no_attach else " (not attaching: no terminal)"
        print(f"follow it{why}: magnet-asr remote attach {target.host} {target.port} -s {session} [--logs]")
        return 0
    return attach(target, layout, session)


def _cmd_attach(args: argparse.Namespace) -> int:
    target = _target(args)
    layout = _layout(args, target)
    if args.list:
        print(list_sessions(target, layout))
        return 0
    requested = session_name(args.session_name) if args.session_name else None
    if args.logs:
        show_logs(target, layout, requested, args.lines, args.follow)
        return 0
    ask = input if has_terminal() else None
    session = requested or choose_session(session_names(target, layout), target.host, ask)
    return attach(target, layout, session)


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "deploy": (_add_deploy_args, _cmd_deploy),
    "start": (_add_start_args, _cmd_start),
    "attach": (_add_attach_args, _cmd_attach),
}


def add_remote_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``remote {deploy,start,attach}`` to a parent CLI; the parsed args carry ``func=run_remote``."""
    remote = subparsers.add_parser(
        "remote", help="cloud GPU deployment over ssh + tmux (RunPod)", description=__doc__.splitlines()[0]
    )
    sub = remote.add_subparsers(dest="remote_command", required=True, metavar="{deploy,start,attach}")
    for name, (add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=DESCRIPTIONS[name], description=DESCRIPTIONS[name]))
    remote.set_defaults(func=run_remote)
    return remote


def build_remote_parser(prog: str = "magnet-asr") -> argparse.ArgumentParser:
    """A standalone parser whose only command is ``remote`` (for embedding or tests)."""
    parser = argparse.ArgumentParser(prog=prog)
    add_remote_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def run_remote(args: argparse.Namespace) -> int:
    """Run a parsed ``remote`` command; failures print one line and give a non-zero exit code."""
    name = args.remote_command
    try:
        return COMMANDS[name][1](args)
    except (RemoteError, ValueError) as e:
        print(f"magnet-asr remote {name}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2) or 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def script_main(command: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``scripts/{deploy_runpod,start_remote_training,attach_remote_session}.py``."""
    add_args, _ = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTIONS[command])
    add_args(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.remote_command = command
    return run_remote(args)
