"""``AudioProjector``: encoder frames -> LLM input embeddings (audio tokens).

Two steps, as in SLAM-ASR (Ma et al., 2024) and Ultravox:

1. **Frame stacking** by ``k``: ``k`` consecutive encoder frames are concatenated into one vector, so
   the 50 frames/s of Whisper become ``50 / k`` audio tokens/s (k=4: 12.5/s). Stacking loses no
   information (unlike pooling), it only moves time into channels. A sample with ``n`` real frames
   gets exactly ``ceil(n / k)`` tokens, counted from its mask and never from the padded length; its
   last group is completed with zeros, which is also what a padded batch puts there, so a sample's
   tokens do not depend on its batch.
2. **MLP**: ``RMSNorm -> Linear -> GELU -> Linear -> RMSNorm``. The output RMSNorm is the important
   one: without it the audio embeddings come out orders of magnitude smaller (or larger) than the
   LLM's token embeddings and the LLM treats them as noise (DESIGN.md). Its gain starts at the RMS of
   the LLM's token embeddings (:func:`embedding_rms`), so audio and text tokens start on one scale.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

__all__ = ["AudioProjector", "embedding_rms", "stack_frames", "stacked_lengths"]


def stacked_lengths(lengths: torch.Tensor, stack: int) -> torch.Tensor:
    """Audio tokens per sample for ``lengths (B,)`` real frames: ``ceil(lengths / stack)``."""
    return torch.div(lengths + stack - 1, stack, rounding_mode="floor")


def stack_frames(
    hidden: torch.Tensor, mask: torch.Tensor | None, stack: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``stack`` consecutive frames.

    ``hidden (B, L, D)``, ``mask (B, L)`` (1 = real; None = all real) ->
    ``(B, ceil(L / stack), stack * D)`` and its mask ``(B, ceil(L / stack))``. Padding frames are zeroed
    first, so the partial group at the end of a sample holds zeros whatever the batch padding was.
    """
    batch, length, dim = hidden.shape
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
    hidden = hidden * mask[..., None].to(hidden.dtype)
    pad = (-length) % stack
    if pad:
        hidden = nn.functional.pad(hidden, (0, 0, 0, pad))
    groups = (length + pad) // stack
    stacked = hidden.reshape(batch, groups, stack * dim)
    counts = stacked_lengths(mask.sum(1), stack)
    stacked_mask = (torch.arange(groups, device=hidden.device)[None] < counts[:, None]).long()
    return stacked, stacked_mask


def embedding_rms(embeddings: nn.Module | torch.Tensor) -> float:
    """Root-mean-square value of a token embedding table (``nn.Embedding`` or its weight)."""
    weight = embeddings if isinstance(embeddings, torch.Tensor) else cast(torch.Tensor, embeddings.weight)
    with torch.no_grad():
        return float(weight.detach().float().pow(2).mean().sqrt())


class AudioProjector(nn.Module):
    """Frame stacking + ``RMSNorm -> Linear -> GELU -> Linear -> RMSNorm``.

    Args:
        input_size: encoder width ``D``.
        output_size: LLM embedding width ``H``.
        stack: frames per audio token ``k``.
        hidden_size: inner width of the MLP.
        dropout: dropout after the GELU (training only).
        output_scale: initial gain of the output RMSNorm; pass the RMS of the LLM's token embeddings.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        stack: int = 4,
        hidden_size: int = 1024,
        dropout: float = 0.0,
        output_scale: float = 1.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if stack < 1:
            raise ValueError(f"projector stack must be >= 1, got {stack}")
        if not (output_scale > 0 and math.isfinite(output_scale)):
            raise ValueError(f"output_scale must be positive and finite, got {output_scale}")
        self.stack = stack
        self.input_norm = nn.RMSNorm(stack * input_size, eps=eps)
        self.linear_in = nn.Linear(stack * input_size, hidden_size)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.linear_out = nn.Linear(hidden_size, output_size)
        self.output_norm = nn.RMSNorm(output_size, eps=eps)
        with torch.no_grad():
            self.output_norm.weight.fill_(output_scale)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Audio tokens for ``lengths (B,)`` real encoder frames."""
        return stacked_lengths(lengths, self.stack)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden (B, L, D)``, ``mask (B, L)`` -> embeddings ``(B, S, H)`` (zero on padding) and
        their mask ``(B, S)``, ``S = ceil(L / stack)``."""
        stacked, stacked_mask = stack_frames(hidden, mask, self.stack)
        x = self.activation(self.linear_in(self.input_norm(stacked)))
        x = self.output_norm(self.linear_out(self.dropout(x)))
        return x * stacked_mask[..., None].to(x.dtype), stacked_mask
