"""Boundary losses: keep a predictor's boundary count near its target and its segments sensible.

Every loss takes ``(B, L)`` tensors plus the ``(B, L)`` real-frame mask, ignores padding, and is
normalized per valid position: per-sample terms are summed and divided by the number of real frames in
the batch, so a long utterance weighs in proportion to its frames and padding never dilutes the loss.

``boundaries`` may carry a straight-through gradient (hard 0/1 values, soft gradient), which is how the
count terms reach the predictor. Count losses keep a predictor from collapsing to no boundaries or to a
boundary on every frame (docs/architecture.md); watch both rates in the logs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .pooling import frame_mask

__all__ = [
    "LOSS_NAMES",
    "binomial_count_loss",
    "phone_boundary_loss",
    "ratio_loss",
    "repulsion_loss",
    "target_rates",
]

LOSS_NAMES = ("binomial", "ratio", "repulsion", "phones")

_EPS = 1e-6


def _real_and_counts(boundaries: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if boundaries.dim() != 2:
        raise ValueError(f"boundaries must be (B, L), got shape {tuple(boundaries.shape)}")
    real = frame_mask(mask, boundaries.shape[0], boundaries.shape[1], boundaries.device)
    realf = real.to(boundaries.dtype if boundaries.is_floating_point() else torch.float32)
    positions = realf.sum(dim=1)
    return real, realf, positions


def target_rates(
    num_positions: Tensor,
    prior: float | Tensor | None = None,
    target_counts: Tensor | None = None,
) -> Tensor:
    """Per-sample boundary rate ``(B,)``: ``target_counts / num_positions`` if counts are given, else
    ``prior``.

    Rates are clamped to ``[1e-6, 1 - 1e-6]`` so log-probabilities stay finite (a transcript with more
    phonemes than frames asks for a boundary on every frame).
    """
    if target_counts is not None:
        rates = target_counts.to(num_positions.dtype) / num_positions.clamp_min(1)
    elif prior is not None:
        rates = torch.as_tensor(prior, dtype=num_positions.dtype, device=num_positions.device)
        rates = rates.expand_as(num_positions) if rates.dim() == 0 else rates
    else:
        raise ValueError("give a prior rate or per-sample target_counts")
    if rates.shape != num_positions.shape:
        raise ValueError(f"target rates {tuple(rates.shape)} do not match batch {tuple(num_positions.shape)}")
    return rates.clamp(_EPS, 1 - _EPS)


def binomial_count_loss(
    boundaries: Tensor,
    mask: Tensor | None = None,
    prior: float | Tensor | None = None,
    target_counts: Tensor | None = None,
) -> Tensor:
    """Binomial negative log-likelihood of each sample's boundary count, per valid position.

    Dynamic token pooling (Nawrot et al., 2023, arXiv:2211.09761, Gumbel-sigmoid predictor) keeps the
    boundary count ``k = sum_t b_t`` of ``n`` positions likely under ``Binomial(n, p)`` with a prior rate
    ``p``; MAGNET (Ahia et al., 2024, arXiv:2407.08818) uses the same loss with a rate per script.
    Per-sample target counts ``k*_b`` (phonemes, syllables) give ``p_b = k*_b / n_b``. With ``lgamma``
    the count may be
    fractional, so the straight-through gradient of ``k`` flows::

        NLL_b = -[lgamma(n+1) - lgamma(k+1) - lgamma(n-k+1) + k log p + (n-k) log(1-p)]
        loss  = sum_b NLL_b / sum_b n_b

    Args:
        boundaries: ``(B, L)`` boundary indicators (hard values, optionally straight-through).
        mask: ``(B, L)`` real frames.
        prior: boundary rate (e.g. 0.2 = 5x compression), scalar or ``(B,)``.
        target_counts: ``(B,)`` per-sample target counts; overrides ``prior``.

    Returns:
        Scalar loss. ``dloss/dk_b = (digamma(k+1) - digamma(n-k+1) - logit(p)) / sum n``: positive
        above the binomial mode, negative below, so the count moves toward ``n p``.
    """
    real, realf, n = _real_and_counts(boundaries, mask)
    k = (boundaries * realf).sum(dim=1)
    p = target_rates(n, prior, target_counts)
    log_pmf = (
        torch.lgamma(n + 1)
        - torch.lgamma(k + 1)
        - torch.lgamma((n - k).clamp_min(0) + 1)
        + k * torch.log(p)
        + (n - k) * torch.log1p(-p)
    )
    return -(log_pmf * (n > 0)).sum() / n.sum().clamp_min(1)


def ratio_loss(
    boundaries: Tensor,
    probs: Tensor,
    mask: Tensor | None = None,
    prior: float | Tensor | None = None,
    target_counts: Tensor | None = None,
) -> Tensor:
    """H-Net's ratio (load-balancing) loss, per sample, weighted by real frames.

    Hwang, Wang & Gu, 2025, "Dynamic Chunking for End-to-End Hierarchical Sequence Modeling" (H-Net,
    arXiv:2507.07955), ratio loss, with target compression ratio ``N = 1 / p``, the fraction of
    selected positions ``F`` (hard boundaries, no gradient) and the mean boundary probability ``G``
    (differentiable)::

        F_b = sum_t b_t / n_b,   G_b = sum_t p_t / n_b
        L_b = N/(N-1) * ((N-1) F_b G_b + (1 - F_b)(1 - G_b))
        loss = sum_b n_b L_b / sum_b n_b

    ``L`` equals 1 when ``F = G = 1/N``; its gradient in ``G`` is ``N/(N-1) (N F - 1)``, which lowers
    the probabilities while too many boundaries are selected and raises them while too few are.
    Per-sample ``target_counts`` give ``N_b = n_b / k*_b``.
    """
    real, realf, n = _real_and_counts(boundaries, mask)
    if probs.shape != boundaries.shape:
        raise ValueError(f"probs {tuple(probs.shape)} do not match boundaries {tuple(boundaries.shape)}")
    rate = target_rates(n, prior, target_counts)
    ratio = 1.0 / rate
    denom = n.clamp_min(1)
    selected = (boundaries.detach() * realf).sum(dim=1) / denom
    mean_prob = (probs * realf).sum(dim=1) / denom
    per_sample = (
        ratio
        / (ratio - 1).clamp_min(_EPS)
        * ((ratio - 1) * selected * mean_prob + (1 - selected) * (1 - mean_prob))
    )
    return (per_sample * n).sum() / n.sum().clamp_min(1)


def repulsion_loss(boundaries: Tensor, mask: Tensor | None = None, distance: int = 2) -> Tensor:
    """Penalty on pairs of boundaries closer than ``distance`` frames, per valid position.

    Not from a paper: this toolkit's minimum-segment-length prior, in the spirit of the minimum
    durations of segmental/HMM models. Phone segments at 50 frames/s rarely last one frame, while an
    unconstrained predictor can fire on consecutive frames (the "adjacent boundaries" share in
    :mod:`~magnet_asr.compression.monitoring`)::

        loss = sum_b sum_t sum_{d=1}^{distance-1} b_t b_{t+d} m_t m_{t+d} / sum_b n_b

    With straight-through boundaries ``dloss/db_t`` is the number of boundaries within
    ``distance - 1`` frames of ``t``: only crowded boundaries are pushed down, isolated ones are left
    alone. ``distance=2`` penalizes adjacent boundaries only.
    """
    if distance < 2:
        raise ValueError(f"distance must be >= 2 frames (1 would penalize nothing), got {distance}")
    real, realf, n = _real_and_counts(boundaries, mask)
    b = boundaries * realf
    total = b.new_zeros(())
    for d in range(1, min(distance, b.shape[1])):
        total = total + (b[:, :-d] * b[:, d:]).sum()
    return total / n.sum().clamp_min(1)


def phone_boundary_loss(logits: Tensor, targets: Tensor, free: Tensor) -> Tensor:
    """Binary cross-entropy of the boundary logits against target boundaries, per known position.

    Supervised segmentation where true phone times exist (flite's ``phone_ends``; the targets come
    from :func:`~magnet_asr.compression.targets.supervised_boundaries`). The count losses say how many
    boundaries, not where: on this toolkit's short CPU runs they left 78% of the boundaries adjacent and
    F1 0.40 against the phones (issue 12). ``targets (B, L)`` hold 1 / 0 where known and a negative value
    where not (utterances without phone times, padding); ``free (B, L)`` excludes the forced final frame::

        loss = sum_{b,t known & free} BCE(z_bt, y_bt) / #(known & free)

    Zero (still connected to ``logits``) when no position is known, so a batch of real speech only
    adds nothing.
    """
    if logits.shape != targets.shape or free.shape != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and free {tuple(free.shape)} differ"
        )
    known = (targets >= 0) & free.bool()
    per_frame = F.binary_cross_entropy_with_logits(
        logits, targets.clamp_min(0).to(logits.dtype), reduction="none"
    )
    return (per_frame * known).sum() / known.sum().clamp_min(1)
