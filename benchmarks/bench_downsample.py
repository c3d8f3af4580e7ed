"""Benchmark: ``magnet_asr.compression.downsample`` vs the membership-matrix formulation.

Forward + backward (gradients to ``hidden`` and to ``boundaries``), D=768, one boundary every 5 frames,
for B=8 x L=1500 (30 s of audio at 50 frames/s) and B=1 x L=15000 / 45000 (5 and 15 minutes). Three
methods, side by side in one run:

- ``ours``:   :func:`magnet_asr.compression.downsample` (embedding_bag + custom backward), O(B·L·D).
- ``matrix``: :func:`magnet_asr.compression.reference.downsample_membership`, dynamic token pooling's
  ``(B, L, S)`` membership matrix and einsum, O(B·S·L·D); same boundary gradient as ours.
- ``copy``:   ``hidden * 1.0`` forward and backward: one full read+write of ``(B, L, D)`` each way, the
  memory-bound floor for anything that returns a gradient for every frame.

How it measures (honest CPU numbers):

- Every (case, method) runs in a fresh subprocess, so one method's allocations and warm caches never
  leak into another's figures.
- Time: median wall-clock of ``--repeats`` forward+backward passes after one warm-up pass (inputs
  and the output gradient are created beforehand and not timed).
- Peak memory: torch's CPU allocator is invisible to ``tracemalloc``, so we read the kernel's
  resident-set high-water mark instead: a second subprocess with glibc's ``MALLOC_MMAP_THRESHOLD_``
  fixed at 64 KiB (every tensor buffer is its own mmap and returns to the OS when freed, so RSS tracks
  live tensor bytes), one warm-up pass, then ``VmHWM`` is reset through ``/proc/self/clear_refs`` and
  the figure is ``VmHWM - VmRSS`` around one forward+backward: the extra memory the pass needs on top of
  its inputs, outputs and gradients included.

Usage: ``python benchmarks/bench_downsample.py [--repeats N] [--threads T] [--skip-matrix-above L]``.
Writes ``benchmarks/results/bench_downsample.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = [(8, 1500), (1, 15000), (1, 45000)]
SWEEP = [1500, 4500, 15000, 45000]
METHODS = ("ours", "matrix", "copy")
DIM = 768
RATE = 5  # one boundary every 5 frames
RESULTS = Path(__file__).resolve().parent / "results" / "bench_downsample.json"


# ---- worker (runs in a subprocess) -------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(method: str, batch: int, length: int, repeats: int, threads: int, measure: str) -> dict:
    import torch

    from magnet_asr.compression import downsample
    from magnet_asr.compression.reference import downsample_membership

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hidden = torch.randn(batch, length, DIM, requires_grad=True)
    boundaries = torch.zeros(batch, length)
    boundaries[:, RATE - 1 :: RATE] = 1.0
    boundaries.requires_grad_(True)
    mask = torch.ones(batch, length)
    segments = -(-length // RATE)
    grad_out = torch.randn(batch, length if method == "copy" else segments, DIM)

    def step() -> None:
        hidden.grad = None
        boundaries.grad = None
        if method == "copy":
            (hidden * 1.0).backward(grad_out)
            return
        pool = downsample if method == "ours" else downsample_membership
        pooled, _ = pool(hidden, boundaries, mask)
        pooled.backward(grad_out)
        assert boundaries.grad is not None and hidden.grad is not None

    step()  # warm-up: thread pools, MKL buffers, first-touch of the input pages
    if measure == "memory":
        hidden.grad = None
        boundaries.grad = None
        gc.collect()
        baseline = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        step()
        peak = _status_kib("VmHWM")
        return {"peak_mib": (peak - baseline) / 1024}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"time_ms": 1e3 * statistics.median(times), "time_min_ms": 1e3 * min(times), "repeats": repeats}


# ---- driver ------------------------------------------------------------------------------------
def _run(method: str, batch: int, length: int, repeats: int, threads: int, measure: str) -> dict:
    env = dict(os.environ)
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        str(batch),
        str(length),
        str(repeats),
        str(threads),
        measure,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {method} B={batch} L={length} ({measure}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _repeats(method: str, batch: int, length: int, base: int) -> int:
    # The matrix formulation costs seconds per pass at long L; a few passes give a stable median.
    if method == "matrix" and batch * length > 12000:
        return max(2, base // 4)
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared, oversubscribed CPU, OpenMP barriers make multi-thread "
        "timings swing by 10x from run to run)",
    )
    parser.add_argument(
        "--skip-matrix-above",
        type=int,
        default=15000,
        help="skip the matrix formulation for L above this (its (B,L,S) tensors grow as L^2)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    threads = args.threads
    rows: list[dict] = []
    measured_matrix: tuple[int, dict] | None = None
    header = f"{'case':<16}{'method':<8}{'time ms':>10}{'min ms':>10}{'peak MiB':>10}{'ns/frame':>10}"
    print(f"downsample forward+backward, D={DIM}, 1 boundary / {RATE} frames")
    print(f"torch {torch.__version__}, {threads} thread(s), {os.cpu_count()} CPUs")
    print(header)
    print("-" * len(header))
    for batch, length in CASES:
        case = f"B={batch} L={length}"
        results: dict[str, dict] = {}
        for method in METHODS:
            if method == "matrix" and length > args.skip_matrix_above:
                segments = -(-length // RATE)
                gib = batch * length * segments * 4 / 2**30
                reason = (
                    f"skipped: one (B,L,S) fp32 tensor alone is {gib:.1f} GiB and the formulation holds "
                    f"several (membership, weights, normalized weights, saved for backward): too much for "
                    f"a shared box"
                )
                results[method] = {"skipped": reason}
                if measured_matrix is not None:
                    # O(S*L) with S = L/5: quadratic in L for time and memory. An estimate, not a measurement.
                    (ref_frames, ref_entry), scale = (
                        measured_matrix,
                        ((batch * length) / measured_matrix[0]) ** 2,
                    )
                    results[method]["estimate_time_ms"] = ref_entry["time_ms"] * scale
                    results[method]["estimate_peak_mib"] = ref_entry["peak_mib"] * scale
                    reason += (
                        f"; quadratic extrapolation from B*L={ref_frames} (estimate, not measured): "
                        f"~{results[method]['estimate_time_ms'] / 1e3:.0f} s and "
                        f"~{results[method]['estimate_peak_mib'] / 1024:.1f} GiB per pass"
                    )
                print(f"{case:<16}{method:<8}  {reason}")
                continue
            timing = _run(
                method, batch, length, _repeats(method, batch, length, args.repeats), threads, "time"
            )
            memory = _run(method, batch, length, 1, threads, "memory")
            entry = {**timing, **memory, "ns_per_frame": 1e6 * timing["time_ms"] / (batch * length)}
            results[method] = entry
            if method == "matrix" and batch == 1:
                measured_matrix = (batch * length, entry)
            print(
                f"{case:<16}{method:<8}{entry['time_ms']:>10.1f}{entry['time_min_ms']:>10.1f}"
                f"{entry['peak_mib']:>10.1f}{entry['ns_per_frame']:>10.1f}"
            )
        ratios: dict[str, float] = {}
        ours, matrix, copy = results["ours"], results["matrix"], results["copy"]
        if "time_ms" in matrix:
            ratios["matrix/ours time"] = matrix["time_ms"] / ours["time_ms"]
            ratios["matrix/ours peak memory"] = matrix["peak_mib"] / max(ours["peak_mib"], 1e-9)
        ratios["ours/copy time"] = ours["time_ms"] / copy["time_ms"]
        ratios["ours/copy peak memory"] = ours["peak_mib"] / max(copy["peak_mib"], 1e-9)
        print(f"{'':<16}ratios: " + ", ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()))
        rows.append({"batch": batch, "length": length, "results": results, "ratios": ratios})

    # Linearity: B=1 over a 30x range of L. Constant ns/frame means time linear in L; the copy floor
    # runs alongside because per-frame memory cost itself rises once (L, D) no longer fits in cache.
    sweep = []
    for length in SWEEP:
        ours = _run("ours", 1, length, args.repeats, threads, "time")
        copy = _run("copy", 1, length, args.repeats, threads, "time")
        sweep.append(
            {
                "length": length,
                "ours_time_ms": ours["time_ms"],
                "copy_time_ms": copy["time_ms"],
                "ours_ns_per_frame": 1e6 * ours["time_ms"] / length,
                "copy_ns_per_frame": 1e6 * copy["time_ms"] / length,
            }
        )
    print("B=1, time vs L (linear in L <=> constant ns/frame):")
    print(f"  {'L':<8}{'ours ms':>10}{'ours ns/fr':>12}{'copy ms':>10}{'copy ns/fr':>12}{'ours/copy':>11}")
    for e in sweep:
        print(
            f"  {e['length']:<8}{e['ours_time_ms']:>10.1f}{e['ours_ns_per_frame']:>12.1f}"
            f"{e['copy_time_ms']:>10.1f}{e['copy_ns_per_frame']:>12.1f}"
            f"{e['ours_time_ms'] / e['copy_time_ms']:>10.2f}x"
        )
    report = {
        "benchmark": "downsample forward+backward vs membership matrix",
        "dim": DIM,
        "boundary_every": RATE,
        "torch": torch.__version__,
        "threads": threads,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_method": "VmHWM - VmRSS around one pass, MALLOC_MMAP_THRESHOLD_=65536, fresh subprocess",
        "time_method": "median wall-clock of repeated passes after one warm-up, fresh subprocess",
        "cases": rows,
        "linearity_sweep_b1": sweep,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        method, batch, length, repeats, threads, measure = sys.argv[2:8]
        out = _worker(method, int(batch), int(length), int(repeats), int(threads), measure)
        print(json.dumps(out))
    else:
        main()
