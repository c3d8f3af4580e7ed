"""Shared by the CLI tests (tests/ is on pytest's pythonpath: `from cli_helpers import run_cli`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SENTENCE = "Please leave your message after the tone and press the pound key when you are finished."


def synthesize(out: Path, text: str = SENTENCE) -> Path:
    """``text`` spoken into the wav ``out`` by flite, else espeak-ng; skips the test without either."""
    if shutil.which("flite"):
        subprocess.run(["flite", "-t", text, "-o", str(out)], check=True)
    elif shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", str(out), text], check=True)
    else:
        pytest.skip("needs flite or espeak-ng (apt-get install flite espeak-ng)")
    return out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m magnet_asr ARGS`` in a fresh interpreter, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "magnet_asr", *args], capture_output=True, text=True, timeout=600
    )
