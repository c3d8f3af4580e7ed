"""Shared by the CLI tests (tests/ is on pytest's pythonpath: `from cli_helpers import run_cli`)."""

from __future__ import annotations

import json
import os
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


# transformers' own ASR pipeline on a saved directory, in an interpreter that imports only magnet_asr
_PIPELINE_SCRIPT = """\
import json, sys, numpy as np, magnet_asr
from transformers import pipeline
asr = pipeline("automatic-speech-recognition", model=sys.argv[1])
assert asr.type == "seq2seq", asr.type
kw = json.loads(sys.argv[2])
noise = 0.1 * np.random.default_rng(0).normal(size=16000 * 70).astype(np.float32)
short = asr({"raw": noise[:32000], "sampling_rate": 16000}, **kw)
long = asr({"raw": noise, "sampling_rate": 16000}, chunk_length_s=30, ignore_warning=True, **kw)
print(type(short["text"]).__name__, type(long["text"]).__name__)
"""


def run_pipeline(model_dir: Path, generate_kwargs: dict | None = None) -> subprocess.CompletedProcess:
    """``pipeline("automatic-speech-recognition", model=model_dir)`` in a fresh interpreter: it must take the
    seq2seq path, then transcribes 2 s of noise and 70 s in 30 s chunks; stdout is the two texts' types."""
    kw = {"generate_kwargs": generate_kwargs} if generate_kwargs else {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", _PIPELINE_SCRIPT, str(model_dir), json.dumps(kw)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
