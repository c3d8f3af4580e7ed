"""Boundary statistics for logs: how much the predictor compresses and what its segments look like.

Watch for both collapses (docs/architecture.md): ``compression_ratio`` near 1 (a boundary on every frame) or
``segment_length_mean`` near the utterance length (no boundaries). Train and eval boundary rates
differ: a Gumbel-sigmoid or Bernoulli draw fires with probability ``p`` whatever the temperature, while
eval fires only where ``p > threshold``; log both (:func:`boundary_rates`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .pooling import frame_mask, last_real_frame, segment_plan
from .predictor import BoundaryOutput

__all__ = ["boundary_rates", "segment_lengths", "summarize_boundaries", "summarize_output"]


def segment_lengths(boundaries: Tensor, mask: Tensor | None = None) -> Tensor:
    """Lengths in frames of every real segment in the batch, sample by sample: ``(total segments,)`` long."""
    plan = segment_plan(boundaries, mask)
    return plan.lengths[plan.lengths > 0]


@torch.no_grad()
def boundary_rates(
    probs: Tensor, mask: Tensor | None = None, threshold: float = 0.5, train_sampling: str = "gumbel"
) -> dict[str, float]:
    """Expected boundary rate in training vs the eval rate, from ``probs (B, L)``, per real frame.

    ``train_rate`` is ``mean(p)`` for stochastic training (a Gumbel-sigmoid sample thresholded at 0.5
    and a Bernoulli draw both fire with probability ``p``); with ``train_sampling='threshold'`` it
    equals the eval rate. ``eval_rate`` counts ``p > threshold``; forced last frames have ``p = 1``.
    """
    real = frame_mask(mask, probs.shape[0], probs.shape[1], probs.device)
    frames = max(int(real.sum()), 1)
    eval_rate = float(((probs > threshold) & real).sum()) / frames
    if train_sampling == "threshold":
        train_rate = eval_rate
    elif train_sampling == "gumbel":
        train_rate = float((probs.float() * real).sum()) / frames
    else:
        raise ValueError(f"train_sampling must be 'gumbel' or 'threshold', got {train_sampling!r}")
    return {"train_rate": train_rate, "eval_rate": eval_rate}


@torch.no_grad()
def summarize_boundaries(
    boundaries: Tensor,
    mask: Tensor | None = None,
    probs: Tensor | None = None,
    threshold: float = 0.5,
    train_sampling: str = "gumbel",
    prefix: str = "",
) -> dict[str, float]:
    """Batch summary of ``boundaries (B, L)`` under ``mask (B, L)``, as plain floats for a logger.

    Keys (each with ``prefix``): ``frames``, ``segments``, ``compression_ratio`` (real frames per
    segment), ``boundary_rate`` (segments per real frame, the forced final boundaries included),
    ``adjacent_share`` (share of boundaries whose previous frame is also a boundary),
    ``segment_length_mean`` and ``segment_length_cv`` (std / mean, population std), and with
    ``probs`` also ``train_rate`` and ``eval_rate`` (:func:`boundary_rates`).
    """
    plan = segment_plan(boundaries, mask)
    real = plan.real
    frames = int(real.sum())
    lengths = plan.lengths[plan.lengths > 0].double()
    segments = int(lengths.numel())
    # Boundaries as downsample sees them (forced last frames included), compared frame to frame.
    closes = ((boundaries.detach() > 0.5) & real) | last_real_frame(real)
    adjacent = int((closes[:, 1:] & closes[:, :-1]).sum())
    mean = float(lengths.mean()) if segments else 0.0
    cv = float(lengths.std(unbiased=False) / lengths.mean()) if segments else 0.0
    out = {
        "frames": float(frames),
        "segments": float(segments),
        "compression_ratio": frames / segments if segments else 0.0,
        "boundary_rate": segments / frames if frames else 0.0,
        "adjacent_share": adjacent / segments if segments else 0.0,
        "segment_length_mean": mean,
        "segment_length_cv": cv,
    }
    if probs is not None:
        out.update(boundary_rates(probs, real, threshold, train_sampling))
    return {prefix + key: value for key, value in out.items()}


def summarize_output(
    output: BoundaryOutput, threshold: float = 0.5, train_sampling: str = "gumbel", prefix: str = ""
) -> dict[str, float]:
    """:func:`summarize_boundaries` of a :class:`BoundaryOutput` (its boundaries, probs and mask)."""
    return summarize_boundaries(
        output.boundaries, output.mask, output.probs, threshold, train_sampling, prefix
    )
