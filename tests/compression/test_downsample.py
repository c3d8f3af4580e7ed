"""downsample / upsample: equality with the definitions, padding, dtypes, and both gradients."""

from __future__ import annotations

import pytest
import torch

from magnet_asr.compression import downsample, segment_plan, upsample
from magnet_asr.compression.reference import downsample_loop, downsample_membership


def random_case(
    seed: int, batch: int = 5, length: int = 37, dim: int = 6, rate: float = 0.25, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random frames, boundaries (also on padding, which must be ignored) and right-padded masks."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=gen).to(dtype)
    boundaries = (torch.rand(batch, length, generator=gen) < rate).float()
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length  # one full-length sample
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return hidden, boundaries, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(dtype: torch.dtype, seed: int) -> None:
    hidden, boundaries, mask = random_case(seed, dtype=dtype)
    pooled, pooled_mask = downsample(hidden, boundaries, mask)
    expected, expected_mask = downsample_loop(hidden, boundaries, mask)
    assert pooled.dtype == dtype
    assert pooled.shape == expected.shape
    assert torch.equal(pooled_mask, expected_mask)
    # fp32 accumulation + one rounding: at most one unit in the last place of the output dtype.
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(pooled.float(), expected.float(), atol=tol, rtol=tol)


def test_low_precision_accumulates_in_fp32() -> None:
    # A 4096-frame segment of values near 3: summing in bf16 would lose everything past ~256 terms.
    gen = torch.Generator().manual_seed(0)
    hidden = (3 + torch.randn(1, 4096, 8, generator=gen)).to(torch.bfloat16)
    pooled, _ = downsample(hidden, torch.zeros(1, 4096), None)
    exact = hidden.double().mean(dim=1)
    assert (pooled.double() - exact).abs().max() <= exact.abs().max() * 2**-8


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_low_precision_gradients_track_fp32(dtype: torch.dtype, tol: float) -> None:
    hidden, boundaries, mask = random_case(11, dim=16)
    grad_out = torch.randn(hidden.shape[0], hidden.shape[1], 16, generator=torch.Generator().manual_seed(3))
    grads = {}
    for dt in (torch.float32, dtype):
        h = hidden.detach().clone().to(dt).requires_grad_(True)
        b = boundaries.clone().requires_grad_(True)
        pooled, _ = downsample(h, b, mask)
        pooled.backward(grad_out[:, : pooled.shape[1]].to(dt))
        assert h.grad.dtype == dt and b.grad.dtype == torch.float32
        grads[dt] = (h.grad.float(), b.grad)
    for low, high in zip(grads[dtype], grads[torch.float32]):
        assert (low - high).abs().max() <= tol * high.abs().max()


def test_all_ones_return_the_input_and_all_zeros_one_mean() -> None:
    hidden, _, mask = random_case(3)
    real = mask.bool()
    pooled, pooled_mask = downsample(hidden, torch.ones(mask.shape), mask)
    assert torch.equal(pooled_mask, mask)
    assert torch.equal(pooled, hidden * mask.unsqueeze(-1))

    pooled, pooled_mask = downsample(hidden, torch.zeros(mask.shape), mask)
    assert pooled.shape == (hidden.shape[0], 1, hidden.shape[2])
    assert torch.equal(pooled_mask, torch.ones(hidden.shape[0], 1, dtype=torch.long))
    means = (hidden * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True)
    torch.testing.assert_close(pooled[:, 0], means)


def test_padding_never_changes_any_output_or_gradient() -> None:
    hidden, boundaries, mask = random_case(4)
    real = mask.bool()
    garbage = hidden.clone()
    garbage[~real] = float("nan")  # NaN padding would poison any sum that touched it
    flipped = torch.where(real, boundaries, 1 - boundaries)  # boundaries on padding must be ignored
    outs = []
    for h, b in ((hidden, boundaries), (garbage, flipped)):
        h = h.clone().requires_grad_(True)
        b = b.clone().requires_grad_(True)
        pooled, pooled_mask = downsample(h, b, mask)
        gen = torch.Generator().manual_seed(9)
        pooled.backward(torch.randn(pooled.shape, generator=gen))
        outs.append((pooled, pooled_mask, h.grad, b.grad))
    (p1, m1, gh1, gb1), (p2, m2, gh2, gb2) = outs
    assert torch.equal(p1, p2) and torch.equal(m1, m2)
    assert torch.equal(gh1, gh2) and torch.equal(gb1, gb2)
    assert torch.all(gh2[~real] == 0) and torch.all(gb2[~real] == 0)
    assert not torch.isnan(gh2).any()


def test_each_sample_alone_equals_the_padded_batch() -> None:
    hidden, boundaries, mask = random_case(5)
    pooled, pooled_mask = downsample(hidden, boundaries, mask)
    for i in range(hidden.shape[0]):
        n = int(mask[i].sum())
        alone, alone_mask = downsample(hidden[i : i + 1, :n], boundaries[i : i + 1, :n], None)
        s = alone.shape[1]
        assert torch.equal(alone[0], pooled[i, :s])
        assert int(pooled_mask[i].sum()) == s
        assert torch.all(pooled[i, s:] == 0)


def test_rows_past_the_last_segment_are_zero_and_counts_follow_the_convention() -> None:
    hidden = torch.arange(2 * 6 * 1, dtype=torch.float32).view(2, 6, 1)
    boundaries = torch.tensor([[0, 1, 0, 0, 1, 0], [1, 0, 1, 1, 0, 0]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    pooled, pooled_mask = downsample(hidden, boundaries, mask)
    # sample 0: [0,1] [2,3,4] [5] (trailing frames form a final segment); sample 1: [6] [7,8]
    assert pooled_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert pooled[..., 0].tolist() == [[0.5, 3.0, 5.0], [6.0, 7.5, 0.0]]


def test_all_padding_sample_gets_no_segment() -> None:
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    pooled, pooled_mask = downsample(hidden, torch.zeros(2, 4), mask)
    assert pooled_mask.tolist() == [[1], [0]]
    assert torch.all(pooled[1] == 0)


def test_gradcheck_hidden_float64() -> None:
    hidden, boundaries, mask = random_case(6, batch=3, length=11, dim=3, dtype=torch.float64)
    hidden.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h: downsample(h, boundaries, mask)[0], (hidden,))


@pytest.mark.parametrize("seed", [0, 1])
def test_boundary_gradient_equals_membership_matrix_autograd(seed: int) -> None:
    hidden, boundaries, mask = random_case(seed, dtype=torch.float64)
    grads = []
    for pool in (downsample, downsample_membership):
        h = hidden.clone().requires_grad_(True)
        b = boundaries.clone().double().requires_grad_(True)
        pooled, _ = pool(h, b, mask)
        gen = torch.Generator().manual_seed(seed + 10)
        pooled.backward(torch.randn(pooled.shape, generator=gen, dtype=torch.float64))
        grads.append((pooled.detach(), h.grad, b.grad))
    (p1, gh1, gb1), (p2, gh2, gb2) = grads
    # The membership reference adds 1e-9 to each segment's weight sum (as DTP does).
    torch.testing.assert_close(p1, p2, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(gh1, gh2, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(gb1, gb2, atol=1e-8, rtol=1e-8)
    assert gb1.abs().max() > 1e-3  # the boundaries really receive a gradient


def test_boundary_gradient_follows_its_formula() -> None:
    # One segment [h0, h1, h2] pooled to p; loss = g · p. e_l = g·(h_l - p)/3; dL/db_0 = e_1 + e_2.
    hidden = torch.tensor([[[1.0], [2.0], [6.0]]], dtype=torch.float64)
    b = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    pooled, _ = downsample(hidden, b, None)
    (pooled.sum() * 2.0).backward()
    e = 2.0 * (hidden[0, :, 0] - 3.0) / 3
    assert b.grad[0].tolist() == pytest.approx([float(e[1] + e[2]), float(e[2]), 0.0])


def test_straight_through_values_count_as_boundaries() -> None:
    hidden, boundaries, mask = random_case(7)
    soft = torch.rand(boundaries.shape, requires_grad=True)
    ste = boundaries + (soft - soft.detach())
    pooled, _ = downsample(hidden, ste, mask)
    expected, _ = downsample(hidden, boundaries, mask)
    assert torch.equal(pooled, expected)
    pooled.sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0


def test_upsample_inverts_downsample_on_piecewise_constant_frames() -> None:
    hidden, boundaries, mask = random_case(8)
    pooled, _ = downsample(hidden, boundaries, mask)
    frames = upsample(pooled, boundaries, mask)
    again, _ = downsample(frames, boundaries, mask)
    torch.testing.assert_close(again, pooled)
    assert torch.all(frames[~mask.bool()] == 0)
    plan = segment_plan(boundaries, mask)
    # every real frame carries its own segment's vector
    flat = frames.reshape(-1, frames.shape[-1])[plan.real_index]
    torch.testing.assert_close(flat, pooled.reshape(-1, pooled.shape[-1])[plan.real_bag])


def test_upsample_gradient_sums_frames_per_segment() -> None:
    boundaries = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    pooled = torch.zeros(1, 2, 1, requires_grad=True)
    upsample(pooled, boundaries, mask).sum().backward()
    assert pooled.grad[0, :, 0].tolist() == [2.0, 2.0]


def test_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="hidden must be"):
        downsample(torch.zeros(3, 4), torch.zeros(3, 4), None)
    with pytest.raises(ValueError, match="do not match"):
        downsample(torch.zeros(2, 4, 3), torch.zeros(2, 5), None)
    with pytest.raises(ValueError, match="mask has shape"):
        downsample(torch.zeros(2, 4, 3), torch.zeros(2, 4), torch.ones(2, 3))
