"""Boundary losses: values pinned on hand-computed cases, and gradients that move counts to targets."""

from __future__ import annotations

import math

import pytest
import torch

from magnet_asr.compression import binomial_count_loss, ratio_loss, repulsion_loss


def test_binomial_value_by_hand() -> None:
    b = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # the padded boundary must not count
    # Both samples: k=2 of n=4 and of n=3 at p=1/2 -> pmf 6/16 and 3/8; per position: / (4 + 3).
    expected = -(math.log(6 / 16) + math.log(3 / 8)) / 7
    assert binomial_count_loss(b, mask, prior=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_binomial_with_per_sample_target_counts_by_hand() -> None:
    b = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # target 1 of 4 frames -> p = 1/4; k = 2: C(4,2) (1/4)^2 (3/4)^2
    expected = -math.log(6 * (1 / 16) * (9 / 16)) / 4
    loss = binomial_count_loss(b, None, target_counts=torch.tensor([1.0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # target counts override the prior
    assert binomial_count_loss(b, None, prior=0.5, target_counts=torch.tensor([1.0])).item() == pytest.approx(
        expected, rel=1e-6
    )


@pytest.mark.parametrize("start, target", [(-3.0, 12.0), (3.0, 6.0)])
def test_binomial_gradient_moves_the_count_to_the_target(start: float, target: float) -> None:
    torch.manual_seed(0)
    logits = torch.full((2, 40), start, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    targets = torch.tensor([target, target])
    first = torch.sigmoid(logits).sum(1).detach()
    for _ in range(300):
        loss = binomial_count_loss(torch.sigmoid(logits), None, target_counts=targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = torch.sigmoid(logits).sum(1).detach()
    assert torch.all((first - target).abs() > 10)
    # The binomial mode is floor((n+1) p), within one of the target.
    assert torch.all((final - target).abs() < 1.0), final


def test_binomial_gradient_sign() -> None:
    b = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]], requires_grad=True)
    binomial_count_loss(b, None, prior=0.2).backward()  # k = 5 > n p = 2
    assert torch.all(b.grad > 0)
    b2 = torch.zeros(1, 10, requires_grad=True)
    binomial_count_loss(b2, None, prior=0.5).backward()  # k = 0 < 5
    assert torch.all(b2.grad < 0)


def test_ratio_value_by_hand() -> None:
    b = torch.tensor([[1.0, 0, 0, 0, 1, 0, 0, 0, 0, 0]])
    probs = torch.full((1, 10), 0.3)
    # N = 4, F = 0.2, G = 0.3: 4/3 (3 * 0.2 * 0.3 + 0.8 * 0.7)
    assert ratio_loss(b, probs, None, prior=0.25).item() == pytest.approx(4 / 3 * (0.18 + 0.56), rel=1e-6)
    # At F = G = 1/N the loss is exactly 1 (H-Net's normalization).
    b = torch.tensor([[1.0, 0, 0, 0]])
    assert ratio_loss(b, torch.full((1, 4), 0.25), None, prior=0.25).item() == pytest.approx(1.0, rel=1e-6)


def test_ratio_per_sample_weighting_and_padding() -> None:
    b = torch.tensor([[1.0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0]])
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.9, 0.9]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    first = 1.0  # F = G = 1/4 at N = 4
    second = 4 / 3 * (3 * 1.0 * 0.5 + 0.0)  # F = 1, G = 0.5 over its 2 real frames
    expected = (4 * first + 2 * second) / 6
    assert ratio_loss(b, probs, mask, prior=0.25).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("selected, sign", [(5, 1.0), (1, -1.0)])
def test_ratio_gradient_pushes_probabilities_toward_the_rate(selected: int, sign: float) -> None:
    b = torch.zeros(1, 20)
    b[0, :selected] = 1.0  # F = 0.25 or 0.05 against 1/N = 0.1
    probs = torch.full((1, 20), 0.2, requires_grad=True)
    ratio_loss(b, probs, None, prior=0.1).backward()
    assert torch.all(probs.grad * sign > 0)  # too many -> lower p; too few -> raise p


def test_repulsion_value_by_hand() -> None:
    b = torch.tensor([[1.0, 1, 0, 1, 0, 0, 1, 1, 1, 0]])
    assert repulsion_loss(b, None, distance=2).item() == pytest.approx(3 / 10)  # (0,1) (6,7) (7,8)
    assert repulsion_loss(b, None, distance=3).item() == pytest.approx(5 / 10)  # + (1,3) (6,8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
    assert repulsion_loss(b, mask, distance=2).item() == pytest.approx(1 / 7)  # only (0,1) is real


def test_repulsion_gradient_pushes_only_crowded_boundaries() -> None:
    b = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]], requires_grad=True)
    repulsion_loss(b, None, distance=2).backward()
    assert b.grad[0, 0] > 0 and b.grad[0, 1] > 0
    assert b.grad[0, 5] == 0  # isolated: left alone
    # The crowded pair's count drops under gradient descent; the isolated one stays.
    with torch.no_grad():
        stepped = b - 10 * b.grad
    assert stepped[0, :2].sum() < 2 and stepped[0, 5] == 1


def test_losses_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="distance"):
        repulsion_loss(torch.zeros(1, 4), None, distance=1)
    with pytest.raises(ValueError, match="prior"):
        binomial_count_loss(torch.zeros(1, 4), None)
    with pytest.raises(ValueError, match="do not match"):
        ratio_loss(torch.zeros(1, 4), torch.zeros(1, 5), None, prior=0.2)


def test_phone_boundary_loss_counts_only_known_free_positions() -> None:
    from magnet_asr.compression import phone_boundary_loss

    logits = torch.tensor([[4.0, -4.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])  # row 2: no phone times
    free = torch.tensor([[True, True, True, False], [True, True, True, False]])  # last frame forced
    loss = phone_boundary_loss(logits, targets, free)
    # known & free: (0, 0) right, (0, 1) right, (0, 2) wrong, each BCE with logits 4
    expected = (2 * math.log1p(math.exp(-4.0)) + math.log1p(math.exp(4.0))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad is not None and logits.grad[1].abs().sum() == 0 and logits.grad[0, 3] == 0
    nothing = phone_boundary_loss(logits, torch.full_like(targets, -1.0), free)
    assert nothing.item() == 0.0 and nothing.requires_grad
    with pytest.raises(ValueError, match="differ"):
        phone_boundary_loss(logits, targets[:, :3], free)
