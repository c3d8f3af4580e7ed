"""Schedules: curriculum shapes, temperature annealing, loss-weight ramp, predictor-only warm-up."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from magnet_asr.compression import BoundaryPredictor, BoundaryPredictorConfig, schedules


def test_progress_clips() -> None:
    assert schedules.progress(50, 200) == 0.25
    assert schedules.progress(300, 200) == 1.0
    assert schedules.progress(-5, 200) == 0.0
    with pytest.raises(ValueError, match="total_steps"):
        schedules.progress(1, 0)


def test_curricula_start_at_one_and_reach_the_target() -> None:
    for kind in ("linear", "cosine", "staircase"):
        assert schedules.compression_factor(0.0, 5.0, kind) == 1.0
        assert schedules.compression_factor(1.0, 5.0, kind) == 5.0
    assert schedules.compression_factor(0.5, 5.0, "linear") == 3.0
    assert schedules.compression_factor(0.25, 5.0, "cosine") == pytest.approx(
        1 + 4 * (1 - math.cos(math.pi / 4)) / 2
    )
    # 4 stairs over 5 equal spans: 0, 1/4, 1/2, 3/4, 1
    fractions = [
        schedules.curriculum_fraction(p, "staircase", num_stairs=4) for p in (0.1, 0.3, 0.5, 0.7, 0.9)
    ]
    assert fractions == [0.0, 0.25, 0.5, 0.75, 1.0]
    # ramp: the curriculum completes at 40% of training, then holds
    assert schedules.compression_factor(0.2, 5.0, "linear", ramp=0.4) == 3.0
    assert schedules.compression_factor(0.8, 5.0, "linear", ramp=0.4) == 5.0


def test_curricula_are_monotone() -> None:
    for kind in ("linear", "cosine", "staircase"):
        values = [schedules.compression_factor(i / 100, 8.0, kind) for i in range(101)]
        assert all(b >= a for a, b in zip(values, values[1:])), kind


def test_schedule_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="kind"):
        schedules.curriculum_fraction(0.5, "exponential")
    with pytest.raises(ValueError, match="progress"):
        schedules.curriculum_fraction(1.5)
    with pytest.raises(ValueError, match="target_factor"):
        schedules.compression_factor(0.5, 0.5)
    with pytest.raises(ValueError, match="positive"):
        schedules.temperature(0.5, start=0.0)


def test_temperature_annealing() -> None:
    assert schedules.temperature(0.0, 2.0, 0.2) == pytest.approx(2.0)
    assert schedules.temperature(1.0, 2.0, 0.2) == pytest.approx(0.2)
    assert schedules.temperature(0.5, 2.0, 0.2) == pytest.approx(math.sqrt(0.4))  # geometric midpoint
    assert schedules.temperature(0.5, 2.0, 0.2, kind="linear") == pytest.approx(1.1)


def test_loss_weight_ramp() -> None:
    assert schedules.loss_weight(5, 2.0, warmup_steps=100, start_step=10) == 0.0
    assert schedules.loss_weight(60, 2.0, warmup_steps=100, start_step=10) == 1.0
    assert schedules.loss_weight(500, 2.0, warmup_steps=100, start_step=10) == 2.0
    assert schedules.loss_weight(0, 2.0, warmup_steps=0) == 2.0


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.predictor = BoundaryPredictor(BoundaryPredictorConfig(hidden_size=4))


def test_freeze_all_but_predictors_and_restore() -> None:
    model = Tiny()
    assert schedules.predictor_warmup_active(0, 100) and not schedules.predictor_warmup_active(100, 100)
    saved = schedules.freeze_all_but_predictors(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("predictor.")}
    # a training step now changes only the predictor
    before = model.encoder.weight.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model.predictor(model.encoder(torch.randn(2, 6, 4)), None)
    (out.loss + out.pooled.sum()).backward()
    optimizer.step()
    assert torch.equal(model.encoder.weight, before)
    schedules.restore_requires_grad(model, saved)
    assert model.encoder.weight.requires_grad and not model.frozen.weight.requires_grad
    with pytest.raises(ValueError, match="no BoundaryPredictor"):
        schedules.freeze_all_but_predictors(nn.Linear(2, 2))
