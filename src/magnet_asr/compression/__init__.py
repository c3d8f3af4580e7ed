"""Learned boundary compression: predict where segments end and pool the encoder frames per segment.

Pure tensor code, independent of Whisper. Conventions (docs/architecture.md): batch-first ``(B, L, D)``,
masks 1 = real frame, ``boundaries[b, t] = 1`` marks the last frame of a segment.

- :func:`downsample` / :func:`upsample`: O(B·L·D) segment mean pooling and its inverse.
- :class:`BoundaryPredictor` (from :class:`BoundaryPredictorConfig`): ``mlp`` or ``cosine`` variants,
  mean or attention pooling, count losses, and ``sample`` for reinforcement learning.
- :mod:`.losses`, :mod:`.targets`, :mod:`.schedules`, :mod:`.monitoring`.
"""

from .config import BoundaryPredictorConfig
from .losses import binomial_count_loss, phone_boundary_loss, ratio_loss, repulsion_loss
from .monitoring import boundary_rates, segment_lengths, summarize_boundaries, summarize_output
from .pooling import AttentionPooling, downsample, segment_plan, segment_pool, upsample
from .predictor import BoundaryOutput, BoundaryPredictor, group_samples, sinusoidal_positions
from .targets import fixed_rate_counts, scheduled_counts, target_counts, transcript_counts

__all__ = [
    "AttentionPooling",
    "BoundaryOutput",
    "BoundaryPredictor",
    "BoundaryPredictorConfig",
    "binomial_count_loss",
    "boundary_rates",
    "downsample",
    "fixed_rate_counts",
    "group_samples",
    "phone_boundary_loss",
    "ratio_loss",
    "repulsion_loss",
    "scheduled_counts",
    "segment_lengths",
    "segment_plan",
    "segment_pool",
    "sinusoidal_positions",
    "summarize_boundaries",
    "summarize_output",
    "target_counts",
    "transcript_counts",
    "upsample",
]
