"""Result tables: one row per (model, data, split), written as JSON and Markdown side by side."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TABLE_COLUMNS = (
    "model",
    "data",
    "split",
    "wer",
    "cer",
    "loop_share",
    "rtfx",
    "mean_compression",
    "boundary_f1",
    "adjacent_share",
    "silence_share",
    "num_utterances",
    "num_skipped",
)


def table_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The table's columns from an evaluation summary (see ``evaluation.evaluate``); a column the summary
    lacks (older summaries, models without predictors) is None and shows as ``-``."""
    return {key: summary.get(key) for key in TABLE_COLUMNS}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    rows: Sequence[dict[str, Any]], out_dir: str | Path, title: str = "magnet-asr results", notes: str = ""
) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.md`` under ``out_dir``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "report.md"
    _atomic_write(json_path, json.dumps({"title": title, "rows": list(rows)}, indent=2) + "\n")
    _atomic_write(md_path, f"# {title}\n\n{markdown_table(rows)}\n{notes}")
    return json_path, md_path
