"""Stopping a launched training for good: the launcher and every process under it."""

from __future__ import annotations

import contextlib
import subprocess


def kill_tree(proc: subprocess.Popen) -> str:
    """SIGKILL ``proc`` and its descendants (torchrun starts each rank in a session of its own, out of the
    launcher's process group, so a group kill misses them); returns what the launcher printed."""
    import psutil

    family: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return proc.communicate()[0]
