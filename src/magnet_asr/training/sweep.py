"""``magnet-asr sweep``: train and evaluate one run per value of a config key, and tabulate WER vs compression.

Each point is an ordinary training run (``OUT/<key>=<value>/``, with ``results.json``, ``final/`` and
``logs/``), so ``magnet-asr report OUT`` plots the sweep as a WER-vs-compression Pareto figure. A point
whose ``results.json`` already exists is reused: an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from magnet_asr.evaluation.report import markdown_table

__all__ = ["parse_sweep", "run_sweep"]

SWEEP_COLUMNS = ("point", "data", "wer", "mean_compression", "rtfx", "num_utterances")


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    """``'compressor.boundaries_per_unit=1.0,1.7'`` -> ``('compressor.boundaries_per_unit', ['1.0', '1.7'])``."""
    key, sep, values = spec.partition("=")
    points = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not points:
        raise ValueError(
            f"--param must look like KEY=V1,V2,... (e.g. compressor.compression=3,5), got {spec!r}"
        )
    if len(set(points)) != len(points):
        raise ValueError(f"--param {key}: repeated values in {values!r}")
    return key.strip(), points


def _point_results(
    overrides: Sequence[str], key: str, value: str, point_dir: Path, train_fn: Callable[[Any], dict]
) -> dict[str, Any]:
    results_file = point_dir / "results.json"
    if results_file.is_file():
        print(f"sweep: {key}={value} already trained, reusing {results_file}")
        return json.loads(results_file.read_text(encoding="utf-8"))
    from omegaconf import OmegaConf

    from magnet_asr.schema import load_run_config

    # quoted: Hydra's override grammar reads the '=' of the point's directory name otherwise
    cfg = load_run_config([*overrides, f"{key}={value}", f'training.output_dir="{point_dir}"'])
    OmegaConf.update(cfg, "run_name", f"{cfg.run_name} {key.rsplit('.', 1)[-1]}={value}")
    print(f"sweep: training {key}={value} -> {point_dir}")
    return train_fn(cfg)


def run_sweep(
    overrides: Sequence[str],
    param: str,
    out: str | Path,
    train_fn: Callable[[Any], dict] | None = None,
) -> list[dict[str, Any]]:
    """Train every point of ``param`` (``KEY=V1,V2,...``) on top of ``overrides``; write ``OUT/sweep.json``
    and ``OUT/sweep.md``; return one row per (point, test corpus). Non-zero DDP ranks return ``[]``."""
    if train_fn is None:
        from magnet_asr.training.recipe import train

        train_fn = train
    key, values = parse_sweep(param)
    out = Path(out)
    rows: list[dict[str, Any]] = []
    for value in values:
        results = _point_results(overrides, key, value, out / f"{key}={value}", train_fn)
        for data, summary in (results.get("test") or {}).items():
            rows.append({"point": f"{key}={value}", "value": value, "data": data, **summary})
    if not rows:
        return rows  # a non-zero rank: rank 0 writes the table
    rows.sort(key=lambda r: (r["data"], -(r.get("mean_compression") or 1.0)))
    table = [{c: r.get(c) for c in SWEEP_COLUMNS} for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(
        json.dumps({"param": key, "values": values, "rows": table}, indent=2) + "\n"
    )
    md = f"# Sweep over `{key}`\n\n{markdown_table(table, SWEEP_COLUMNS)}"
    (out / "sweep.md").write_text(md, encoding="utf-8")
    print(md)
    return table
