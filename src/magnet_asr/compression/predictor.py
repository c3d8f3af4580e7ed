"""Boundary predictors: decide where segments end, pool the frames, and return the boundary loss.

Two variants share one interface, ``BoundaryPredictor(config)(hidden, mask, target_counts)``:

- ``mlp``: an MLP on each frame gives ``p_t = sigmoid(z_t)``, the probability that frame ``t`` ends a
  segment (dynamic token pooling, Nawrot et al., 2023). The output bias starts at ``logit(prior)``.
- ``uniform``: no parameters; ``round(prior x frames)`` evenly spaced segments per sample, in training
  and evaluation alike: the fixed-rate control that learned boundaries must beat at equal compression.
- ``cosine``: H-Net routing (Hwang et al., 2025): ``p_t = (1 - cos(W_q h_{t+1}, W_k h_t)) / 2`` with
  identity-initialized projections: a segment ends where the next frame stops resembling this one.
  H-Net marks chunk *starts*; a start at ``t+1`` is an end at ``t`` in our convention.

Training draws a binary Concrete / Gumbel-sigmoid sample (Maddison et al., 2017; Jang et al., 2017)
``y = sigmoid((z + log u - log(1-u)) / tau)``, thresholds it at 0.5 and passes the soft gradient
straight through. ``P(y > 0.5) = p`` at any temperature: tau shapes the gradient, not the boundary
rate (docs/architecture.md). Evaluation thresholds ``p`` itself (optionally keeping local maxima of ``p`` below
the threshold, :func:`threshold_boundaries`), so train and eval boundary rates differ until
the probabilities become confident; :mod:`~magnet_asr.compression.monitoring` logs both.

The last real frame of every sample is always a boundary and padding never is; both positions are
deterministic, so ``probs`` is 1 / 0 there and ``log_prob`` leaves them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BoundaryPredictorConfig
from .losses import binomial_count_loss, phone_boundary_loss, ratio_loss, repulsion_loss
from .pooling import AttentionPooling, frame_mask, last_real_frame, segment_plan, segment_pool
from .targets import UNKNOWN, supervised_boundaries

__all__ = [
    "BoundaryOutput",
    "BoundaryPredictor",
    "cap_segments",
    "group_samples",
    "sinusoidal_positions",
    "split_long_segments",
    "threshold_boundaries",
    "uniform_boundaries",
]

_PROB_EPS = 1e-6


@dataclass
class BoundaryOutput:
    """What a predictor returns. ``B`` is ``K * B_in`` for :meth:`BoundaryPredictor.sample`.

    Attributes:
        boundaries: ``(B, L)`` 0/1; in training it carries the straight-through gradient.
        probs: ``(B, L)`` boundary probabilities (1 on the last real frame, 0 on padding).
        pooled: ``(B, S, D)`` segment vectors (plus segment position embeddings if configured).
        pooled_mask: ``(B, S)`` long, 1 on real segments.
        loss: scalar weighted boundary loss (0 if no loss is configured).
        num_boundaries: ``(B,)`` segments per sample (the forced last boundary included).
        num_positions: ``(B,)`` real frames per sample.
        log_prob: ``(B,)`` log-probability of the drawn boundaries under independent Bernoulli(p),
            summed over free positions (differentiable in the predictor's parameters).
        losses: unweighted loss terms by name, for logging.
        target_counts: ``(B,)`` the boundary counts the loss aimed at.
        mask: ``(B, L)`` bool real-frame mask the boundaries were decided under.
    """

    boundaries: Tensor
    probs: Tensor
    pooled: Tensor
    pooled_mask: Tensor
    loss: Tensor
    num_boundaries: Tensor
    num_positions: Tensor
    log_prob: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    target_counts: Tensor | None = None
    mask: Tensor | None = None


def sinusoidal_positions(length: int, channels: int, device: torch.device | None = None) -> Tensor:
    """``(length, channels)`` sinusoidal embeddings, Whisper's formula: ``[sin(t w_i), cos(t w_i)]``,
    ``w_i = 10000^(-i / (channels/2 - 1))``, so re-embedded segment positions look like the encoder's own."""
    if channels % 2 or channels < 4:
        raise ValueError(f"sinusoidal positions need an even channel count >= 4, got {channels}")
    increment = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-increment * torch.arange(channels // 2, device=device, dtype=torch.float32))
    angles = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1) * inv.unsqueeze(0)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def group_samples(x: Tensor, num_samples: int) -> Tensor:
    """View a ``(K * B, ...)`` tensor from :meth:`BoundaryPredictor.sample` as ``(B, K, ...)`` groups."""
    if x.shape[0] % num_samples:
        raise ValueError(f"leading size {x.shape[0]} is not a multiple of num_samples={num_samples}")
    return x.view(x.shape[0] // num_samples, num_samples, *x.shape[1:])


def uniform_boundaries(real: Tensor, rate: float) -> Tensor:
    """``(B, L)`` float 0/1: ``k_b = clamp(round(rate x n_b), 1, n_b)`` evenly spaced segment ends over each
    sample's ``n_b`` real frames (``real (B, L)`` bool, real frames first). Frame ``t`` ends a segment when
    ``floor((t+1) k / n) > floor(t k / n)``, so the last real frame always does and segments differ in
    length by at most one frame."""
    n = real.sum(dim=1, keepdim=True)
    k = torch.round(n.float() * rate).long().clamp(min=1).minimum(n.clamp(min=1))
    t = torch.arange(real.shape[1], device=real.device).unsqueeze(0)
    ends = ((t + 1) * k) // n.clamp(min=1) > (t * k) // n.clamp(min=1)
    return (ends & real).float()


def split_long_segments(boundaries: Tensor, real: Tensor, max_frames: int) -> Tensor:
    """``(B, L)`` float 0/1: the segment ends of ``boundaries`` plus the cuts that split every segment
    longer than ``max_frames`` into ``ceil(length / max_frames)`` near-equal parts (as
    :func:`uniform_boundaries` spaces them). ``real (B, L)`` bool, real frames first; the last real frame
    must already be a boundary. No gradient: the cuts follow from the boundaries deterministically."""
    hard = (boundaries.detach() > 0.5) & real
    t = torch.arange(real.shape[1], device=real.device).unsqueeze(0)
    segment = torch.cumsum(hard.long(), dim=1) - hard.long()  # index of each frame's segment
    lengths = torch.zeros(real.shape[0], real.shape[1] + 1, dtype=torch.long, device=real.device)
    lengths.scatter_add_(1, segment, real.long())
    starts = torch.cumsum(lengths, dim=1) - lengths
    n = lengths.gather(1, segment).clamp(min=1)
    position = t - starts.gather(1, segment)
    parts = (n + max_frames - 1) // max_frames
    ends = ((position + 1) * parts) // n > (position * parts) // n
    return (hard | (ends & real)).float()


def cap_segments(
    boundaries: Tensor, real: Tensor, max_frames: int, max_compression: float | None = None
) -> Tensor:
    """:func:`split_long_segments` at ``max_frames``; with ``max_compression``, a row still left with fewer than
    ``ceil(frames / max_compression)`` segments takes the largest tighter cap (``max_frames - 1`` ... 1) that
    gives it that many, so no utterance is pooled much past the rate the caps aim at (at cap 1 every frame is
    its own segment, so the loop ends)."""
    out = split_long_segments(boundaries, real, max_frames)
    if max_compression is None:
        return out
    need = torch.ceil(real.sum(dim=1).float() / max_compression)
    for cap in range(max_frames - 1, 0, -1):
        short = out.sum(dim=1) < need
        if not bool(short.any()):
            break
        out = torch.where(short.unsqueeze(1), split_long_segments(boundaries, real, cap), out)
    return out


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def threshold_boundaries(
    logits: Tensor, real: Tensor, threshold: float = 0.5, peak_threshold: float | None = None
) -> Tensor:
    """``(B, L)`` bool decisions from ``logits (B, L)`` on ``real (B, L)`` frames: ``p > threshold``, and,
    with ``peak_threshold``, also every local maximum of ``p`` above it (``p_t >= p_{t-1}``,
    ``p_t > p_{t+1}``; padding counts as ``p = 0``).

    Why peaks: where the evidence cannot tell whether a phone ends at frame ``t`` or ``t + 1``, a
    calibrated predictor splits the probability between the two and ``p > 0.5`` fires at neither, so
    thresholding alone under-segments (recall 0.60 at precision 0.88 on flite phones, 2026-12-02).
    Peak picking keeps one boundary per such bump, as phone segmenters decode their frame scores
    (Kreuk et al., 2020), while confident neighbours above ``threshold`` both stay (short phones).
    """
    decided = logits > _logit(threshold)
    if peak_threshold is not None:
        low = torch.finfo(logits.dtype).min
        scores = logits.masked_fill(~real, low)
        before = F.pad(scores[:, :-1], (1, 0), value=low)
        after = F.pad(scores[:, 1:], (0, 1), value=low)
        peaks = (scores >= before) & (scores > after) & (logits > _logit(peak_threshold))
        decided = decided | peaks
    return decided & real


class BoundaryPredictor(nn.Module):
    """Predict segment boundaries on ``hidden (B, L, D)`` and pool to ``(B, S, D)``.

    Schedules change plain attributes during training (see :mod:`.schedules`): ``prior`` (target
    boundary rate for ``target='fixed'``), ``temperature``, ``loss_weight``, and
    ``curriculum_fraction`` (1.0 = final compression), which the caller uses to schedule per-utterance
    target counts with :func:`~magnet_asr.compression.targets.scheduled_counts`.
    """

    def __init__(self, config: BoundaryPredictorConfig) -> None:
        super().__init__()
        self.config = config
        self.prior = config.prior
        self.temperature = config.temperature
        self.loss_weight = config.loss_weight
        self.curriculum_fraction = 1.0
        dim = config.hidden_size
        if config.variant == "mlp":
            inner = config.mlp_hidden_size or dim
            # Optional LayerNorm first: Whisper's activations are large and vary by layer and checkpoint;
            # normalized inputs keep the logits (and the learning rate that suits them) on one scale.
            norm = [nn.LayerNorm(dim)] if config.input_norm else []
            self.mlp = nn.Sequential(
                *norm, nn.Linear(dim, inner), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(inner, 1)
            )
        elif config.variant == "cosine":
            self.q_proj = nn.Linear(dim, dim, bias=False)
            self.k_proj = nn.Linear(dim, dim, bias=False)
        self.attention = AttentionPooling(dim) if config.pooling == "attention" else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The predictor's own initialization. Models that re-initialize their modules generically
        (Hugging Face ``post_init``) call this afterwards so the prior bias and identity router survive."""
        config = self.config
        if config.variant == "mlp":
            for module in self.mlp:
                if isinstance(module, (nn.Linear, nn.LayerNorm)):
                    module.reset_parameters()
            output = self.mlp[-1]
            assert isinstance(output, nn.Linear)
            # Small output weights so every frame starts near the prior rate: an untrained predictor
            # neither floods the pooled sequence with boundaries nor collapses it to one segment.
            # (tensor methods, not nn.init: transformers guards nn.init during post_init)
            output.weight.normal_(0.0, 0.02 / math.sqrt(output.in_features))
            # Gumbel sampling fires at rate p, so a bias at the prior starts at the prior rate. The
            # deterministic `threshold` decision (logit > 0) would fire nowhere from that bias; it starts
            # at logit 0 instead (about one boundary per two frames) and the count loss pulls it down.
            output.bias.fill_(_logit(config.prior) if config.train_sampling == "gumbel" else 0.0)
        elif config.variant == "cosine":  # identity: at init the router compares the frames themselves
            self.q_proj.weight.copy_(torch.eye(config.hidden_size))
            self.k_proj.weight.copy_(torch.eye(config.hidden_size))
        if self.attention is not None:
            self.attention.query.zero_()  # softmax over equal scores: starts as the exact mean

    # ---- probabilities -------------------------------------------------------------------------
    def boundary_logits(self, hidden: Tensor, real: Tensor) -> Tensor:
        """``(B, L)`` fp32 boundary logits (raw; forced positions are applied by the caller)."""
        if self.config.variant == "mlp":
            return self.mlp(hidden).squeeze(-1).float()
        if self.config.variant == "uniform":  # a certain decision: logits of +-30 (p = 0 or 1)
            return uniform_boundaries(real, self.prior).mul(60.0).sub(30.0)
        q = self.q_proj(hidden[:, 1:]).float()
        k = self.k_proj(hidden[:, :-1]).float()
        cos = F.cosine_similarity(q, k, dim=-1, eps=1e-8)
        p = ((1 - cos) / 2).clamp(_PROB_EPS, 1 - _PROB_EPS)
        # The last position has no successor; it is always forced, so any finite value will do.
        p = F.pad(p, (0, 1), value=0.5)
        return torch.log(p) - torch.log1p(-p)

    def _decide(self, logits: Tensor, real: Tensor, forced: Tensor) -> Tensor:
        """Hard 0/1 boundaries; straight-through in training, thresholded probabilities in eval."""
        if self.config.variant == "uniform":
            return torch.where(forced, torch.ones_like(logits), (logits > 0).float())
        if self.training:
            soft_logits = logits
            if self.config.train_sampling == "gumbel":
                u = torch.rand_like(logits).clamp(_PROB_EPS, 1 - _PROB_EPS)
                soft_logits = logits + torch.log(u) - torch.log1p(-u)
            soft = torch.sigmoid(soft_logits / self.temperature)
            if self.config.train_sampling == "gumbel":
                hard = (soft > 0.5).to(soft.dtype)
            else:  # the eval decision rule at p > 0.5 (sigmoid(z / tau) > 0.5 exactly when z > 0)
                hard = threshold_boundaries(logits, real, 0.5, self.config.peak_threshold).to(soft.dtype)
            # hard + (soft - soft.detach()) is exactly hard in value (x - x == 0), soft in gradient.
            decided = hard + (soft - soft.detach())
        else:
            decided = threshold_boundaries(
                logits, real, self.config.threshold, self.config.peak_threshold
            ).float()
        decided = torch.where(real, decided, torch.zeros_like(decided))
        return torch.where(forced, torch.ones_like(decided), decided)

    # ---- public API ----------------------------------------------------------------------------
    def forward(
        self,
        hidden: Tensor,
        mask: Tensor | None = None,
        target_counts: Tensor | None = None,
        phone_boundaries: Tensor | None = None,
    ) -> BoundaryOutput:
        """Boundaries, pooled segments and boundary loss for ``hidden (B, L, D)``, ``mask (B, L)``.

        ``target_counts (B,)`` (phoneme / syllable counts, see :mod:`.targets`) are required in
        training when ``config.target`` is not ``'fixed'``; without them the loss aims at ``prior``.
        ``phone_boundaries (B, L)``: 1 on frames that end a true phone, 0 on the others, negative on
        rows without phone times and on padding; the ``phones`` loss trains toward them (split up to the
        target counts, :func:`~magnet_asr.compression.targets.supervised_boundaries`).
        """
        real = self._check(hidden, mask)
        forced = last_real_frame(real)
        logits = self.boundary_logits(hidden, real)
        boundaries = self._decide(logits, real, forced)
        return self._finish(hidden, real, forced, logits, boundaries, target_counts, phone_boundaries)

    def sample(
        self,
        hidden: Tensor,
        mask: Tensor | None = None,
        num_samples: int = 1,
        target_counts: Tensor | None = None,
    ) -> BoundaryOutput:
        """Draw ``K = num_samples`` Bernoulli(p) boundary sets per input, for reinforcement learning.

        Layout is input-major: row ``i * K + k`` is draw ``k`` of input ``i``, so
        ``group_samples(x, K)`` gives ``(B, K, ...)`` groups for GRPO's per-input advantage
        normalization. Boundaries carry no gradient; ``log_prob`` does (REINFORCE / GRPO), and the
        pooled vectors keep their exact gradient to ``hidden``. Works in train and eval mode alike.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if self.config.variant == "uniform":
            raise ValueError("a uniform predictor has nothing to sample: its boundaries are fixed")
        real = self._check(hidden, mask)
        logits = self.boundary_logits(hidden, real).repeat_interleave(num_samples, dim=0)
        hidden = hidden.repeat_interleave(num_samples, dim=0)
        real = real.repeat_interleave(num_samples, dim=0)
        forced = last_real_frame(real)
        draws = torch.bernoulli(torch.sigmoid(logits.detach()))
        boundaries = torch.where(
            forced, torch.ones_like(draws), torch.where(real, draws, torch.zeros_like(draws))
        )
        if target_counts is not None:
            target_counts = target_counts.repeat_interleave(num_samples, dim=0)
        return self._finish(hidden, real, forced, logits, boundaries, target_counts)

    # ---- internals -----------------------------------------------------------------------------
    def _check(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden must be (B, L, {self.config.hidden_size}), got shape {tuple(hidden.shape)}"
            )
        return frame_mask(mask, hidden.shape[0], hidden.shape[1], hidden.device)

    def _finish(
        self,
        hidden: Tensor,
        real: Tensor,
        forced: Tensor,
        logits: Tensor,
        boundaries: Tensor,
        target_counts: Tensor | None,
        phone_boundaries: Tensor | None = None,
    ) -> BoundaryOutput:
        free = real & ~forced
        probs = torch.sigmoid(logits).masked_fill(~real, 0.0).masked_fill(forced, 1.0)
        decided = boundaries  # the predictor's own decisions: what its losses and log_prob are about
        if self.config.max_segment_frames is not None:
            capped = cap_segments(
                boundaries, real, self.config.max_segment_frames, self.config.max_compression
            )
            cuts = capped - boundaries.detach()
            boundaries = boundaries + cuts  # constant cuts, the decisions' straight-through gradient kept
        hard = decided.detach()
        # Bernoulli log-likelihood from logits (stable): b log p + (1 - b) log(1 - p) on free positions.
        log_prob = -(F.binary_cross_entropy_with_logits(logits, hard, reduction="none") * free).sum(dim=1)
        plan = segment_plan(boundaries.detach(), real)
        scores = self.attention.scores(hidden) if self.attention is not None else None
        pooled, pooled_mask = segment_pool(hidden, boundaries, real, scores=scores, plan=plan)
        if self.config.reembed_positions:
            positions = sinusoidal_positions(pooled.shape[1], pooled.shape[2], device=pooled.device)
            pooled = pooled + positions.to(pooled.dtype).unsqueeze(0) * pooled_mask.unsqueeze(-1).to(
                pooled.dtype
            )
        num_positions = real.sum(dim=1)
        counts = self._target_counts(num_positions, target_counts)
        targets = None
        if "phones" in self.config.loss and phone_boundaries is not None:
            targets = self.supervised_targets(phone_boundaries, real, counts)
            # where the true boundaries are known, the count loss aims at their number: a transcript's
            # dictionary phoneme count must not pull against the phones loss (flite: 4.9x against 4.6x)
            known = (targets >= 0).any(dim=1)
            counts = torch.where(known, (targets > 0).sum(dim=1).to(counts.dtype), counts)
        losses = self._losses(decided, probs, real, counts, logits, free, targets)
        weights = self.config.loss_weights or ()
        total = sum((w * losses[n] for n, w in zip(self.config.loss, weights)), probs.new_zeros(()))
        return BoundaryOutput(
            boundaries=boundaries,
            probs=probs,
            pooled=pooled,
            pooled_mask=pooled_mask,
            loss=self.loss_weight * total,
            num_boundaries=plan.counts,
            num_positions=num_positions,
            log_prob=log_prob,
            losses=losses,
            target_counts=counts,
            mask=real,
        )

    def _target_counts(self, num_positions: Tensor, target_counts: Tensor | None) -> Tensor:
        if target_counts is None:
            if self.config.target != "fixed" and self.training and self.config.loss:
                raise ValueError(
                    f"config.target={self.config.target!r} needs target_counts in training "
                    "(see magnet_asr.compression.targets.transcript_counts)"
                )
            return num_positions.float() * self.prior
        target_counts = torch.as_tensor(target_counts, device=num_positions.device).float()
        if target_counts.shape != num_positions.shape:
            raise ValueError(
                f"target_counts {tuple(target_counts.shape)} must be ({num_positions.shape[0]},)"
            )
        return target_counts

    def _losses(
        self,
        boundaries: Tensor,
        probs: Tensor,
        real: Tensor,
        counts: Tensor,
        logits: Tensor,
        free: Tensor,
        phone_targets: Tensor | None,
    ) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        for name in self.config.loss:
            if name == "binomial":
                losses[name] = binomial_count_loss(boundaries, real, target_counts=counts)
            elif name == "ratio":
                losses[name] = ratio_loss(boundaries, probs, real, target_counts=counts)
            elif name == "repulsion":
                losses[name] = repulsion_loss(boundaries, real, distance=self.config.repulsion_distance)
            elif phone_targets is not None:  # phones
                losses[name] = phone_boundary_loss(logits, phone_targets, free)
            else:  # no phone times given (evaluation, or data without them): nothing to learn from
                losses[name] = logits.sum() * 0.0
        return losses

    @staticmethod
    def supervised_targets(phone_boundaries: Tensor, real: Tensor, counts: Tensor) -> Tensor:
        """``(B, L)`` targets of the ``phones`` loss: each known row's phone boundaries split up to its
        target count (:func:`~magnet_asr.compression.targets.supervised_boundaries`), ``UNKNOWN`` elsewhere."""
        if phone_boundaries.shape != real.shape:
            raise ValueError(
                f"phone_boundaries {tuple(phone_boundaries.shape)} do not match the predictor's frames "
                f"{tuple(real.shape)}: phone supervision needs a predictor on the encoder stem's frames"
            )
        targets = torch.full(real.shape, UNKNOWN, dtype=torch.float32, device=real.device)
        lengths = real.sum(dim=1).tolist()
        for row, (n, count) in enumerate(zip(lengths, counts.tolist())):
            known = phone_boundaries[row, :n]
            if n == 0 or bool((known < 0).any()):
                continue
            phones = (known > 0.5).nonzero().flatten().tolist()
            ends = supervised_boundaries(sorted({*phones, n - 1}), n, count)
            targets[row, :n] = 0.0
            targets[row, ends] = 1.0
        return targets

    def extra_repr(self) -> str:
        c = self.config
        losses = ",".join(c.loss) or "none"
        return f"variant={c.variant}, prior={self.prior:g}, pooling={c.pooling}, loss={losses}"
