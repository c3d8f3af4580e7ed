"""Attention pooling: starts as the mean, softmax within segments, and which gradients it passes."""

from __future__ import annotations

import torch

from magnet_asr.compression import AttentionPooling, downsample, segment_pool
from magnet_asr.compression.reference import downsample_loop, downsample_membership


def case(seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 19, 5, generator=gen, dtype=dtype)
    boundaries = (torch.rand(4, 19, generator=gen) < 0.3).to(dtype)
    mask = (torch.arange(19).unsqueeze(0) < torch.tensor([[19], [12], [3], [7]])).long()
    return hidden, boundaries, mask


def test_starts_as_the_exact_mean() -> None:
    hidden, boundaries, mask = case(0, torch.float32)
    attention = AttentionPooling(5)
    pooled, pooled_mask = attention(hidden, boundaries, mask)
    expected, expected_mask = downsample(hidden, boundaries, mask)
    torch.testing.assert_close(pooled, expected)
    assert torch.equal(pooled_mask, expected_mask)


def test_softmax_within_segments_matches_loop_reference() -> None:
    hidden, boundaries, mask = case(1)
    scores = 3 * torch.randn(
        boundaries.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    pooled, _ = segment_pool(hidden, boundaries, mask, scores=scores)
    expected, _ = downsample_loop(hidden, boundaries, mask, scores=scores)
    torch.testing.assert_close(pooled, expected)


def test_huge_scores_do_not_underflow_a_segment() -> None:
    # A sample-wide max would give exp(-1000) = 0 for the first segment and 0/0 = NaN there.
    hidden = torch.randn(1, 4, 2)
    boundaries = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    scores = torch.tensor([[0.0, 0.0, 1000.0, 0.0]])
    pooled, _ = segment_pool(hidden, boundaries, None, scores=scores)
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled[0, 0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[0, 1], hidden[0, 2])


def test_gradients_equal_weighted_membership_autograd() -> None:
    hidden, boundaries, mask = case(3)
    scores = torch.randn(boundaries.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for pool in (segment_pool, downsample_membership):
        h = hidden.clone().requires_grad_(True)
        b = boundaries.clone().requires_grad_(True)
        z = scores.clone().requires_grad_(True)
        pooled, _ = pool(h, b, mask, scores=z)
        pooled.backward(
            torch.randn(pooled.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        )
        results.append((h.grad, b.grad, z.grad))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)


def test_gradcheck_hidden_and_scores() -> None:
    hidden, boundaries, mask = case(6)
    hidden = hidden[:, :9, :3].clone().requires_grad_(True)
    boundaries, mask = boundaries[:, :9], mask[:, :9]
    scores = torch.randn(boundaries.shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, z: segment_pool(h, boundaries, mask, scores=z)[0], (hidden, scores)
    )


def test_task_gradient_reaches_boundaries_and_query() -> None:
    # The known trap: membership by an equality test passes no task gradient to the predictor.
    # Here the boundaries get the straight-through cumulative-sum gradient and the query its own.
    hidden, boundaries, mask = case(7, torch.float32)
    attention = AttentionPooling(5)
    b = boundaries.clone().requires_grad_(True)
    pooled, _ = attention(hidden, b, mask)
    (pooled**2).sum().backward()
    assert b.grad.abs().sum() > 1e-3
    assert attention.query.grad.abs().sum() > 1e-3
    assert torch.all(b.grad[~mask.bool()] == 0)


def test_learned_query_moves_pooling_toward_high_scoring_frames() -> None:
    hidden = torch.zeros(1, 4, 2)
    hidden[0, :, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    attention = AttentionPooling(2)
    with torch.no_grad():
        attention.query.copy_(torch.tensor([10.0, 0.0]))
    pooled, _ = attention(hidden, torch.zeros(1, 4), None)
    assert pooled[0, 0, 0] > 0.9  # the mean would be 0
