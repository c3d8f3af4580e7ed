"""The fixed-rate control: a parameter-free predictor with evenly spaced boundaries."""

from __future__ import annotations

import pytest
import torch

from magnet_asr.compression import BoundaryPredictor, BoundaryPredictorConfig
from magnet_asr.compression.predictor import uniform_boundaries


def test_uniform_boundaries_are_evenly_spaced_and_hit_the_rate():
    real = torch.zeros(3, 12, dtype=torch.bool)
    real[0, :12], real[1, :7], real[2, :1] = True, True, True
    b = uniform_boundaries(real, rate=1 / 3)
    assert b[0].nonzero().flatten().tolist() == [2, 5, 8, 11]
    assert b[1].sum() == 2 and b[1, 6] == 1 and b[1, 7:].sum() == 0  # round(7/3) = 2, last real frame ends
    assert b[2].nonzero().flatten().tolist() == [0]
    lengths = torch.diff(torch.cat([torch.tensor([-1]), b[1].nonzero().flatten()]))
    assert lengths.max() - lengths.min() <= 1


@pytest.mark.parametrize("training", [True, False])
def test_uniform_predictor_pools_the_same_in_training_and_eval(training):
    predictor = BoundaryPredictor(
        BoundaryPredictorConfig(hidden_size=8, variant="uniform", prior=0.25, loss=())
    ).train(training)
    assert not list(predictor.parameters())
    hidden = torch.randn(2, 16, 8, requires_grad=True)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    out = predictor(hidden, mask)
    assert out.num_boundaries.tolist() == [4, 2]  # round(16/4), round(10/4) = 2 (banker's rounding of 2.5)
    assert torch.allclose(out.pooled[0, 0], hidden[0, :4].mean(0))
    out.pooled.sum().backward()
    assert hidden.grad is not None and hidden.grad[1, 10:].abs().sum() == 0
    with pytest.raises(ValueError, match="nothing to sample"):
        predictor.sample(hidden, mask, num_samples=2)


def test_magnet_whisper_with_a_uniform_predictor_saves_reloads_and_compresses(tmp_path):
    from magnet_asr.models import MagnetWhisper, MagnetWhisperConfig
    from tiny import TINY_WHISPER

    settings = {"variant": "uniform", "prior": 1 / 3, "loss": [], "target": "fixed"}
    model = MagnetWhisper(
        MagnetWhisperConfig(**TINY_WHISPER, predictor_layers=[1], predictor_settings=settings)
    )
    model.save_pretrained(tmp_path)
    reloaded = MagnetWhisper.from_pretrained(tmp_path).eval()
    features, mask = torch.randn(2, 8, 60), torch.ones(2, 60, dtype=torch.long)
    mask[1, 30:] = 0
    out = reloaded.encode(features, mask)
    assert out.frames_before.tolist() == [30, 15] and out.frames_after.tolist() == [10, 5]
