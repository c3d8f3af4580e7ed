"""AudioProjector: exact output lengths from the mask, padding invariance, output scale."""

from __future__ import annotations

import pytest
import torch

from magnet_asr.models.projector import AudioProjector, embedding_rms, stack_frames, stacked_lengths


def test_stacked_lengths_round_up():
    lengths = torch.tensor([0, 1, 3, 4, 5, 8, 9])
    assert stacked_lengths(lengths, 4).tolist() == [0, 1, 1, 1, 2, 2, 3]
    assert stacked_lengths(lengths, 1).tolist() == lengths.tolist()


def test_stack_frames_concatenates_consecutive_frames_and_zero_fills_the_last_group():
    hidden = torch.arange(1, 15, dtype=torch.float32).reshape(1, 7, 2)
    stacked, mask = stack_frames(hidden, None, 3)
    assert stacked.shape == (1, 3, 6) and mask.tolist() == [[1, 1, 1]]
    assert stacked[0, 0].tolist() == [1, 2, 3, 4, 5, 6]
    assert stacked[0, 2].tolist() == [13, 14, 0, 0, 0, 0]


@pytest.mark.parametrize("stack", [1, 2, 4])
def test_output_length_comes_from_the_mask_and_padding_does_not_leak(stack):
    torch.manual_seed(0)
    projector = AudioProjector(6, 10, stack=stack, hidden_size=12).eval()
    lengths = [9, 5, 1]
    hidden = torch.randn(3, 9, 6)
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    noisy = hidden + 100.0 * (1 - mask[..., None])  # garbage in padding must not matter
    out, out_mask = projector(noisy, mask)
    assert out_mask.sum(1).tolist() == [-(-n // stack) for n in lengths]
    for i, n in enumerate(lengths):
        alone, alone_mask = projector(hidden[i : i + 1, :n])
        m = alone.shape[1]
        assert m == int(out_mask[i].sum()) and alone_mask.all()
        torch.testing.assert_close(out[i, :m], alone[0], atol=1e-5, rtol=1e-5)
        assert out[i, m:].abs().max() == 0 if m < out.shape[1] else True


def test_output_rms_starts_at_the_token_embedding_scale():
    torch.manual_seed(0)
    embeddings = torch.nn.Embedding(100, 16)
    torch.nn.init.normal_(embeddings.weight, std=0.05)
    scale = embedding_rms(embeddings)
    assert 0.04 < scale < 0.06
    projector = AudioProjector(8, 16, stack=2, hidden_size=32, output_scale=scale)
    out, _ = projector(100.0 * torch.randn(2, 10, 8))  # a large encoder output...
    rms = out.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, scale), atol=1e-3, rtol=1e-2)  # ...lands on scale


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="stack"):
        AudioProjector(4, 4, stack=0)
    with pytest.raises(ValueError, match="output_scale"):
        AudioProjector(4, 4, output_scale=0.0)


def test_gradients_reach_every_projector_parameter():
    torch.manual_seed(0)
    projector = AudioProjector(4, 6, stack=2, hidden_size=8, dropout=0.1).train()
    out, mask = projector(torch.randn(2, 5, 4), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]))
    (out * torch.randn_like(out)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
