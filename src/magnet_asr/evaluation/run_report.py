"""``magnet-asr report RUN_DIR...``: a Markdown report with embedded PNGs for a set of runs.

A *training run* directory holds ``results.json`` with a ``test`` mapping (corpus -> evaluation summary),
``final/`` (a MagnetWhisper checkpoint) and ``logs/`` (TensorBoard). Any other directory (for example
the demo's ``runs/demo``) contributes its ``eval_*.json`` summaries as zero-shot reference points, and so
do evaluation summaries (JSON files with ``model`` and ``wer``) found next to the run directories.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from magnet_asr.evaluation.report import markdown_table, table_row, write_report

if TYPE_CHECKING:  # numpy, torch and matplotlib load only when a report is built, not with the CLI parser
    import numpy as np

FIGURES = "figures"
MAX_EXAMPLE_SECONDS = 6.0


@dataclass
class Run:
    """A training run directory and what the report uses from it."""

    path: Path
    name: str
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        return self.path / "final"

    @property
    def is_control(self) -> bool:
        compressions = [s.get("mean_compression") or 1.0 for s in self.tests.values()]
        return "control" in self.name or all(c <= 1.0 for c in compressions)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_run(path: Path) -> Run | None:
    """The training run in ``path``, or None if its ``results.json`` has no ``test`` summaries."""
    results = _read_json(path / "results.json") or {}
    tests = results.get("test")
    if not isinstance(tests, dict) or not tests:
        return None
    return Run(path=path, name=str(results.get("run_name") or path.name), tests=tests)


def expand_run_dirs(paths: Sequence[Path]) -> list[Path]:
    """``paths`` with each sweep directory (no ``results.json``, runs one level below) replaced by its runs."""
    out: list[Path] = []
    for path in paths:
        children = sorted(c.parent for c in path.glob("*/results.json"))
        out += children if not (path / "results.json").is_file() and children else [path]
    return out


def _is_eval_summary(data: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    if not data:
        return False
    return "model" in data and isinstance(data.get("wer"), int | float)


def find_references(run_dirs: Sequence[Path], extra: Sequence[Path] = ()) -> list[dict[str, Any]]:
    """Zero-shot evaluation summaries: ``extra`` files, ``eval_*.json`` in non-run directories, and
    evaluation JSONs lying next to the run directories (e.g. ``runs/tiny_asterisk.json``)."""
    candidates = list(extra)
    for d in run_dirs:
        if load_run(d) is None:
            candidates += sorted(d.glob("eval_*.json"))
    for parent in sorted({d.resolve().parent for d in run_dirs}):
        candidates += sorted(parent.glob("*.json"))
    seen: set[tuple[Any, ...]] = set()
    out: list[dict[str, Any]] = []
    for path in candidates:
        data = _read_json(path)
        key = (data or {}).get("model"), (data or {}).get("data"), (data or {}).get("wer")
        if _is_eval_summary(data) and key not in seen:
            seen.add(key)
            out.append(data)
    return out


def pareto_points(runs: Sequence[Run], references: Sequence[dict[str, Any]]) -> list[Any]:
    """One :class:`~magnet_asr.evaluation.plots.ParetoPoint` per (run, corpus) and per reference."""
    from magnet_asr.evaluation.plots import ParetoPoint

    points = [
        ParetoPoint(
            label=run.name,
            corpus=corpus,
            wer=float(s["wer"]),
            compression=float(s.get("mean_compression") or 1.0),
            kind="control" if run.is_control else "compressed",
        )
        for run in runs
        for corpus, s in run.tests.items()
        if isinstance(s.get("wer"), int | float)
    ]
    points += [
        ParetoPoint(
            label=f"{ref['model']} (zero-shot)",
            corpus=str(ref.get("data", "?")),
            wer=float(ref["wer"]),
            compression=float(ref.get("mean_compression") or 1.0),
            kind="zero-shot",
        )
        for ref in references
    ]
    return points


def _results_rows(runs: Sequence[Run], references: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [table_row({**s, "model": run.name}) for run in runs for s in run.tests.values()]
    rows += [table_row({**ref, "model": f"{ref['model']} (zero-shot)"}) for ref in references]
    return rows


def _file_name(name: str) -> str:
    """``name`` with characters that break Markdown links or shells (spaces, brackets...) replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


