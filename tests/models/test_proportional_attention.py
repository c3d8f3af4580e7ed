"""Proportional attention: a pooled segment of n identical frames is read as those n frames were."""

from __future__ import annotations

import torch

from magnet_asr.models import MagnetWhisper, MagnetWhisperConfig
from magnet_asr.models.encoder import segment_sizes
from tiny import TINY_WHISPER


def _model(**settings) -> MagnetWhisper:
    torch.manual_seed(0)
    return MagnetWhisper(MagnetWhisperConfig(**TINY_WHISPER, **settings)).eval()


def test_segment_sizes_sum_real_frames_per_segment():
    boundaries = torch.tensor([[0, 1, 0, 0, 1, 1], [1, 0, 1, 0, 0, 0]], dtype=torch.float)
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    sizes = segment_sizes(torch.ones(2, 6), boundaries, real, num_segments=3)
    assert sizes.tolist() == [[2.0, 3.0, 1.0], [1.0, 2.0, 0.0]]
    nested = segment_sizes(sizes, torch.tensor([[0.0, 1, 1], [0, 1, 0]]), sizes > 0, num_segments=2)
    assert nested.tolist() == [[5.0, 1.0], [3.0, 0.0]]


def test_cross_attention_over_segments_of_identical_frames_equals_attention_over_the_frames():
    model = _model(proportional_attention=True)
    decoder = model.model.decoder
    torch.manual_seed(1)
    segments = torch.randn(1, 3, TINY_WHISPER["d_model"])
    repeats = torch.tensor([2, 4, 1])
    frames = segments.repeat_interleave(repeats, dim=1)  # (1, 7, D): each segment's frames alike
    ids = torch.tensor([[1, 5, 6, 7]])
    full = decoder(input_ids=ids, encoder_hidden_states=frames, encoder_attention_mask=torch.ones(1, 7))
    pooled = decoder(
        input_ids=ids,
        encoder_hidden_states=segments,
        encoder_attention_mask=torch.ones(1, 3),
        encoder_segment_sizes=repeats[None].float(),
    )
    torch.testing.assert_close(pooled.last_hidden_state, full.last_hidden_state, atol=1e-5, rtol=1e-5)
    plain = _model(proportional_attention=False).model.decoder(
        input_ids=ids,
        encoder_hidden_states=segments,
        encoder_attention_mask=torch.ones(1, 3),
        encoder_segment_sizes=repeats[None].float(),
    )
    assert not torch.allclose(plain.last_hidden_state, full.last_hidden_state, atol=1e-3)


def test_encoder_reports_sizes_and_generation_uses_them():
    settings = {"variant": "uniform", "prior": 0.25, "loss": [], "target": "fixed"}
    model = _model(predictor_layers=[1], predictor_settings=settings, proportional_attention=True)
    features = torch.randn(2, TINY_WHISPER["num_mel_bins"], 64)
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, 40:] = 0
    out = model.encode(features, mask)
    assert out.segment_sizes.sum(1).tolist() == out.frames_before.float().tolist()
    assert (out.segment_sizes[out.encoder_attention_mask == 0] == 0).all()
    alone = model.generate(
        input_features=features[1:, :, :40], attention_mask=mask[1:, :40], max_new_tokens=5
    )
    batched = model.generate(input_features=features, attention_mask=mask, max_new_tokens=5)
    assert alone[0].tolist() == batched[1, : alone.shape[1]].tolist()
