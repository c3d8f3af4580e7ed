"""Monitoring: batch boundary summaries computed by hand, and train vs eval boundary rates."""

from __future__ import annotations

import math

import pytest
import torch

from magnet_asr.compression import (
    BoundaryPredictor,
    BoundaryPredictorConfig,
    boundary_rates,
    segment_lengths,
    summarize_boundaries,
    summarize_output,
)


def test_summary_by_hand() -> None:
    boundaries = torch.tensor([[0.0, 1, 1, 0, 0, 0, 1, 0], [1.0, 0, 0, 0, 1, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0]])
    # sample 0: segments [0,1] [2] [3..6] [7] -> lengths 2, 1, 4, 1 (last frame forced)
    # sample 1: [0] [1..3] (padding boundaries ignored, frame 3 forced) -> lengths 1, 3
    assert segment_lengths(boundaries, mask).tolist() == [2, 1, 4, 1, 1, 3]
    stats = summarize_boundaries(boundaries, mask, prefix="enc/")
    lengths = torch.tensor([2.0, 1, 4, 1, 1, 3])
    assert stats["enc/frames"] == 12 and stats["enc/segments"] == 6
    assert stats["enc/compression_ratio"] == pytest.approx(2.0)
    assert stats["enc/boundary_rate"] == pytest.approx(0.5)
    # adjacent pairs: frames (1,2) and (6,7) of sample 0 -> 2 of 6 boundaries
    assert stats["enc/adjacent_share"] == pytest.approx(2 / 6)
    assert stats["enc/segment_length_mean"] == pytest.approx(2.0)
    assert stats["enc/segment_length_cv"] == pytest.approx(float(lengths.std(unbiased=False) / 2.0))


def test_collapse_signatures() -> None:
    mask = torch.ones(2, 10)
    none = summarize_boundaries(torch.zeros(2, 10), mask)
    assert none["compression_ratio"] == 10 and none["segment_length_cv"] == 0.0
    every = summarize_boundaries(torch.ones(2, 10), mask)
    assert every["compression_ratio"] == 1 and every["adjacent_share"] == pytest.approx(18 / 20)


def test_train_and_eval_rates_differ_as_designed() -> None:
    probs = torch.tensor([[0.3, 0.3, 0.3, 0.9, 1.0], [0.3, 0.6, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    rates = boundary_rates(probs, mask)
    assert rates["train_rate"] == pytest.approx((2.8 + 1.9) / 8)  # mean p over real frames
    assert rates["eval_rate"] == pytest.approx(4 / 8)
    assert boundary_rates(probs, mask, train_sampling="threshold")["train_rate"] == rates["eval_rate"]


def test_summarize_output_of_a_predictor() -> None:
    torch.manual_seed(0)
    model = BoundaryPredictor(BoundaryPredictorConfig(hidden_size=6, prior=0.3)).train()
    hidden = torch.randn(3, 50, 6)
    mask = (torch.arange(50).unsqueeze(0) < torch.tensor([[50], [20], [7]])).long()
    out = model(hidden, mask)
    stats = summarize_output(out)
    assert stats["segments"] == float(out.num_boundaries.sum())
    assert stats["frames"] == 77
    assert stats["eval_rate"] == pytest.approx(3 / 77)  # p ~ 0.3 < 0.5: only the forced boundaries
    assert stats["train_rate"] == pytest.approx((0.3 * 74 + 3) / 77, abs=0.01)
    assert math.isclose(stats["compression_ratio"] * stats["boundary_rate"], 1.0)