def _md_image(out: Path, png: Path, alt: str) -> str:
    """A Markdown image link to ``png`` relative to ``out``; empty when no such file was written, so the
    report never links a figure that does not exist."""
    if not png.is_file() or png.stat().st_size == 0:
        return ""
    return f"![{alt}]({Path(os.path.relpath(png, out)).as_posix()})\n"


def pareto_section(out: Path, points: Sequence[Any]) -> str:
    """Markdown for the WER-vs-compression plot (written under ``out/figures``)."""
    from magnet_asr.evaluation.plots import pareto_figure, save_figure

    if not points:
        return ""
    png = save_figure(pareto_figure(points), out / FIGURES / "pareto.png")
    image = _md_image(out, png, "WER vs compression")
    return "## WER vs compression\n\n" + image + "\n" if image else ""


def curves_section(out: Path, runs: Sequence[Run]) -> str:
    """Markdown for the training curves read from every run's TensorBoard logs."""
    from magnet_asr.evaluation.plots import curve_panels, read_scalars, save_figure, training_curves_figure

    curves = {run.name: read_scalars(run.path) for run in runs}
    curves = {name: c for name, c in curves.items() if c}
    png = out / FIGURES / "training_curves.png"
    png.unlink(missing_ok=True)  # a figure left by an earlier build must not stand for this one
    if not curves or not curve_panels(curves):  # no logs, or no series with two points: no figure
        return ""
    save_figure(training_curves_figure(curves), png)
    image = _md_image(out, png, "training curves")
    return "## Training curves\n\n" + image + "\n" if image else ""


@dataclass
class UtteranceBoundaries:
    """What the encoder decided for one clip: its features and each predictor's segment ends, as
    encoder-stem frame indices (50 frames/s), plus the clip's true phone times when known."""

    mel: np.ndarray
    ends: list[np.ndarray]
    duration: float
    frame_seconds: float
    frames: int
    phones: list[str] | None = None
    phone_ends: list[float] | None = None

    @property
    def segments(self) -> int:
        return len(self.ends[-1]) if self.ends else self.frames

    @property
    def compression(self) -> float:
        return self.frames / max(self.segments, 1)


def load_encoder_model(checkpoint: Path) -> Any:
    """A MagnetWhisper checkpoint in eval mode on the CPU."""
    from magnet_asr.models import MagnetWhisper

    return MagnetWhisper.from_pretrained(checkpoint).eval()


def utterance_boundaries(model: Any, audio_path: str | Path, utterance: Any = None) -> UtteranceBoundaries:
    """Run ``model``'s encoder on one clip (unpadded, eval mode) and collect its segment boundaries.

    Every predictor's segment ends are mapped to encoder-stem frames (a later predictor's segment ends
    where its last frame does, :func:`~magnet_asr.evaluation.decode.stem_segment_ends`), so one frame is
    1/50 s whatever the predictor. ``utterance`` (a manifest row): its phone times, if it has them.
    """
    import math

    import numpy as np
    import torch

    from magnet_asr.audio import SAMPLE_RATE, load_audio, log_mel_spectrogram, num_encoder_frames
    from magnet_asr.evaluation.boundaries import FRAME_SECONDS
    from magnet_asr.evaluation.decode import stem_segment_ends

    audio = load_audio(audio_path)
    mel = log_mel_spectrogram(audio, n_mels=model.config.num_mel_bins)
    with torch.no_grad():
        enc = model.model.encoder(mel[None])
    outputs = enc.boundary_outputs or ()
    frames = num_encoder_frames(len(audio))
    stride = math.prod(getattr(model.config, "extra_conv_strides", None) or [1])
    ends = stem_segment_ends(outputs, [frames], stride)[0] if outputs else []
    return UtteranceBoundaries(
        mel=mel.numpy(),
        ends=[np.asarray(e, dtype=np.int64) for e in ends],
        duration=len(audio) / SAMPLE_RATE,
        frame_seconds=FRAME_SECONDS,
        frames=frames,
        phones=getattr(utterance, "phones", None),
        phone_ends=getattr(utterance, "phone_ends", None),
    )


