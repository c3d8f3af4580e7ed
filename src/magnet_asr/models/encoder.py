"""Variable-length Whisper encoder with boundary predictors between its layers.

Data flow (shapes batch-first, masks 1 = real)::

    features (B, n_mels, T) + mel mask (B, T)
      -> conv stem (50 frames/s) [-> optional fixed-stride convs] -> hidden (B, L, D) + mask (B, L)
      -> layers [0, k) -> BoundaryPredictor at layer k -> pooled (B, S, D) + mask (B, S) -> layers [k, N)

Parameter names match Hugging Face ``WhisperEncoder`` (``conv1``, ``conv2``, ``embed_positions``,
``layers``, ``layer_norm``) so any Whisper checkpoint loads; predictors live in ``predictors``.
Padding never reaches a real frame: features and conv outputs are masked before each convolution,
so a sample gives the same output alone and in a padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

from magnet_asr.compression import (
    BoundaryOutput,
    BoundaryPredictor,
    BoundaryPredictorConfig,
    scheduled_counts,
)
from magnet_asr.models.attention import RopeWhisperAttention, RotaryEmbedding, additive_mask, apply_mask


@dataclass
class MagnetEncoderOutput(BaseModelOutput):
    """Encoder output; ``encoder_attention_mask`` (B, S) marks real segments for cross-attention.

    ``frames_before`` / ``frames_after`` (B,): real encoder frames before the first predictor (after the
    conv stem) and after the last one. ``segment_sizes`` (B, S): stem frames behind each output vector
    (0 on padding), for proportional attention. ``boundary_loss``: summed, weighted predictor losses (training).

    With ``num_boundary_samples = K > 0`` (reinforcement learning, :mod:`magnet_asr.training.grpo`) every
    per-sample tensor has ``K * B`` rows, input-major (row ``i * K + k`` is draw ``k`` of input ``i``);
    ``boundary_log_prob (K*B,)`` is the log-probability of the drawn boundaries summed over predictors,
    and ``predictor_inputs`` holds the ``(hidden, mask)`` each predictor decided on (the policy's state).
    """

    encoder_attention_mask: torch.Tensor | None = None
    segment_sizes: torch.Tensor | None = None
    frames_before: torch.Tensor | None = None
    frames_after: torch.Tensor | None = None
    boundary_loss: torch.Tensor | None = None
    boundary_outputs: tuple[Any, ...] | None = None
    boundary_log_prob: torch.Tensor | None = None
    predictor_inputs: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None


def stride_mask(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """Mask after a stride-``stride`` layer: output frame j is real iff input frame ``j*stride`` is."""
    return mask[:, ::stride]


class FixedStrideConv(nn.Module):
    """Conv1d with kernel = stride, initialized to average pooling (a fixed-rate compression baseline)."""

    def __init__(self, hidden_size: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(hidden_size, hidden_size, kernel_size=stride, stride=stride)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Average pooling: every tap is identity / stride."""
        eye = torch.eye(self.conv.in_channels) / self.stride
        for tap in range(self.stride):
            self.conv.weight[:, :, tap] = eye
        assert self.conv.bias is not None  # nn.Conv1d(bias=True), the default
        self.conv.bias.zero_()

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden (B, L, D)``, ``mask (B, L)`` -> ``(B, ceil(L/stride), D)`` and its mask."""
        length = hidden.shape[1]
        pad = (-length) % self.stride
        x = nn.functional.pad(apply_mask(hidden, mask).transpose(1, 2), (0, pad))
        return self.conv(x).transpose(1, 2), stride_mask(mask, self.stride)


class MagnetWhisperEncoder(nn.Module):
    """Whisper encoder on the true input length, with optional boundary predictors and RoPE."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        dim = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, dim)
        self.embed_positions.requires_grad_(False)
        self.extra_convs = nn.ModuleList(FixedStrideConv(dim, s) for s in config.extra_conv_strides)
        self.layers = nn.ModuleList(WhisperEncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim)
        self.predictors = nn.ModuleDict(
            {str(layer): build_predictor(config, dim) for layer in config.predictor_layers}
        )

        self.rotary: RotaryEmbedding | None = None
        if config.position_encoding == "rope":
            head_dim = dim // config.encoder_attention_heads
            self.rotary = RotaryEmbedding(head_dim, config.rope_theta)
            for layer in self.layers:  # same parameter names, rotary forward
                layer.self_attn = RopeWhisperAttention(
                    dim, config.encoder_attention_heads, dropout=config.attention_dropout, config=config
                )

    def _stem(
        self, features: torch.Tensor, mel_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if mel_mask is not None:
            features = features * mel_mask[:, None, :].to(features.dtype)
        x = nn.functional.gelu(self.conv1(features))
        if mel_mask is not None:
            x = x * mel_mask[:, None, :].to(x.dtype)  # the stride-2 conv must not see padding
        x = nn.functional.gelu(self.conv2(x)).transpose(1, 2)
        mask = stride_mask(mel_mask, 2) if mel_mask is not None else None
        return x, mask

    def _rope_kwargs(self, hidden: torch.Tensor) -> dict[str, Any]:
        if self.rotary is None:
            return {}
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
        cos_sin = self.rotary(positions)
        return {"rope_query": cos_sin, "rope_key": cos_sin}

    def forward(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        target_counts: torch.Tensor | None = None,
        num_boundary_samples: int = 0,
        phone_boundaries: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MagnetEncoderOutput:
        """``input_features (B, n_mels, T)``, ``attention_mask (B, T)`` over mel frames (None = all real),
        ``target_counts (num_predictors, B)`` per-utterance boundary targets (optional),
        ``phone_boundaries (B, ceil(T/2))`` true phone ends on stem frames for the first predictor's
        ``phones`` loss (:meth:`~magnet_asr.compression.BoundaryPredictor.forward`; optional).

        ``num_boundary_samples = K > 0``: the first predictor draws ``K`` Bernoulli boundary sets per input
        (:meth:`~magnet_asr.compression.BoundaryPredictor.sample`), later predictors one per row, so the
        output has ``K * B`` rows, input-major (see :class:`MagnetEncoderOutput`)."""
        if num_boundary_samples < 0:
            raise ValueError(f"num_boundary_samples must be >= 0, got {num_boundary_samples}")
        if num_boundary_samples and not len(self.predictors):
            raise ValueError("num_boundary_samples needs at least one boundary predictor")
        hidden, mask, frames_before = self._embed(input_features, attention_mask)

        boundary_outputs: list[BoundaryOutput] = []
        losses: list[torch.Tensor] = []
        inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        sampling = {
            "num_samples": num_boundary_samples,
            "inputs": inputs,
            "phone_boundaries": phone_boundaries,
        }
        sizes = None if mask is None else mask.to(hidden.dtype)
        proportional = bool(getattr(self.config, "proportional_attention", False))
        for index, layer in enumerate(self.layers):
            hidden, mask, sizes = self._pool_step(
                index, hidden, mask, sizes, target_counts, boundary_outputs, losses, sampling
            )
            bias = additive_mask(mask, hidden.dtype, sizes if proportional else None)
            hidden = layer(hidden, bias, **self._rope_kwargs(hidden))
        hidden, mask, sizes = self._pool_step(
            len(self.layers), hidden, mask, sizes, target_counts, boundary_outputs, losses, sampling
        )
        hidden = apply_mask(self.layer_norm(hidden), mask)
        log_prob = None
        if num_boundary_samples:
            frames_before = frames_before.repeat_interleave(num_boundary_samples, dim=0)
            log_prob = torch.stack([out.log_prob for out in boundary_outputs]).sum(0)
        frames_after = mask.sum(1) if mask is not None else torch.full_like(frames_before, hidden.shape[1])
        return MagnetEncoderOutput(
            last_hidden_state=hidden,
            encoder_attention_mask=mask,
            segment_sizes=sizes,
            frames_before=frames_before,
            frames_after=frames_after,
            boundary_loss=torch.stack(losses).sum() if losses else None,
            boundary_outputs=tuple(boundary_outputs) or None,
            boundary_log_prob=log_prob,
            predictor_inputs=tuple(inputs) if num_boundary_samples else None,
        )

    def _embed(
        self, input_features: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Conv stem, fixed-stride convs and positions: ``hidden (B, L, D)``, ``mask (B, L)`` (None = all
        real), ``frames_before (B,)``."""
        hidden, mask = self._stem(input_features, attention_mask)
        for conv in self.extra_convs:
            if mask is None:
                mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            hidden, mask = conv(hidden, mask)
        length = hidden.shape[1]
        if self.rotary is None:
            if length > self.embed_positions.num_embeddings:
                raise ValueError(
                    f"input of {length} encoder frames exceeds the {self.embed_positions.num_embeddings} learned "
                    "positions (30 s); use position_encoding='rope' or shorter clips"
                )
            hidden = hidden + self.embed_positions.weight[:length]
        hidden = nn.functional.dropout(hidden, p=self.config.dropout, training=self.training)
        frames_before = (
            mask.sum(1) if mask is not None else torch.full((hidden.shape[0],), length, device=hidden.device)
        )
        return hidden, mask, frames_before

    def _run_layers(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, start: int, stop: int
    ) -> torch.Tensor:
        bias = additive_mask(mask, hidden.dtype)
        for layer in self.layers[start:stop]:
            hidden = layer(hidden, bias, **self._rope_kwargs(hidden))
        return hidden

    def _check_splittable(self, layer: int) -> None:
        if len(self.predictors):
            raise ValueError(
                "an encoder with boundary predictors runs whole: call it, not encode_prefix/suffix"
            )
        if not 0 <= layer <= len(self.layers):
            raise ValueError(f"layer must be in [0, {len(self.layers)}], got {layer}")

    def encode_prefix(
        self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None, num_layers: int = 0
    ) -> MagnetEncoderOutput:
        """The stem and the first ``num_layers`` layers of an encoder without predictors: the hidden states
        entering layer ``num_layers`` (not normalized). With :meth:`encode_suffix` it is the whole forward;
        a SpeechLLM that trains only the top layers caches this part (``SpeechLLMConfig.encoder_train_layers``)."""
        self._check_splittable(num_layers)
        hidden, mask, frames_before = self._embed(input_features, attention_mask)
        hidden = self._run_layers(hidden, mask, 0, num_layers)
        return MagnetEncoderOutput(
            last_hidden_state=hidden,
            encoder_attention_mask=mask,
            frames_before=frames_before,
            frames_after=frames_before,
        )

    def encode_suffix(self, prefix: MagnetEncoderOutput, start: int) -> MagnetEncoderOutput:
        """Layers ``[start, N)`` and the final layer norm on what :meth:`encode_prefix` returned."""
        self._check_splittable(start)
        mask = prefix.encoder_attention_mask
        hidden = self._run_layers(cast(torch.Tensor, prefix.last_hidden_state), mask, start, len(self.layers))
        return MagnetEncoderOutput(
            last_hidden_state=apply_mask(self.layer_norm(hidden), mask),
            encoder_attention_mask=mask,
            frames_before=prefix.frames_before,
            frames_after=prefix.frames_after,
        )

    def _pool_step(self, index, hidden, mask, sizes, target_counts, boundary_outputs, losses, sampling):
        """``_maybe_pool`` plus the stem frames behind each vector (summed per segment when it pools)."""
        if str(index) not in self.predictors:
            return hidden, mask, sizes
        pooled, new_mask = self._maybe_pool(
            index, hidden, mask, target_counts, boundary_outputs, losses, **sampling
        )
        out = boundary_outputs[-1]
        if sizes is None:
            sizes = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
        if sizes.shape[0] != out.boundaries.shape[0]:  # rows repeated by a sampling predictor
            sizes = sizes.repeat_interleave(out.boundaries.shape[0] // sizes.shape[0], dim=0)
        return pooled, new_mask, segment_sizes(sizes, out.boundaries.detach(), out.mask, pooled.shape[1])

    def _maybe_pool(
        self,
        index,
        hidden,
        mask,
        target_counts,
        boundary_outputs,
        losses,
        num_samples=0,
        inputs=None,
        phone_boundaries=None,
    ):
        key = str(index)
        if key not in self.predictors:
            return hidden, mask
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        predictor = self.predictors[key]
        targets = target_counts[len(boundary_outputs)] if target_counts is not None else None
        if targets is not None:
            # rows already multiplied by an earlier sampling predictor: repeat the targets likewise
            if targets.shape[0] != hidden.shape[0]:
                targets = targets.repeat_interleave(hidden.shape[0] // targets.shape[0], dim=0)
            frames = mask.sum(1)
            fraction = getattr(predictor, "curriculum_fraction", 1.0)  # set by the schedule callback
            targets = scheduled_counts(
                frames, targets.to(frames.device).clamp(1, None).minimum(frames), fraction
            )
        if num_samples:
            # the first predictor draws K boundary sets per input; later ones one per (already K-fold) row
            inputs.append((hidden, mask))
            draws = 1 if boundary_outputs else num_samples
            out = predictor.sample(hidden, mask, num_samples=draws, target_counts=targets)
        else:
            # true phone times are on stem frames: only the first predictor sees frames at that rate
            phones = None if boundary_outputs else phone_boundaries
            out = predictor(hidden, mask, target_counts=targets, phone_boundaries=phones)
        boundary_outputs.append(out)
        if out.loss is not None:
            losses.append(out.loss)
        return out.pooled, out.pooled_mask


def segment_sizes(
    sizes: torch.Tensor, boundaries: torch.Tensor, real: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """``(B, S)`` summed ``sizes (B, L)`` of each segment's real frames (``boundaries`` mark segment ends)."""
    hard = (boundaries > 0.5) & real.bool()
    segment = (torch.cumsum(hard.long(), dim=1) - hard.long()).clamp(max=max(num_segments - 1, 0))
    weights = sizes * real.to(sizes.dtype)
    return sizes.new_zeros(sizes.shape[0], num_segments).scatter_add_(1, segment, weights)


def init_own_parameters(model: nn.Module) -> None:
    """Re-run the own initialization of the modules that have one (predictors, fixed-stride convs).

    For ``PreTrainedModel.init_weights``: its generic Linear/Conv init reaches these modules' layers but
    never the modules themselves (they hold no parameters directly), so the prior bias, identity router
    and average-pooling weights are restored here, after it.
    """
    for module in model.modules():
        if isinstance(module, (BoundaryPredictor, FixedStrideConv)):
            module.reset_parameters()


def build_predictor(config, hidden_size: int) -> nn.Module:
    """A :class:`BoundaryPredictor` from the config's shared ``predictor_settings``."""

    return BoundaryPredictor(
        BoundaryPredictorConfig(hidden_size=hidden_size, **dict(config.predictor_settings))
    )
