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


def two_process_launcher(name: str, port: int) -> list[str]:
    """The command prefix that runs ``-m MODULE`` in 2 CPU processes: ``accelerate`` (with
    ``configs/accelerate/cpu_ddp.yaml``) or ``torchrun``; skips the test where the launcher is missing."""
    import shutil
    import sys
    from pathlib import Path

    import pytest

    executable = shutil.which(name, path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.skip(f"{name} launcher not installed")
    if name == "accelerate":
        config = str(Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu_ddp.yaml")
        return [executable, "launch", "--config_file", config, "--main_process_port", str(port), "-m"]
    return [executable, "--nproc_per_node", "2", "--master_port", str(port), "-m"]
