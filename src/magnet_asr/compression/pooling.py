"""Segment pooling: ``downsample`` (frames -> one vector per segment) and ``upsample`` (back).

Conventions (docs/architecture.md): tensors are batch-first, ``mask`` is 1 on real frames, and
``boundaries[b, t] = 1`` marks the **last** frame of a segment. Real frames after a sample's last
boundary form one final segment; padding never joins a segment and a boundary on padding is ignored.
Values above 0.5 count as boundaries, so straight-through tensors (hard 0/1 values carrying a soft
gradient) can be passed directly.

Cost. Dynamic token pooling (Nawrot et al., 2023, "Efficient Transformers with Dynamic Token
Pooling") builds a membership matrix ``(B, L, S)`` and pools with an einsum: O(B·S·L·D) time and
O(B·L·S) memory (see :mod:`magnet_asr.compression.reference`). Segments are contiguous, so here the
real frames are listed in order and pooled with ``torch.nn.functional.embedding_bag`` (one bag per
segment, empty bags for padded segment rows): O(B·L·D) time, no ``(B, L, S)`` tensor.

Gradients. ``hidden`` gets the exact gradient. ``boundaries`` get the straight-through gradient of
the cumulative-sum trick of dynamic token pooling, reproduced exactly (tests compare it with the
membership-matrix autograd). There, frame ``l`` has membership weight ``1 - (s - c_l)`` in segment
``s = c_l``, where ``c_l = sum_{j<l} b_j`` is the exclusive cumulative sum of the boundaries; the weight
is 1 in the forward pass but has derivative +1 in ``c_l``. Differentiating the normalized mean gives,
with ``g_s = dLoss/dpooled_s`` and segment sizes ``n_s``::

    e_l = g_s · (h_l - pooled_s) / n_s            (per real frame, s = segment of l)
    dLoss/db_j = sum_{l > j, l real} e_l          (reverse exclusive cumsum; zero on padding)

Because ``e`` sums to zero over every segment, only the frames after ``j`` inside ``j``'s own segment
contribute: raising ``b_j`` counts as shifting that segment's weight toward its frames after ``j``.
With per-frame scores (attention pooling) the same holds with weights ``a_l = exp(score_l)``:
``e_l = a_l g_s · (h_l - pooled_s) / A_s`` with ``A_s = sum a_l``, and ``e`` is then also exactly
``dLoss/dscore_l``. The backward pass is one gather of ``g_s / n_s`` to the frames (the ``hidden``
gradient, which must be materialized anyway) and one row-wise dot product, done in cache-sized row
chunks so no second ``(B, L, D)`` temporary is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttentionPooling",
    "SegmentPlan",
    "downsample",
    "frame_mask",
    "last_real_frame",
    "segment_plan",
    "segment_pool",
    "upsample",
]

# Elements per chunk in the backward's fused gather + dot product (4 MiB of fp32). Small enough that
# the product temporary is reused from the heap instead of page-faulting a full (B, L, D) buffer; large
# enough that there are few chunks, because each op on a chunk is one OpenMP parallel region and on an
# oversubscribed CPU every region's barrier can wait a scheduler time slice.
_CHUNK_ELEMENTS = 1 << 20


def frame_mask(mask: Tensor | None, batch_size: int, length: int, device: torch.device) -> Tensor:
    """Boolean ``(B, L)`` mask of real frames; ``None`` means every frame is real."""
    if mask is None:
        return torch.ones(batch_size, length, dtype=torch.bool, device=device)
    if mask.shape != (batch_size, length):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(batch_size, length)}")
    return mask.bool() if mask.dtype != torch.bool else mask


def last_real_frame(real: Tensor) -> Tensor:
    """Boolean ``(B, L)``: True at the last real frame of each sample (none for an all-padding row)."""
    if real.shape[1] == 0:
        return torch.zeros_like(real)
    positions = torch.arange(real.shape[1], device=real.device)
    last = torch.where(real, positions, -1).amax(dim=1, keepdim=True)
    return positions.unsqueeze(0) == last


@dataclass(frozen=True)
class SegmentPlan:
    """Integer bookkeeping shared by the forward and backward passes (no gradients).

    Segments are numbered as bags ``k = b * S + s``; bags with ``s >= counts[b]`` are empty.

    Attributes:
        real_index: ``(N,)`` flat indices ``b * L + t`` of the real frames, in order.
        real_bag: ``(N,)`` bag of each real frame.
        frame_bag: ``(B * L,)`` bag of every frame; padding points at the extra zero row ``B * S``.
        offsets: ``(B * S,)`` start of each bag in ``real_index`` (``embedding_bag`` offsets).
        lengths: ``(B * S,)`` frames per bag (0 for empty bags).
        counts: ``(B,)`` segments per sample.
        real: ``(B, L)`` boolean mask of real frames.
    """

    batch_size: int
    length: int
    num_segments: int
    real_index: Tensor
    real_bag: Tensor
    frame_bag: Tensor
    offsets: Tensor
    lengths: Tensor
    counts: Tensor
    real: Tensor

    @property
    def pooled_mask(self) -> Tensor:
        """``(B, S)`` long mask: 1 for every real segment, 0 after."""
        positions = torch.arange(self.num_segments, device=self.counts.device)
        return (positions.unsqueeze(0) < self.counts.unsqueeze(1)).long()


@torch.no_grad()
def segment_plan(
    boundaries: Tensor, mask: Tensor | None = None, num_segments: int | None = None
) -> SegmentPlan:
    """Segment bookkeeping for ``boundaries (B, L)`` and ``mask (B, L)``: O(B·L) integer ops.

    ``num_segments`` fixes ``S`` (e.g. to upsample a ``pooled`` tensor that has extra padded rows);
    by default ``S`` is the largest segment count in the batch, at least 1 so that downstream
    attention never sees a zero-length axis.
    """
    if boundaries.dim() != 2:
        raise ValueError(f"boundaries must be (B, L), got shape {tuple(boundaries.shape)}")
    batch, length = boundaries.shape
    device = boundaries.device
    real = frame_mask(mask, batch, length, device)
    closes = ((boundaries.detach() > 0.5) & real) | last_real_frame(real)
    counts = closes.sum(dim=1)
    most = int(counts.max()) if batch else 0
    if num_segments is None:
        num_segments = max(most, 1)
    elif num_segments < most:
        raise ValueError(f"boundaries define {most} segments but num_segments={num_segments}")
    real_index = real.reshape(-1).nonzero().squeeze(1)
    closes_real = closes.reshape(-1)[real_index]
    # A real frame starts a segment when it is the first real frame overall or the previous real frame
    # closed one; the last real frame of every sample closes, so this also starts each new sample.
    starts = torch.ones_like(closes_real)
    starts[1:] = closes_real[:-1]
    global_segment = starts.cumsum(0) - 1
    first_segment = counts.cumsum(0) - counts
    sample = torch.div(real_index, max(length, 1), rounding_mode="floor")
    real_bag = sample * num_segments + (global_segment - first_segment[sample])
    lengths = torch.bincount(real_bag, minlength=batch * num_segments)
    offsets = lengths.cumsum(0) - lengths
    frame_bag = torch.full((batch * length,), batch * num_segments, dtype=torch.long, device=device)
    frame_bag[real_index] = real_bag
    return SegmentPlan(
        batch_size=batch,
        length=length,
        num_segments=num_segments,
        real_index=real_index,
        real_bag=real_bag,
        frame_bag=frame_bag,
        offsets=offsets,
        lengths=lengths,
        counts=counts,
        real=real,
    )


def _rowdot_gather(source: Tensor, index: Tensor, other: Tensor, out: Tensor) -> Tensor:
    """``out[i] = source[index[i]]`` and return ``sum_d out[i, d] * other[i, d]`` in fp32 or fp64.

    Fusing the gather with the dot product chunk by chunk keeps the product temporary in cache
    instead of allocating (and page-faulting) a second full-size tensor.
    """
    acc = torch.float64 if other.dtype == torch.float64 else torch.float32
    dots = torch.empty(index.shape[0], dtype=acc, device=other.device)
    rows = max(1, _CHUNK_ELEMENTS // max(other.shape[1], 1))
    for start in range(0, index.shape[0], rows):
        stop = start + rows
        chunk = torch.index_select(source, 0, index[start:stop], out=out[start:stop])
        if chunk.dtype == acc:
            dots[start:stop] = (chunk * other[start:stop]).sum(dim=1)
        else:
            dots[start:stop] = (chunk.to(acc) * other[start:stop].to(acc)).sum(dim=1)
    return dots


class _SegmentPool(torch.autograd.Function):
    """Weighted segment mean with the exact hidden gradient and DTP's straight-through boundary gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden: Tensor, boundaries: Tensor, scores: Tensor | None, plan: SegmentPlan
    ) -> Tensor:
        batch, length, dim = hidden.shape
        table = hidden.reshape(batch * length, dim)
        if scores is None:
            # embedding_bag accumulates fp16/bf16 bags in fp32 and rounds once (checked in the tests).
            pooled = F.embedding_bag(plan.real_index, table, plan.offsets, mode="mean")
            weights = None
            denom = plan.lengths.clamp_min(1).to(
                torch.float64 if hidden.dtype == torch.float64 else torch.float32
            )
        else:
            acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            z = scores.detach().reshape(-1)[plan.real_index].to(acc)
            # Subtract each segment's own max: a sample-wide max could underflow a whole segment.
            zmax = torch.full((batch * plan.num_segments,), float("-inf"), dtype=acc, device=z.device)
            zmax = zmax.scatter_reduce(0, plan.real_bag, z, reduce="amax")
            weights = torch.exp(z - zmax[plan.real_bag])
            denom = torch.zeros_like(zmax).index_add_(0, plan.real_bag, weights)
            denom = torch.where(plan.lengths > 0, denom, torch.ones_like(denom))
            # Per-sample weights are applied in the accumulation dtype: bf16 weights would break sum(a) = A.
            summed = F.embedding_bag(
                plan.real_index, table.to(acc), plan.offsets, mode="sum", per_sample_weights=weights
            )
            pooled = (summed / denom.unsqueeze(1)).to(hidden.dtype)
        pooled = pooled.view(batch, plan.num_segments, dim)
        ctx.plan = plan
        ctx.has_scores = scores is not None
        ctx.save_for_backward(hidden, denom, weights if weights is not None else denom.new_empty(0))
        ctx.boundary_dtype = boundaries.dtype
        ctx.scores_dtype = scores.dtype if scores is not None else None
        return pooled

    @staticmethod
    def backward(ctx, grad_pooled: Tensor):  # type: ignore[override]
        hidden, denom, weights = ctx.saved_tensors
        plan: SegmentPlan = ctx.plan
        batch, length, dim = hidden.shape
        bags = batch * plan.num_segments
        need_hidden, need_boundaries, need_scores = ctx.needs_input_grad[:3]
        g = grad_pooled.reshape(bags, dim)
        # g_s / A_s, plus a zero row that padding frames gather; written in place (no (B*S, D) temporary).
        scaled = hidden.new_empty(bags + 1, dim)
        scaled[bags].zero_()
        torch.div(g, denom.unsqueeze(1), out=scaled[:bags])
        grad_hidden = hidden.new_empty(batch * length, dim)
        if not (need_boundaries or need_scores):
            torch.index_select(scaled, 0, plan.frame_bag, out=grad_hidden)
            if ctx.has_scores:
                grad_hidden[plan.real_index] *= weights.to(hidden.dtype).unsqueeze(1)
            return grad_hidden.view_as(hidden), None, None, None
        table = hidden.reshape(batch * length, dim)
        dots = _rowdot_gather(scaled, plan.frame_bag, table, grad_hidden)[plan.real_index]  # (g_s/A_s)·h_l
        # g_s · pooled_s / A_s = sum_{l in s} a_l dots_l / A_s: a segment average of the dots, so the
        # backward needs neither the pooled output nor a (B*S, D) product.
        a = weights.to(dots.dtype) if ctx.has_scores else torch.ones_like(dots)
        segment_avg = torch.zeros(bags, dtype=dots.dtype, device=dots.device).index_add_(
            0, plan.real_bag, a * dots
        )
        e_real = a * (dots - segment_avg[plan.real_bag] / denom.to(dots.dtype)[plan.real_bag])
        if ctx.has_scores:
            grad_hidden[plan.real_index] *= weights.to(hidden.dtype).unsqueeze(1)
        # Scatter onto (B*L,) zeros rather than masking a dense product: NaN/inf in padding stay out.
        e = torch.zeros(batch * length, dtype=torch.float64, device=hidden.device)
        e[plan.real_index] = e_real.double()
        e = e.view(batch, length)
        grad_scores = e.to(ctx.scores_dtype) if need_scores else None
        grad_boundaries = None
        if need_boundaries:
            # sum over l > j of e_l = total - inclusive cumsum; in fp64 so long sequences stay exact.
            inclusive = e.cumsum(dim=1)
            grad_boundaries = (inclusive[:, -1:] - inclusive).masked_fill(~plan.real, 0.0)
            grad_boundaries = grad_boundaries.to(ctx.boundary_dtype)
        return (grad_hidden.view_as(hidden) if need_hidden else None), grad_boundaries, grad_scores, None


def _check_inputs(hidden: Tensor, boundaries: Tensor) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, L, D), got shape {tuple(hidden.shape)}")
    if boundaries.shape != hidden.shape[:2]:
        raise ValueError(f"boundaries {tuple(boundaries.shape)} do not match hidden {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be floating point, got {hidden.dtype}")


def segment_pool(
    hidden: Tensor,
    boundaries: Tensor,
    mask: Tensor | None = None,
    scores: Tensor | None = None,
    plan: SegmentPlan | None = None,
) -> tuple[Tensor, Tensor]:
    """Pool each segment to a (softmax-)weighted mean of its real frames.

    Args:
        hidden: ``(B, L, D)`` frames, any floating dtype (kept in the output; accumulation in fp32).
        boundaries: ``(B, L)`` 0/1 (values > 0.5 are boundaries), may carry a straight-through gradient.
        mask: ``(B, L)`` 1 = real frame, or ``None`` for no padding.
        scores: optional ``(B, L)`` logits; frame weights are ``softmax`` of the scores inside each
            segment (attention pooling). ``None`` gives the plain mean.
        plan: precomputed :func:`segment_plan` for these boundaries and mask.

    Returns:
        ``pooled (B, S, D)`` and ``pooled_mask (B, S)`` (long, 1 on real segments); rows past a
        sample's last segment are zeros.
    """
    _check_inputs(hidden, boundaries)
    if scores is not None and scores.shape != boundaries.shape:
        raise ValueError(f"scores {tuple(scores.shape)} do not match boundaries {tuple(boundaries.shape)}")
    if plan is None:
        plan = segment_plan(boundaries, mask)
    pooled = _SegmentPool.apply(hidden.contiguous(), boundaries, scores, plan)
    return pooled, plan.pooled_mask