def pick_examples(data: str | Path, count: int, split: str = "test") -> list[Any]:
    """``count`` short test utterances (at most 6 s) from the corpus ``data``: those with true phone
    times first (their plots show the phone ends), then the longest first."""
    from magnet_asr.data.corpora import resolve_data
    from magnet_asr.data.manifest import read_manifest

    utterances = read_manifest(resolve_data(data), split=split)
    short = [u for u in utterances if 0 < u.duration <= MAX_EXAMPLE_SECONDS and len(u.text.split()) >= 2]
    short.sort(key=lambda u: (u.phone_ends is None, -u.duration, u.id))
    return short[:count]


def boundaries_section(out: Path, runs: Sequence[Run], data: str | Path, count: int) -> str:
    """Markdown for segment boundaries over the log-mel spectrogram of ``count`` utterances, per
    compressed run with a checkpoint."""
    from magnet_asr.audio import AudioError
    from magnet_asr.evaluation.plots import boundary_figure, save_figure

    runs = [r for r in runs if not r.is_control and (r.checkpoint / "config.json").is_file()]
    examples = pick_examples(data, count) if runs and count > 0 else []
    parts = []
    for run in runs:
        model = load_encoder_model(run.checkpoint)
        if not model.config.predictor_layers:
            continue
        parts.append(f"### {run.name}\n\n")
        for utt in examples:
            try:
                b = utterance_boundaries(model, utt.audio, utt)
            except AudioError as e:
                parts.append(f"- {utt.id}: skipped ({e})\n")
                continue
            title = (
                f"{run.name} · {utt.id} · {b.duration:.2f} s · {b.segments} segments"
                f" · compression {b.compression:.2f}x"
            )
            fig = boundary_figure(
                b.mel,
                b.ends,
                utt.text.split(),
                b.duration,
                b.frame_seconds,
                title,
                phones=b.phones,
                phone_ends=b.phone_ends,
            )
            png = save_figure(fig, out / FIGURES / _file_name(f"boundaries_{run.name}_{utt.id}.png"))
            image = _md_image(out, png, f"boundaries {run.name} {utt.id}")
            parts.append(image + "\n" if image else f"- {utt.id}: figure not written\n")
    if not parts:
        return ""
    return (
        "## Segment boundaries\n\nLines mark segment ends predicted by the encoder (eval mode); where the "
        "corpus has true phone times (flite), green ticks under the spectrogram mark the phone ends.\n\n"
        + "".join(parts)
    )


def _flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys; lists become their JSON text; ``|`` is escaped for Markdown."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            value = json.dumps(value) if isinstance(value, list) else value
            flat[name] = value.replace("|", "\\|") if isinstance(value, str) else value
    return flat


def _variant_key(row: dict[str, Any]) -> str | None:
    """The field of ``row`` shaped ``{variant: {metric: value}}``, if any."""
    return next(
        (
            k
            for k, v in row.items()
            if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values())
        ),
        None,
    )


