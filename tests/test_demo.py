"""`make demo` in miniature: zero-shot rows, two short training runs, and the report with its plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]


def test_demo_end_to_end_writes_the_table_and_the_report(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "-m", "magnet_asr", "demo", "--out", str(out), "--limit", "2"]
    done = subprocess.run(
        [*command, "--train-steps", "2"], env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    models = [r["model"] for r in rows]
    assert models.count("whisper-tiny.en") == 2 and models.count("whisper-base") == 2
    assert sum(m.startswith("magnet_demo (2 steps): learned phone boundaries") for m in models) == 2
    assert sum(m.startswith("magnet_demo_control (2 steps): no compression") for m in models) == 2
    assert all(r["num_utterances"] == 2 for r in rows)
    compressed = [r for r in rows if r["model"].startswith("magnet_demo (2 steps)")]
    assert all(r["mean_compression"] > 1.0 for r in compressed)
    report = (out / "report" / "report.md").read_text()
    figures = out / "report" / "figures"
    assert (figures / "pareto.png").is_file() and (figures / "training_curves.png").is_file()
    assert list(figures.glob("boundaries_magnet_demo_*.png"))
    assert "figures/pareto.png" in report and "(zero-shot)" in report
