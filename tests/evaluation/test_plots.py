"""The report's figures: built on the Agg backend, inspected before saving, written as non-empty PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from magnet_asr.evaluation.plots import (
    PHONE_GID,
    SEGMENT_GID,
    ParetoPoint,
    boundary_figure,
    pareto_figure,
    read_scalars,
    save_figure,
    segment_ends,
    training_curves_figure,
)


def _segment_lines(fig) -> list:
    return [line for ax in fig.axes for line in ax.lines if line.get_gid() == SEGMENT_GID]


def test_segment_ends_are_the_boundary_frames():
    assert segment_ends([0, 1, 0, 0, 1, 1]).tolist() == [1, 4, 5]
    assert segment_ends(np.zeros(4)).tolist() == []


def test_boundary_figure_draws_one_line_per_segment_end_in_seconds(tmp_path):
    mel = np.random.default_rng(0).normal(size=(8, 100)).astype(np.float32)  # 1 s at 100 mel frames/s
    ends = [np.array([9, 24, 49]), np.array([24, 49])]  # two predictors, 50 frames/s grid
    fig = boundary_figure(mel, ends, ["hello", "there", "world"], 1.0, 0.02, title="toy · compression 16.7x")
    lines = _segment_lines(fig)
    assert len(lines) == 5
    assert sorted(line.get_xdata()[0] for line in lines) == pytest.approx([0.2, 0.5, 0.5, 1.0, 1.0])
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert {"hello", "there", "world"} <= set(texts)
    assert fig.axes[0].get_ylabel() == "mel bin"
    assert fig.axes[1].get_xlabel().startswith("time (s)")
    png = save_figure(fig, tmp_path / "sub" / "b.png")
    assert png.stat().st_size > 1000


def test_boundary_figure_ticks_the_true_phone_ends_under_the_predicted_ones(tmp_path):
    mel = np.zeros((8, 100), dtype=np.float32)
    phones, phone_ends = ["pau", "hh", "ow", "pau", "pau"], [0.2, 0.35, 0.6, 0.8, 1.0]
    fig = boundary_figure(
        mel, [np.array([9, 29, 49])], ["oh"], 1.0, 0.02, phones=phones, phone_ends=phone_ends
    )
    assert len(fig.axes) == 3  # spectrogram, phones, words
    spectrogram, phone_ax, word_ax = fig.axes
    ticks = [line for line in phone_ax.lines if line.get_gid() == PHONE_GID]
    # every phone end but the last, and none between the two trailing pau
    assert sorted(line.get_xdata()[0] for line in ticks) == pytest.approx([0.2, 0.35, 0.6])
    assert [t.get_text() for t in phone_ax.texts] == phones
    assert phone_ax.texts[1].get_position()[0] == pytest.approx(0.275)  # centred in its phone
    assert len(_segment_lines(fig)) == 3 and not [ln for ln in spectrogram.lines if ln.get_gid() == PHONE_GID]
    assert word_ax.get_xlabel().startswith("time (s)")
    assert save_figure(fig, tmp_path / "b.png").stat().st_size > 1000
    assert len(boundary_figure(mel, [np.array([49])], ["oh"], 1.0, 0.02).axes) == 2  # no phone times


def test_pareto_figure_labels_every_point_and_draws_the_front(tmp_path):
    points = [
        ParetoPoint("ctrl", "a", 0.05, 1.0, "control"),
        ParetoPoint("zs", "a", 0.03, 1.0, "zero-shot"),
        ParetoPoint("c5", "a", 0.2, 5.0),
        ParetoPoint("c5-bad", "a", 0.3, 4.0),
        ParetoPoint("c5", "b", 0.4, 5.0),
    ]
    fig = pareto_figure(points)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == [p.label for p in points]
    fronts = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(fronts) == 1 and list(fronts[0].get_xdata()) == [1.0, 5.0]  # zs then c5; c5-bad is dominated
    assert save_figure(fig, tmp_path / "p.png").stat().st_size > 1000


def test_training_curves_from_tensorboard_logs(tmp_path):
    for run, with_boundary in (("a", True), ("b", False)):
        writer = SummaryWriter(str(tmp_path / run / "logs"))
        for step in range(1, 6):
            writer.add_scalar("train/loss", 5.0 / step, step)
            writer.add_scalar("train/compression", 1.0 + step, step)
            if with_boundary:
                writer.add_scalar("train/boundary_loss", 1.0 / step, step)
        writer.close()
    curves = {run: read_scalars(tmp_path / run) for run in ("a", "b")}
    assert curves["a"]["train/loss"][0] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert "train/boundary_loss" not in curves["b"]
    fig = training_curves_figure(curves)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["loss", "boundary loss", "compression ratio (train)"]
    boundary_ax = fig.axes[titles.index("boundary loss")]
    assert [line.get_label() for line in boundary_ax.lines] == ["a"]
    assert save_figure(fig, tmp_path / "c.png").stat().st_size > 1000