def _split_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Benchmark rows as (main, extra) table rows: a ``{variant: {metric: value}}`` field becomes one
    main row per variant; the row's other nested fields (e.g. ratios) go to one extra row per input row."""
    main, extra = [], []
    for row in rows:
        key = _variant_key(row)
        if key is None:
            main.append(_flatten(row))
            continue
        scalars = {k: v for k, v in row.items() if not isinstance(v, dict)}
        main += [_flatten({**scalars, key: name, **metrics}) for name, metrics in row[key].items()]
        nested = {k: v for k, v in row.items() if isinstance(v, dict) and k != key}
        if nested:
            extra.append(_flatten({**scalars, **nested}))
    return main, extra


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def benchmark_markdown(data: dict[str, Any], name: str) -> str:
    """One benchmark JSON as Markdown: its scalar settings as a list, each list of row dicts as a table."""
    title = data.get("benchmark") or data.get("name") or name
    lines = [f"### {title}\n", f"`{name}`\n"]
    settings = {
        k: v for k, v in data.items() if not isinstance(v, dict | list) and k not in ("benchmark", "name")
    }
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            main, extra = _split_rows(value)
            lines.append(f"\n**{key}**\n\n" + markdown_table(main, _columns(main)))
            if extra:
                lines.append(markdown_table(extra, _columns(extra)))
        elif isinstance(value, dict) and value:
            flat = _flatten(value)
            lines.append(f"\n**{key}**\n\n" + markdown_table([flat], list(flat)))
    return "\n".join(lines) + "\n"


def benchmark_section(results_dir: Path) -> str:
    """Markdown for every ``*.json`` under ``results_dir`` (unreadable files are named, not fatal)."""
    files = sorted(Path(results_dir).glob("*.json")) if Path(results_dir).is_dir() else []
    parts = []
    for path in files:
        data = _read_json(path)
        parts.append(benchmark_markdown(data, path.name) if data else f"- `{path.name}`: not a JSON object\n")
    return "## Benchmarks\n\n" + "\n".join(parts) if parts else ""


def build_report(
    run_dirs: Sequence[Path],
    out: Path,
    data: str | Path | None = None,
    references: Sequence[Path] = (),
    benchmarks_dir: Path | None = Path("benchmarks/results"),
    num_examples: int = 3,
    title: str = "magnet-asr report",
) -> Path:
    """Write ``out/report.md`` (plus ``out/results.json`` and PNGs under ``out/figures``); return the
    Markdown path. ``data``: corpus for the boundary plots (default: the first run's first test corpus)."""
    run_dirs = expand_run_dirs([Path(d) for d in run_dirs])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in (load_run(d) for d in run_dirs) if r is not None]
    refs = find_references(run_dirs, [Path(r) for r in references])
    if data is None and runs:
        data = next(iter(runs[0].tests))
    sections = [
        pareto_section(out, pareto_points(runs, refs)),
        curves_section(out, runs),
        boundaries_section(out, runs, data, num_examples) if data is not None else "",
        benchmark_section(benchmarks_dir) if benchmarks_dir is not None else "",
    ]
    notes = "\n".join(s for s in sections if s)
    _, md_path = write_report(_results_rows(runs, refs), out, title=title, notes="\n" + notes)
    return md_path


def cmd_report(args: argparse.Namespace) -> int:
    """Handler of ``magnet-asr report``."""
    path = build_report(
        args.run_dirs,
        args.out,
        data=args.data,
        references=args.reference or [],
        benchmarks_dir=args.benchmarks,
        num_examples=args.examples,
    )
    print(f"wrote {path}")
    return 0


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``report`` on an ``argparse`` subparsers object; its handler is :func:`cmd_report`."""
    p = subparsers.add_parser("report", help="Markdown report with plots for training runs")
    p.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        help="run directories (results.json, final/, logs/) or sweep directories",
    )
    p.add_argument("--out", type=Path, default=Path("runs/report"), help="output directory")
    p.add_argument("--data", default=None, help="corpus for the boundary plots (default: first test corpus)")
    p.add_argument("--reference", type=Path, action="append", help="zero-shot evaluation JSON (repeatable)")
    p.add_argument("--benchmarks", type=Path, default=Path("benchmarks/results"), help="benchmark JSON dir")
    p.add_argument("--examples", type=int, default=3, help="utterances per run in the boundary plots")
    p.set_defaults(func=cmd_report)
    return p
