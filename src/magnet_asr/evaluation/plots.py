"""Figures for the report: segment boundaries over a log-mel spectrogram (with the true phone ends where the
corpus has them), WER vs compression, training curves.

Every function returns a :class:`matplotlib.figure.Figure` (Agg backend, no display needed) so callers and
tests can inspect it before :func:`save_figure` writes the PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from magnet_asr.audio import FRAMES_PER_SECOND  # noqa: E402

SEGMENT_GID = "segment-end"  # the gid of every segment line in a boundary figure (tests count them)
PHONE_GID = "phone-end"  # the gid of every true phone-end tick in a boundary figure
PHONE_COLOR = "#00c853"
PREDICTOR_COLORS = ("#ffffff", "#ff4081", "#00e5ff", "#ffd600")
KIND_STYLE = {
    "compressed": {"color": "#1f77b4", "marker": "o"},
    "control": {"color": "#2ca02c", "marker": "s"},
    "zero-shot": {"color": "#d62728", "marker": "*"},
}
CORPUS_MARKERS = ("o", "^", "D", "v", "P", "X")
CURVE_PANELS = (
    ("loss", ("train/loss",)),
    ("ASR loss", ("train/asr_loss",)),
    ("boundary loss", ("train/boundary_loss", "train/grpo_boundary_loss")),
    ("compression ratio (train)", ("train/compression",)),
    ("WER (eval)", ("eval/wer",)),
    ("compression ratio (eval)", ("eval/compression",)),
)

Curve = tuple[list[float], list[float]]


@dataclass
class ParetoPoint:
    """One model on one corpus: a point of the WER-vs-compression plot."""

    label: str
    corpus: str
    wer: float
    compression: float
    kind: str = "compressed"  # "compressed", "control" or "zero-shot"


def segment_ends(boundaries: Sequence[int] | np.ndarray) -> np.ndarray:
    """Frame indices ``t`` with ``boundaries[t] == 1`` (the last frame of each segment)."""
    return np.flatnonzero(np.asarray(boundaries) > 0.5)


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (parents created) and close it; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def _draw_words(ax: plt.Axes, words: Sequence[str], duration: float) -> None:
    """Words spread evenly over ``[0, duration]`` on two staggered rows so neighbours do not overlap."""
    ax.set_xlim(0, duration)
    ax.set_ylim(0, 1)
    ax.axis("off")
    if not words:
        return
    step = duration / len(words)
    size = 10 if len(words) <= 12 else 8
    for i, word in enumerate(words):
        y = 0.7 if i % 2 == 0 else 0.25
        ax.text((i + 0.5) * step, y, word, ha="center", va="center", fontsize=size)


def _draw_phones(ax: plt.Axes, phones: Sequence[str], phone_ends: Sequence[float], duration: float) -> None:
    """True phones on a time axis: a tick at every reference boundary (the phone ends the boundary scores
    use, :func:`magnet_asr.evaluation.boundaries.reference_boundaries`) and each label centred in its phone."""
    from magnet_asr.evaluation.boundaries import SILENCE, reference_boundaries

    ax.set_xlim(0, duration)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_ylabel("phones", rotation=0, ha="right", va="center", fontsize=8)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    for t in reference_boundaries(phones, phone_ends):
        ax.plot([t, t], [0.55, 1.0], color=PHONE_COLOR, lw=1.2, gid=PHONE_GID)
    size = 8 if len(phones) <= 40 else 6
    starts = [0.0, *phone_ends[:-1]]
    for i, (label, start, end) in enumerate(zip(phones, starts, phone_ends)):
        silent = label == SILENCE
        y = 0.3 if i % 2 == 0 else 0.1  # staggered so short neighbours do not overlap
        ax.text(
            (start + end) / 2,
            y,
            label,
            ha="center",
            va="bottom",
            fontsize=size,
            color="0.55" if silent else "0.1",
        )


def boundary_figure(
    mel: np.ndarray,
    ends: Sequence[np.ndarray],
    words: Sequence[str],
    duration: float,
    frame_seconds: float,
    title: str = "",
    phones: Sequence[str] | None = None,
    phone_ends: Sequence[float] | None = None,
) -> Figure:
    """Log-mel spectrogram ``(n_mels, T)`` with a vertical line at the end of every segment.

    ``ends[i]`` holds predictor ``i``'s segment-end frame indices (see :func:`segment_ends`) on a grid of
    ``frame_seconds`` per frame; a segment ending at frame ``t`` ends at ``(t + 1) * frame_seconds``.
    With ``phones`` and ``phone_ends`` (seconds, the manifest's true phone times), a strip under the
    spectrogram ticks each true phone end (gid :data:`PHONE_GID`) and names the phones.
    """
    timed = phones is not None and phone_ends is not None and len(phones) == len(phone_ends) > 0
    width = float(np.clip(2.4 * duration, 8.0, 20.0))
    ratios = [4, 0.8, 1] if timed else [4, 1]
    fig, axes = plt.subplots(
        len(ratios),
        1,
        figsize=(width, 4.6 + (0.9 if timed else 0.0)),
        gridspec_kw={"height_ratios": ratios, "hspace": 0.05},
        sharex=True,
    )
    ax, word_ax = axes[0], axes[-1]
    n_mels, frames = mel.shape
    ax.imshow(
        mel,
        origin="lower",
        aspect="auto",
        cmap="magma",
        extent=(0.0, frames / FRAMES_PER_SECOND, 0, n_mels),
        interpolation="nearest",
    )
    for i, predictor_ends in enumerate(ends):
        color = PREDICTOR_COLORS[i % len(PREDICTOR_COLORS)]
        for j, t in enumerate(predictor_ends):
            label = f"segment end (predictor {i})" if j == 0 else None
            ax.axvline((t + 1) * frame_seconds, color=color, lw=0.9, alpha=0.85, gid=SEGMENT_GID, label=label)
    ax.set_xlim(0, duration)
    ax.set_ylabel("mel bin")
    ax.set_title(title, fontsize=11)
    if timed:
        assert phones is not None and phone_ends is not None
        _draw_phones(axes[1], phones, phone_ends, duration)
        ax.plot([], [], color=PHONE_COLOR, lw=1.2, label="true phone end (below)")
    if any(len(e) for e in ends) or timed:
        ax.legend(loc="upper right", fontsize=8, framealpha=0.6)
    _draw_words(word_ax, words, duration)
    word_ax.axis("on")
    word_ax.set_yticks([])
    word_ax.set_xlabel("time (s)    ·    words: the reference transcript spread evenly (not time-aligned)")
    for side in ("top", "right", "left"):
        word_ax.spines[side].set_visible(False)
    return fig


def _pareto_front(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """Points no other point beats on both axes (higher compression and lower WER), by compression."""
    front = [
        p
        for p in points
        if not any(
            q.compression >= p.compression
            and q.wer <= p.wer
            and (q.compression, q.wer) != (p.compression, p.wer)
            for q in points
        )
    ]
    return sorted(front, key=lambda p: p.compression)


def _label_offsets(points: Sequence[ParetoPoint], x_span: float, y_span: float) -> list[float]:
    """Vertical label offsets (points) that stack the labels of points lying close together."""
    offsets: list[float] = []
    for i, p in enumerate(points):
        near = [
            offsets[j]
            for j, q in enumerate(points[:i])
            if abs(q.compression - p.compression) < 0.06 * x_span and abs(q.wer - p.wer) < 0.04 * y_span
        ]
        offsets.append(max(near) + 11.0 if near else 4.0)
    return offsets


def pareto_figure(points: Sequence[ParetoPoint], title: str = "WER vs compression (test)") -> Figure:
    """Scatter of WER against mean compression, one marker shape per corpus, one colour per kind of model;
    every point labelled, and each corpus's Pareto front drawn as a dashed line."""
    fig, ax = plt.subplots(figsize=(9, 6))
    corpora = sorted({p.corpus for p in points})
    x_max = max((p.compression for p in points), default=1.0) * 1.25 + 0.5
    y_max = max((p.wer for p in points), default=0.0) * 1.15 + 0.02
    ordered = sorted(points, key=lambda p: (p.wer, p.compression))
    offsets = dict(zip(map(id, ordered), _label_offsets(ordered, x_max, y_max)))
    for c, corpus in enumerate(corpora):
        group = [p for p in points if p.corpus == corpus]
        marker = CORPUS_MARKERS[c % len(CORPUS_MARKERS)]
        for p in group:
            style = KIND_STYLE.get(p.kind, KIND_STYLE["compressed"])
            size = 220 if p.kind == "zero-shot" else 80
            ax.scatter(
                p.compression, p.wer, s=size, marker=marker, color=style["color"], edgecolor="k", zorder=3
            )
            ax.annotate(
                p.label,
                (p.compression, p.wer),
                xytext=(8, offsets[id(p)]),
                textcoords="offset points",
                fontsize=8,
                zorder=4,
            )
        front = _pareto_front(group)
        if len(front) > 1:
            ax.plot([p.compression for p in front], [p.wer for p in front], "--", color="0.5", lw=1, zorder=2)
    _pareto_legend(ax, corpora, {p.kind for p in points})
    ax.set_xlabel("mean compression (encoder frames / segments)")
    ax.set_ylabel("WER")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.set_xlim(0.5, x_max)
    ax.set_ylim(0, y_max)
    return fig


def _pareto_legend(ax: plt.Axes, corpora: Sequence[str], kinds: set[str]) -> None:
    """Legend entries for the corpora (marker shapes) and the kinds of model (colours)."""
    handles = [
        plt.Line2D([], [], ls="", marker=CORPUS_MARKERS[i % len(CORPUS_MARKERS)], color="0.3", label=corpus)
        for i, corpus in enumerate(corpora)
    ]
    handles += [
        plt.Line2D([], [], ls="", marker="o", color=style["color"], label=kind)
        for kind, style in KIND_STYLE.items()
        if kind in kinds
    ]
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=9)