def downsample(hidden: Tensor, boundaries: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean-pool ``hidden (B, L, D)`` to one vector per segment: ``(pooled (B, S, D), pooled_mask (B, S))``.

    ``pooled[b, s]`` is the mean of the real frames of segment ``s``; ``pooled_mask`` is 1 on real
    segments. Gradients: exact for ``hidden``; the straight-through cumulative-sum gradient of dynamic
    token pooling (Nawrot et al., 2023) for ``boundaries`` (module docstring). O(B·L·D).
    """
    return segment_pool(hidden, boundaries, mask)


def upsample(pooled: Tensor, boundaries: Tensor, mask: Tensor | None = None) -> Tensor:
    """Copy each segment vector back to its frames: ``pooled (B, S, D)`` -> ``(B, L, D)``; padding gets zeros.

    The gradient reaches ``pooled`` exactly (each segment sums its frames' gradients). Boundaries get
    none: dynamic token pooling's upsampling normalizes the membership over segments, which makes its
    boundary gradient vanish as well (1 - 1e-9 factors), so nothing is lost against that reference.
    """
    if pooled.dim() != 3 or boundaries.dim() != 2 or pooled.shape[0] != boundaries.shape[0]:
        raise ValueError(
            f"pooled {tuple(pooled.shape)} and boundaries {tuple(boundaries.shape)} do not match"
        )
    batch, num_segments, dim = pooled.shape
    plan = segment_plan(boundaries, mask, num_segments=num_segments)
    table = torch.cat([pooled.reshape(batch * num_segments, dim), pooled.new_zeros(1, dim)])
    return table.index_select(0, plan.frame_bag).view(batch, boundaries.shape[1], dim)


class AttentionPooling(nn.Module):
    """Attention pooling: a learned query scores every frame; softmax over the frames of each segment.

    ``score_l = (h_l · q) / sqrt(D)``; ``pooled_s = sum_{l in s} softmax_s(score)_l h_l``. A key
    projection ``W_k`` in front would add nothing (``q · W_k h = (W_k^T q) · h``), so the query acts on
    the frames directly. ``q`` starts at zero, so the pooling starts as the exact mean. Values are the
    frames themselves, keeping pooled vectors in the encoder's space for the layers that follow.

    Gradients: exact for ``hidden`` and ``q``; the boundaries get the same straight-through
    cumulative-sum gradient as :func:`downsample`, in its weighted form (module docstring), so the
    ASR loss reaches the boundary decision, unlike membership by an equality test.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        self.hidden_size = hidden_size
        self.query = nn.Parameter(torch.zeros(hidden_size))

    def scores(self, hidden: Tensor) -> Tensor:
        """``(B, L)`` frame scores for ``hidden (B, L, D)``."""
        return (hidden @ self.query.to(hidden.dtype)) / self.hidden_size**0.5

    def forward(
        self, hidden: Tensor, boundaries: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``hidden (B, L, D)``, ``boundaries``/``mask (B, L)`` -> pooled ``(B, S, D)``, mask ``(B, S)``."""
        return segment_pool(hidden, boundaries, mask, scores=self.scores(hidden))
