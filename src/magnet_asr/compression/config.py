"""``BoundaryPredictorConfig``: everything that defines a boundary predictor, validated on creation.

A plain dataclass so model configs (Hugging Face ``PretrainedConfig`` subclasses) can store it as a
dict (:meth:`BoundaryPredictorConfig.to_dict` / :meth:`BoundaryPredictorConfig.from_dict`) and a saved
model directory stays self-describing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from .losses import LOSS_NAMES

__all__ = ["BoundaryPredictorConfig"]

VARIANTS = ("mlp", "cosine", "uniform")
POOLINGS = ("mean", "attention")
TARGETS = ("fixed", "phoneme", "syllable")
TRAIN_SAMPLINGS = ("gumbel", "threshold")


@dataclass
class BoundaryPredictorConfig:
    """Configuration of a :class:`~magnet_asr.compression.predictor.BoundaryPredictor`.

    Attributes:
        hidden_size: width ``D`` of the frames the predictor sees.
        variant: ``'mlp'`` (per-frame MLP, DTP), ``'cosine'`` (H-Net routing on neighbouring frames), or
            ``'uniform'``: no parameters, evenly spaced boundaries at rate ``prior`` (the fixed-rate
            control: the same pooling at the same layer, without learned boundaries).
        prior: target boundary rate, ``1 / compression factor`` (0.2 = 5x fewer frames).
        temperature: Gumbel-sigmoid temperature in training (shapes gradients, not the rate).
        threshold: probability above which a frame is a boundary in eval mode.
        peak_threshold: if set (below ``threshold``), local maxima of the probabilities above it are
            boundaries too, in eval mode and with ``train_sampling='threshold'`` in training
            (:func:`~magnet_asr.compression.predictor.threshold_boundaries`).
        pooling: ``'mean'`` or ``'attention'`` (learned query, softmax within each segment).
        target: where the target count comes from: ``'fixed'`` (``prior`` x real frames), or
            per-utterance ``'phoneme'`` / ``'syllable'`` counts passed to ``forward``.
        loss: boundary loss names, any of ``'binomial'``, ``'ratio'``, ``'repulsion'`` (empty: none).
        loss_weight: multiplies the summed boundary loss (the schedule ramps it).
        loss_weights: per-name weights inside the sum, same length as ``loss`` (default all 1).
        repulsion_distance: the repulsion loss penalizes boundary pairs closer than this many frames.
        reembed_positions: add sinusoidal embeddings of the segment index to the pooled vectors.
        train_sampling: ``'gumbel'`` (binary Concrete sample, straight-through) or ``'threshold'``
            (H-Net's deterministic ``p > 0.5`` in training too, straight-through on ``p``).
        mlp_hidden_size: inner width of the ``mlp`` variant (default ``hidden_size``).
        dropout: dropout inside the MLP.
        input_norm: LayerNorm on the frames before the ``mlp`` variant (for encoders with large activations).
        max_segment_frames: split every segment longer than this into near-equal parts (``None``: no
            cap), in training and evaluation. The predictor's losses see its own decisions, the pooling
            the split segments: phone-aligned boundaries at a compression below the phone rate.
        max_compression: with ``max_segment_frames``, a floor of ``ceil(frames / max_compression)`` segments
            per utterance: a row the cap leaves with fewer gets a tighter cap
            (:func:`~magnet_asr.compression.predictor.cap_segments`). ``None``: no floor.
    """

    hidden_size: int
    variant: str = "mlp"
    prior: float = 0.2
    temperature: float = 1.0
    threshold: float = 0.5
    peak_threshold: float | None = None
    pooling: str = "mean"
    target: str = "fixed"
    loss: tuple[str, ...] = ("binomial",)
    loss_weight: float = 1.0
    loss_weights: tuple[float, ...] | None = None
    repulsion_distance: int = 2
    reembed_positions: bool = False
    train_sampling: str = "gumbel"
    mlp_hidden_size: int | None = None
    dropout: float = 0.0
    input_norm: bool = False
    max_segment_frames: int | None = None
    max_compression: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.loss, str):
            self.loss = (self.loss,) if self.loss else ()
        self.loss = tuple(self.loss)
        self.loss_weights = (
            tuple(float(w) for w in self.loss_weights)
            if self.loss_weights is not None
            else tuple(1.0 for _ in self.loss)
        )
        problems: list[str] = []
        if not isinstance(self.hidden_size, int) or self.hidden_size <= 0:
            problems.append(f"hidden_size must be a positive int, got {self.hidden_size!r}")
        for name, value, allowed in (
            ("variant", self.variant, VARIANTS),
            ("pooling", self.pooling, POOLINGS),
            ("target", self.target, TARGETS),
            ("train_sampling", self.train_sampling, TRAIN_SAMPLINGS),
        ):
            if value not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {value!r}")
        if not 0.0 < self.prior < 1.0:
            problems.append(f"prior is a boundary rate in (0, 1) (0.2 = 5x compression), got {self.prior}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            problems.append(f"temperature must be a positive finite number, got {self.temperature}")
        if not 0.0 < self.threshold < 1.0:
            problems.append(f"threshold must be in (0, 1), got {self.threshold}")
        if self.peak_threshold is not None and not 0.0 < self.peak_threshold < self.threshold:
            problems.append(
                f"peak_threshold must be in (0, threshold={self.threshold}), got {self.peak_threshold}"
            )
        unknown = [n for n in self.loss if n not in LOSS_NAMES]
        if unknown:
            problems.append(f"unknown loss name(s) {unknown}; choose from {LOSS_NAMES}")
        if len(set(self.loss)) != len(self.loss):
            problems.append(f"loss names repeat: {self.loss}")
        if len(self.loss_weights) != len(self.loss):
            problems.append(f"loss_weights {self.loss_weights} must match loss {self.loss} one to one")
        if self.loss_weight < 0 or any(w < 0 for w in self.loss_weights):
            problems.append("loss weights must be >= 0")
        if self.repulsion_distance < 2:
            problems.append(f"repulsion_distance must be >= 2 frames, got {self.repulsion_distance}")
        if self.reembed_positions and (self.hidden_size % 2 or self.hidden_size < 4):
            problems.append(f"reembed_positions needs an even hidden_size >= 4, got {self.hidden_size}")
        if self.mlp_hidden_size is not None and self.mlp_hidden_size <= 0:
            problems.append(f"mlp_hidden_size must be positive, got {self.mlp_hidden_size}")
        if self.variant != "mlp" and self.mlp_hidden_size is not None:
            problems.append("mlp_hidden_size only applies to variant='mlp'")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_segment_frames is not None and (
            not isinstance(self.max_segment_frames, int) or self.max_segment_frames < 1
        ):
            problems.append(
                f"max_segment_frames must be a positive int or None, got {self.max_segment_frames!r}"
            )
        if self.max_compression is not None and (
            self.max_segment_frames is None or not self.max_compression > 1
        ):
            problems.append(
                f"max_compression must be > 1 and needs max_segment_frames, got {self.max_compression!r} "
                f"with max_segment_frames={self.max_segment_frames!r}"
            )
        if problems:
            raise ValueError("invalid BoundaryPredictorConfig: " + "; ".join(problems))

    @property
    def compression_factor(self) -> float:
        """Target frames per segment, ``1 / prior``."""
        return 1.0 / self.prior

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        out = asdict(self)
        out["loss"] = list(self.loss)
        out["loss_weights"] = list(self.loss_weights or ())
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BoundaryPredictorConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error rather than silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown BoundaryPredictorConfig field(s): {unknown}")
        return cls(**data)