def read_scalars(log_dir: str | Path) -> dict[str, Curve]:
    """All scalar series in the TensorBoard event files under ``log_dir``: ``tag -> (steps, values)``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, Curve] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            steps, values = curves.setdefault(tag, ([], []))
            for event in acc.Scalars(tag):
                steps.append(float(event.step))
                values.append(float(event.value))
    return curves


def _first_tag(curves: dict[str, Curve], tags: Sequence[str]) -> Curve | None:
    return next((curves[t] for t in tags if t in curves and len(curves[t][0]) > 1), None)


def curve_panels(runs: dict[str, dict[str, Curve]]) -> list[tuple[str, tuple[str, ...]]]:
    """The panels of :data:`CURVE_PANELS` that some run logged with at least two points (a line)."""
    return [(name, tags) for name, tags in CURVE_PANELS if any(_first_tag(c, tags) for c in runs.values())]


def training_curves_figure(runs: dict[str, dict[str, Curve]]) -> Figure:
    """One panel per quantity in :data:`CURVE_PANELS` that any run logged; one line per run."""
    panels = curve_panels(runs)
    columns = 3 if len(panels) > 4 else max(1, min(2, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    colors = {run: f"C{i % 10}" for i, run in enumerate(runs)}
    for ax, (name, tags) in zip(axes.flat, panels):
        for run, curves in runs.items():
            curve = _first_tag(curves, tags)
            if curve is not None:
                ax.plot(
                    curve[0],
                    curve[1],
                    label=run,
                    lw=1.4,
                    color=colors[run],
                    marker="." if len(curve[0]) < 6 else None,
                )
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[run], lw=2, label=run) for run in runs]
    fig.legend(handles=handles, loc="lower center", ncol=max(1, min(4, len(handles))), fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig
