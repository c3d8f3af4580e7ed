"""Reference formulations of segment pooling, for tests and benchmarks (not for training).

- :func:`downsample_membership`: the membership-matrix formulation of dynamic token pooling
  (Nawrot et al., 2023, "Efficient Transformers with Dynamic Token Pooling", ``downsample`` /
  ``final`` in their code), made batch-first and mask-aware. It builds ``(B, L, S)`` tensors:
  O(B·S·L·D) time and O(B·L·S) memory. Its autograd gradient for the boundaries defines the
  straight-through gradient that :func:`magnet_asr.compression.downsample` reproduces in O(B·L·D).
- :func:`downsample_loop`: the plain definition, a Python loop over samples and segments, in fp32
  (fp64 for fp64 input) and cast back: what "mean of the real frames of each segment" means.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .pooling import frame_mask, last_real_frame

__all__ = ["downsample_loop", "downsample_membership"]


def _segment_counts(boundaries: Tensor, real: Tensor) -> Tensor:
    closes = ((boundaries.detach() > 0.5) & real) | last_real_frame(real)
    return closes.sum(dim=1)


def downsample_membership(
    hidden: Tensor, boundaries: Tensor, mask: Tensor | None = None, scores: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Membership-matrix pooling: ``hidden (B, L, D)`` -> ``(pooled (B, S, D), pooled_mask (B, S))``.

    With ``c_l = sum_{j<l} b_j`` (exclusive cumsum of the masked boundaries) and ``foo[l, s] = s - c_l``,
    the weight of frame ``l`` in segment ``s`` is ``1 - foo`` where ``foo == 0`` and exactly 0 elsewhere
    (DTP's ``final``): 1 in the forward pass, derivative +1 in ``c_l``. Weights are normalized over the
    frames of each segment (``+1e-9`` as in DTP), optionally times ``exp(scores)`` (attention pooling).
    """
    batch, length, _ = hidden.shape
    real = frame_mask(mask, batch, length, hidden.device)
    counts = _segment_counts(boundaries, real)
    num_segments = max(int(counts.max()), 1)
    b = boundaries.to(hidden.dtype) * real.to(hidden.dtype)
    c = b.cumsum(dim=1) - b
    segments = torch.arange(num_segments, device=hidden.device, dtype=hidden.dtype)
    foo = segments.view(1, 1, -1) - c.unsqueeze(-1)  # (B, L, S)
    member = (foo == 0) & real.unsqueeze(-1)
    weights = torch.where(member, 1 - foo, torch.zeros_like(foo))
    if scores is not None:
        # Per-sample max for stability; scores in tests are moderate so no segment underflows.
        z = scores.to(hidden.dtype).masked_fill(~real, float("-inf"))
        z = z - z.amax(dim=1, keepdim=True).clamp_min(-1e30)
        weights = weights * torch.exp(z).unsqueeze(-1)
    weights = weights / (weights.sum(dim=1, keepdim=True) + 1e-9)
    pooled = torch.einsum("bls,bld->bsd", weights, hidden)
    pooled_mask = (torch.arange(num_segments, device=hidden.device).unsqueeze(0) < counts.unsqueeze(1)).long()
    return pooled, pooled_mask


def downsample_loop(
    hidden: Tensor, boundaries: Tensor, mask: Tensor | None = None, scores: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Segment (softmax-weighted) means by Python loops: the definition itself, no gradient tricks."""
    batch, length, dim = hidden.shape
    real = frame_mask(mask, batch, length, hidden.device)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    hidden, boundaries = hidden.detach(), boundaries.detach()
    scores = scores.detach() if scores is not None else None
    segments_per_sample: list[list[Tensor]] = []
    for i in range(batch):
        frames = [t for t in range(length) if bool(real[i, t])]
        current: list[int] = []
        pooled_i: list[Tensor] = []
        for position, t in enumerate(frames):
            current.append(t)
            if float(boundaries[i, t]) > 0.5 or position == len(frames) - 1:
                rows = hidden[i, current].to(acc)
                if scores is None:
                    pooled_i.append(rows.mean(dim=0))
                else:
                    w = torch.softmax(scores[i, current].to(acc), dim=0)
                    pooled_i.append((w.unsqueeze(1) * rows).sum(dim=0))
                current = []
        segments_per_sample.append(pooled_i)
    num_segments = max([len(s) for s in segments_per_sample] + [1])
    pooled = torch.zeros(batch, num_segments, dim, dtype=acc, device=hidden.device)
    pooled_mask = torch.zeros(batch, num_segments, dtype=torch.long, device=hidden.device)
    for i, segs in enumerate(segments_per_sample):
        for s, vector in enumerate(segs):
            pooled[i, s] = vector
            pooled_mask[i, s] = 1
    return pooled.to(hidden.dtype), pooled_mask
