"""``deploy``: system set-up, sync of the git-tracked files, install of the dependencies."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from magnet_asr.remote.scripts import (
    DEFAULT_REMOTE_DIR,
    DEFAULT_STATE_DIR,
    RemoteLayout,
    deps_script,
    mkdir_script,
    setup_script,
)
from magnet_asr.remote.ssh import RemoteError, SshTarget, probe, require_binary, run_checked, sync_files


@dataclass(frozen=True)
class DeployOptions:
    source: str | None = None
    remote_dir: str = DEFAULT_REMOTE_DIR
    state_dir: str = DEFAULT_STATE_DIR
    python: str = "python3"
    extras: tuple[str, ...] = ()
    skip_setup: bool = False
    skip_sync: bool = False
    skip_deps: bool = False


def _is_checkout(path: Path) -> bool:
    # `.git` is a directory in a clone and a file in a worktree.
    return (path / "pyproject.toml").is_file() and (path / ".git").exists()


def project_root(source: str | None = None) -> Path:
    """The checkout to deploy: ``source``, else the one this package runs from, else the cwd's repo."""
    if source:
        root = Path(source).expanduser().resolve()
        if not (root / ".git").exists():
            raise RemoteError(f"{root} is not a git checkout; deploy syncs the git-tracked files")
        return root
    package_checkout = Path(__file__).resolve().parents[3]
    if _is_checkout(package_checkout):
        return package_checkout
    require_binary("git")
    result = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RemoteError("not inside a git checkout of magnet-asr; run from one or pass --source DIR")
    return Path(result.stdout.strip())


def tracked_files(root: Path) -> list[str]:
    """``git ls-files``: what is versioned, so caches, runs, venvs and untracked secrets stay home."""
    require_binary("git")
    result = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, check=False)
    if result.returncode != 0:
        raise RemoteError(f"git ls-files failed in {root}: {result.stderr.decode(errors='replace').strip()}")
    names = [n for n in result.stdout.decode().split("\0") if n]
    # A file deleted in the worktree but not yet in the index would make rsync fail.
    return [n for n in names if os.path.lexists(root / n)]


def _sync(target: SshTarget, root: Path, layout: RemoteLayout, say: Callable[[str], None]) -> None:
    files = tracked_files(root)
    if not files:
        raise RemoteError(f"no git-tracked files in {root}")
    run_checked(target, mkdir_script(layout.remote_dir), "creating the remote directory")
    say(f"syncing {len(files)} git-tracked files from {root} to {target.host}:{layout.remote_dir}")
    sync_files(target, root, files, layout.remote_dir)


def deploy(target: SshTarget, options: DeployOptions, say: Callable[[str], None] = print) -> RemoteLayout:
    """Run the requested deploy steps in order; each failure is a one-line :class:`RemoteError`."""
    root = None if options.skip_sync else project_root(options.source)
    info = probe(target)
    layout = RemoteLayout.resolved(info, options.remote_dir, options.state_dir)
    say(f"connected to {target.label} (remote home {info.home})")
    if not options.skip_setup:
        say("system set-up: tmux, rsync")
        run_checked(target, setup_script(), "system set-up")
    elif not options.skip_sync:
        info.require("rsync", "run deploy without --skip-setup, or install it on the remote")
    if root is not None:
        _sync(target, root, layout, say)
    if not options.skip_deps:
        say(f"installing the project's dependencies with the remote {options.python} (keeping its torch)")
        run_checked(target, deps_script(layout, options.python, options.extras), "dependency install")
    return layout


def next_steps(target: SshTarget, layout: RemoteLayout) -> str:
    """What to type next, shown after a successful deploy."""
    return (
        f"deployed to {target.host}:{layout.remote_dir}\n"
        f"  start training: magnet-asr remote start {target.host} {target.port} --experiment NAME\n"
        f"  log in:         ssh -p {target.port} {target.destination}"
    )
