"""Benchmark: Whisper encoder forward, Hugging Face on 30 s padded input vs ours on the true length.

Methods, side by side in one run, at whisper-base and whisper-small dimensions (random weights built
from configs, 80 mel bins, sdpa attention, eval mode, ``torch.inference_mode``):

- ``hf-30s``:       ``transformers.WhisperEncoder`` on 3000 mel frames (every clip padded to 30 s, as
                    transformers requires); its cost does not depend on the clip length.
- ``ours``:         ``MagnetWhisperEncoder`` on the clip's true length (mel mask passed).
- ``ours-L{k}-{r}x``: ours with a boundary predictor before encoder layer ``k`` (0 = right after the conv
                    stem) pooling exactly ``r`` encoder frames into one segment (``_common.fix_boundaries``:
                    the predictor's MLP runs, a fixed pattern decides). This measures the encoder's work
                    after pooling at ``r``x, not how well a learned predictor segments speech.

Grid: clips of 2, 5, 10, 30 s of random log-mel features, batch 1 and 8. Ratios are against ``hf-30s``
at the same dimensions and batch (the transformers baseline for any clip of at most 30 s), plus
``ours / ours-L0-5x`` (what 5x compression at layer 0 adds over the variable-length encoder).

How it measures: see ``benchmarks/_common.py`` (fresh subprocess per (dims, method) for time and
another for memory; median of timed passes after a warm-up; peak = ``VmHWM - VmRSS`` around one pass).

Usage: ``python benchmarks/bench_encoder.py [--quick] [--dims base small] [--threads T] [--budget S]``.
By default whisper-small runs a subset (5 s clips, ``ours-L{0,1}-5x`` only, at least 2 timed passes);
``--full-small`` runs it on the whole grid.
Writes ``benchmarks/results/bench_encoder.json`` (``bench_encoder_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from _common import (
    FRAMES_PER_SECOND,
    RESULTS_DIR,
    environment,
    fix_boundaries,
    measure,
    predictor_settings,
    run_worker,
    whisper_kwargs,
    write_json,
)

CLIPS = (2.0, 5.0, 10.0, 30.0)
BATCHES = (1, 8)
RATES = (3, 5, 10)
LAYERS = (0, 1)
HF = "hf-30s"
TARGET = {"dims": "base", "clip": 5.0, "batch": 8, "variable_length_speedup": 4.0, "layer0_5x_extra": 2.0}


def method_name(layer: int | None = None, rate: int | None = None) -> str:
    """``ours`` or ``ours-L{layer}-{rate}x``."""
    return "ours" if layer is None else f"ours-L{layer}-{rate}x"


def parse_method(name: str) -> tuple[int | None, int | None]:
    """Inverse of :func:`method_name`: ``(layer, rate)``, ``(None, None)`` for ``ours``."""
    if name == "ours":
        return None, None
    _, layer, rate = name.split("-")
    return int(layer[1:]), int(rate[:-1])


# ---- worker (runs in a subprocess) -------------------------------------------------------------
def _worker(job: dict[str, Any]) -> list[dict]:
    import torch
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from magnet_asr.models import MagnetWhisperConfig
    from magnet_asr.models.encoder import MagnetWhisperEncoder

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    kwargs = whisper_kwargs(job["dims"])
    method = job["method"]
    if method == HF:
        encoder: torch.nn.Module = WhisperEncoder(WhisperConfig(**kwargs))
    else:
        layer, rate = parse_method(method)
        extra = (
            {}
            if layer is None
            else {"predictor_layers": [layer], "predictor_settings": predictor_settings(rate)}
        )
        encoder = MagnetWhisperEncoder(MagnetWhisperConfig(**kwargs, **extra))
        for predictor in encoder.predictors.values():
            fix_boundaries(predictor, rate)
    encoder.eval()

    out = []
    for clip, batch in job["cases"]:
        frames = 3000 if method == HF else round(clip * FRAMES_PER_SECOND)
        features = torch.randn(batch, kwargs["num_mel_bins"], frames)
        mask = torch.ones(batch, frames, dtype=torch.long)

        shape: dict[str, int] = {}

        def step(features: torch.Tensor = features, mask: torch.Tensor = mask, shape: dict = shape) -> None:
            with torch.inference_mode():
                if method == HF:
                    length = encoder(features).last_hidden_state.shape[1]
                    shape.update(frames_before=length, frames_after=length)
                    return
                sample = encoder(features, attention_mask=mask)
                shape.update(
                    frames_before=int(sample.frames_before[0]), frames_after=int(sample.frames_after[0])
                )

        result = {
            **measure(step, job["mode"], job["min_repeats"], job["max_repeats"], job["budget"]),
            **shape,
        }
        out.append({"clip": clip, "batch": batch, **result})
        del features, mask
    return out


# ---- driver ------------------------------------------------------------------------------------
def plan(dims: str, quick: bool, small_subset: bool) -> tuple[list[str], list[float], list[int]]:
    """Methods, clip lengths and batch sizes to run at ``dims``."""
    rates = (5,) if quick or (dims == "small" and small_subset) else RATES
    methods = [HF, "ours"] + [method_name(layer, rate) for layer in LAYERS for rate in rates]
    clips = [5.0] if quick or (dims == "small" and small_subset) else list(CLIPS)
    batches = [8] if quick else list(BATCHES)
    return methods, clips, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", nargs="+", default=["base", "small"], choices=["tiny.en", "base", "small"])
    parser.add_argument("--quick", action="store_true", help="5 s clips, batch 8, 5x only (a smoke run)")
    parser.add_argument(
        "--full-small",
        dest="small_subset",
        action="store_false",
        help="run whisper-small on the whole grid (default: 5 s clips, 5x only; ~4.5x the cost of base)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable ratios on a shared CPU)"
    )
    parser.add_argument("--min-repeats", type=int, default=3)
    parser.add_argument("--max-repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed passes per cell (soft)")
    parser.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/bench_encoder*.json)"
    )
    args = parser.parse_args()
    default = RESULTS_DIR / ("bench_encoder_quick.json" if args.quick else "bench_encoder.json")
    output = Path(args.output) if args.output else default

    env = environment(args.threads)
    print("encoder forward (eval, inference_mode), random weights, random log-mel features")
    print(f"load average (1, 5, 15 min) at start: {env['load_average_at_start']}")
    print(
        f"torch {env['torch']}, transformers {env['transformers']}, {args.threads} thread(s), {os.cpu_count()} CPUs"
    )
    rows: list[dict] = []
    notes: list[str] = []
    for dims in args.dims:
        methods, clips, batches = plan(dims, args.quick, args.small_subset)
        if dims == "small" and args.small_subset and not args.quick:
            notes.append(
                "whisper-small: subset (5 s clips, 5x only, min 2 timed passes; ~4.5x the cost of base on "
                "this 2-core CPU); pass --full-small for the full grid"
            )
        measured: dict[str, dict[tuple[float, int], dict]] = {}
        for method in methods:
            cases = [[30.0, b] for b in batches] if method == HF else [[c, b] for c in clips for b in batches]
            job = {
                "dims": dims,
                "method": method,
                "cases": cases,
                "threads": args.threads,
                "min_repeats": min(args.min_repeats, 2)
                if dims == "small" and args.small_subset
                else args.min_repeats,
                "max_repeats": args.max_repeats,
                "budget": args.budget,
            }
            timed = run_worker(__file__, job, "time")
            memory = run_worker(__file__, job, "memory")
            measured[method] = {(t["clip"], t["batch"]): {**t, **m} for t, m in zip(timed, memory)}
            print(f"  measured {dims} {method}", file=sys.stderr)
        for clip in clips:
            for batch in batches:
                hf = measured[HF][(30.0, batch)]
                results = {m: measured[m][(30.0, batch) if m == HF else (clip, batch)] for m in methods}
                for entry in results.values():
                    entry["speedup_vs_hf"] = hf["time_ms"] / entry["time_ms"]
                    entry["memory_vs_hf"] = entry["peak_mib"] / max(hf["peak_mib"], 1e-9)
                    entry["compression"] = entry["frames_before"] / entry["frames_after"]
                row = {"dims": dims, "clip": clip, "batch": batch, "results": results}
                if "ours-L0-5x" in results:
                    row["ours_over_L0_5x"] = results["ours"]["time_ms"] / results["ours-L0-5x"]["time_ms"]
                rows.append(row)
    _print_table(rows)
    verdict = _check_target(rows)
    print(verdict["text"])
    for note in notes:
        print("note:", note)
    report = {
        "benchmark": "Whisper encoder forward: HF 30 s padded vs ours on the true length vs ours compressed",
        **env,
        "compression_method": "fixed pattern: one boundary every r encoder frames (predictor MLP runs, x0)",
        "notes": notes,
        "target": {**TARGET, **verdict},
        "rows": rows,
    }
    write_json(output, report)


def _print_table(rows: list[dict]) -> None:
    header = (
        f"{'dims':<6}{'clip':>5}{'B':>3}  {'method':<13}{'frames':>11}{'time ms':>10}{'peak MiB':>10}"
        f"{'speed-up':>10}{'mem':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        for method, e in row["results"].items():
            frames = (
                f"{e['frames_before']}>{e['frames_after']}"
                if e["frames_before"] != e["frames_after"]
                else str(e["frames_after"])
            )
            print(
                f"{row['dims']:<6}{row['clip']:>5.0f}{row['batch']:>3}  {method:<13}{frames:>11}{e['time_ms']:>10.1f}"
                f"{e['peak_mib']:>10.1f}{e['speedup_vs_hf']:>9.2f}x{e['memory_vs_hf']:>6.2f}x"
            )
        if "ours_over_L0_5x" in row:
            print(f"{'':<16}ours / ours-L0-5x time = {row['ours_over_L0_5x']:.2f}x")
        print()
    print("speed-up = hf-30s time / method time; mem = method peak / hf-30s peak (same dims and batch)")


def _check_target(rows: list[dict]) -> dict[str, Any]:
    match = [
        r
        for r in rows
        if (r["dims"], r["clip"], r["batch"]) == (TARGET["dims"], TARGET["clip"], TARGET["batch"])
    ]
    if not match or "ours_over_L0_5x" not in match[0]:
        return {
            "met": None,
            "text": "target: not measured in this run (needs base, 5 s, batch 8, ours-L0-5x)",
        }
    row = match[0]
    speedup = row["results"]["ours"]["speedup_vs_hf"]
    extra = row["ours_over_L0_5x"]
    met = speedup >= TARGET["variable_length_speedup"] and extra >= TARGET["layer0_5x_extra"]
    text = (
        f"target (base, 5 s, batch 8): ours vs hf-30s {speedup:.2f}x (need >= 4x: "
        f"{'met' if speedup >= 4 else 'NOT met'}); L0 5x adds {extra:.2f}x (need >= 2x: "
        f"{'met' if extra >= 2 else 'NOT met'}); total {row['results']['ours-L0-5x']['speedup_vs_hf']:.2f}x"
    )
    return {
        "met": met,
        "variable_length_speedup_measured": speedup,
        "layer0_5x_extra_measured": extra,
        "text": text,
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        main()
