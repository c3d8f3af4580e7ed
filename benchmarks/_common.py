"""Shared pieces of the model benchmarks (``bench_encoder.py``, ``bench_train.py``).

Measurement follows ``bench_downsample.py``:

- Every (model, method) runs in fresh subprocesses, so one method's allocations and warm caches never
  leak into another's figures; time and peak memory come from two separate subprocesses.
- Time: median wall-clock of timed passes after one warm-up pass (inputs built beforehand, not timed).
  The number of passes adapts to their cost: at least ``min_repeats``, at most ``max_repeats``, and no
  more once ``budget_s`` seconds have been spent.
- Peak memory: torch's CPU allocator is invisible to ``tracemalloc``, so we read the kernel's
  resident-set high-water mark: with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB every tensor
  buffer is its own mmap and returns to the OS when freed, so RSS tracks live tensor bytes. After one
  warm-up pass, ``VmHWM`` is reset through ``/proc/self/clear_refs`` and the figure is
  ``VmHWM - VmRSS`` around one pass: the extra memory the pass needs on top of what was already
  resident (weights, inputs, optimizer state).

Compression at a fixed rate: :func:`fix_boundaries` replaces a predictor's decision by one boundary
every ``k`` real frames (the predictor's MLP still runs, its output is multiplied by 0), so timings
measure the encoder's work after pooling at exactly ``k``x, not the quality of a learned predictor.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FRAMES_PER_SECOND = 100  # log-mel frames per second (Whisper: 10 ms hop); the encoder runs at 50/s

# Whisper encoder sizes (openai/whisper-*), built from configs with random weights: no downloads.
WHISPER_DIMS: dict[str, dict[str, int]] = {
    "tiny.en": dict(d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                    decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536),
    "base": dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                 decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048),
    "small": dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                  decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
}  # fmt: skip
COMMON_WHISPER = dict(num_mel_bins=80, max_source_positions=1500, max_target_positions=448, vocab_size=51865)


def whisper_kwargs(dims: str) -> dict[str, Any]:
    """``WhisperConfig`` keyword arguments for a named size (sdpa attention, no dropout)."""
    return {**COMMON_WHISPER, **WHISPER_DIMS[dims], "attn_implementation": "sdpa"}


def predictor_settings(rate: int) -> dict[str, Any]:
    """``BoundaryPredictorConfig`` kwargs for a predictor aiming at ``rate``x (prior ``1/rate``)."""
    return {"variant": "mlp", "prior": 1.0 / rate, "target": "fixed", "loss": ["binomial"]}


def fix_boundaries(predictor: torch.nn.Module, every: int) -> None:
    """Make ``predictor`` put a boundary on every ``every``-th real frame, in training and eval alike.

    The real MLP still runs (its logits times 0 keep the compute and the autograd graph), then fixed
    logits of +/-20 decide: ``sigmoid(20) > 0.5`` in eval, and a Gumbel-sigmoid sample flips with
    probability ~2e-9 in training. The forced last real frame adds one segment when the length is not
    a multiple of ``every``.
    """
    original = predictor.boundary_logits

    def fixed(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        logits = original(hidden, real)
        position = torch.arange(hidden.shape[1], device=hidden.device)
        pattern = torch.where(position % every == every - 1, 20.0, -20.0)
        return logits * 0.0 + pattern

    predictor.boundary_logits = fixed  # instance attribute shadows the method


# ---- measuring (inside a worker subprocess) -------------------------------------------------------
def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(step: Callable[[], Any], mode: str, min_repeats: int, max_repeats: int, budget_s: float) -> dict:
    """Warm up with one ``step()``, then time it (``mode='time'``) or take its peak memory (``'memory'``)."""
    step()  # warm-up: thread pools, oneDNN / MKL buffers, first touch of pages, optimizer state
    gc.collect()
    if mode == "memory":
        baseline = status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        step()
        peak = status_kib("VmHWM")
        return {"peak_mib": (peak - baseline) / 1024, "resident_mib": baseline / 1024}
    times: list[float] = []
    spent = 0.0
    while len(times) < max_repeats and (len(times) < min_repeats or spent < budget_s):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return {"time_ms": 1e3 * statistics.median(times), "time_min_ms": 1e3 * min(times), "repeats": len(times)}


# ---- driving (in the parent) --------------------------------------------------------------------
def run_worker(script: str, job: dict, mode: str) -> list[dict]:
    """Run ``script --worker JOB`` in a fresh interpreter; ``mode`` is ``time`` or ``memory``."""
    env = dict(os.environ)
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, script, "--worker", json.dumps({**job, "mode": mode})]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {job} ({mode}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def environment(threads: int) -> dict[str, Any]:
    """Software and machine facts stored beside every result."""
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": threads,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "time_method": "median wall-clock of timed passes after one warm-up, fresh subprocess",
        "memory_method": "VmHWM - VmRSS around one pass after a warm-up, MALLOC_MMAP_THRESHOLD_=65536, "
        "fresh subprocess",
    }


def write_json(path: Path, report: dict) -> None:
    """Write ``report`` as indented JSON (plus the load average at the end), creating the directory."""
    report["load_average_at_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min) at end: {report['load_average_at_end']}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
