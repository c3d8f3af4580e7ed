"""Attention pieces for variable-length Whisper: 1-D padding masks and rotary position embeddings.

Masks are ``(B, L)`` with 1 = real frame; :func:`additive_mask` turns one into the ``(B, 1, 1, L)``
additive form Hugging Face attention takes for keys. Padded *queries* need no mask: their outputs are
ignored downstream (zeroed by :func:`apply_mask`), so a sample's real outputs never see padding.

Rotary embeddings (RoFormer, Su et al. 2021) replace Whisper's absolute positions in the ``rope``
variant: they depend only on relative offsets, so a model trained on short clips generalizes across
lengths and across compressed segment sequences whose positions are segment indices.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.whisper.modeling_whisper import WhisperAttention


def additive_mask(
    mask: torch.Tensor | None, dtype: torch.dtype, sizes: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``(B, L)`` 1/0 key mask -> ``(B, 1, 1, L)`` additive mask (0 for real keys, dtype-min for padding).

    ``sizes (B, L)``: frames behind each key; adds ``log(size)`` to real keys (proportional attention,
    Bolya et al. 2023, "Token Merging"): a segment of ``n`` alike frames then draws the attention those
    ``n`` frames drew, so pooling changes what a pretrained layer attends to as little as it can.
    """
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    if sizes is not None:
        bias = bias + sizes.to(dtype).clamp_min(1.0).log()
    bias = bias.masked_fill(mask == 0, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def apply_mask(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded frames of ``hidden (B, L, D)`` so padding carries nothing forward."""
    if mask is None:
        return hidden
    return hidden * mask[..., None].to(hidden.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary embeddings: ``forward(positions (B, L)) -> (cos, sin)`` each ``(B, 1, L, head_dim)``."""

    def __init__(self, head_dim: int, theta: float = 10_000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Frequencies are computed here, not kept in a buffer: from_pretrained builds modules on the meta
        # device and would leave a non-persistent buffer uninitialized.
        exponents = (
            torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device) / self.head_dim
        )
        inv_freq = 1.0 / (self.theta**exponents)
        freqs = positions[..., None].float() * inv_freq  # (B, L, head_dim / 2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, L, head_dim)
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (B, H, L, head_dim)`` by the angles in ``cos``/``sin`` ``(B, 1, L, head_dim)``."""
    return (x.float() * cos + _rotate_half(x.float()) * sin).to(x.dtype)


class RopeWhisperAttention(WhisperAttention):
    """Whisper attention (same parameters, so checkpoints load) with rotary embeddings on queries and keys.

    The caller passes ``rope_query`` and ``rope_key`` (each a ``(cos, sin)`` pair) as keyword arguments:
    for self-attention both come from the same positions; for cross-attention the queries use token
    positions and the keys use encoder segment positions. Keys are rotated before they are cached.

    Only our own code calls it (the encoder through ``WhisperEncoderLayer``, which passes no cache; the
    RoPE decoder directly), so the cache has one name here. It keeps the cache the way Whisper's attention
    does: an ``EncoderDecoderCache`` whose ``is_updated[layer]`` says the cross-attention keys of that
    layer are cached, read back from ``cross_attention_cache.layers[layer]``. Those are transformers
    internals; ``tests/models/test_transformers_cache.py`` pins what we rely on.
    """

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        rope_query: tuple[torch.Tensor, torch.Tensor] | None = None,
        rope_key: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        is_cross = key_value_states is not None
        batch, length = hidden_states.shape[:2]
        query = (
            (self.q_proj(hidden_states) * self.scaling).view(batch, length, -1, self.head_dim).transpose(1, 2)
        )
        if rope_query is not None:
            query = apply_rotary(query, *rope_query)

        source = hidden_states if key_value_states is None else key_value_states
        if cache is None:
            key, value = self._keys_values(source, rope_key)
        else:
            layer = self.layer_idx
            assert layer is not None  # decoder layers have one, and only they get a cache
            if is_cross and cache.is_updated.get(layer):
                # later steps: the (rotated) keys and the values this layer cached on the first step
                # (Any: the layer list's type also admits linear-attention layers, which hold no keys)
                stored: Any = cache.cross_attention_cache.layers[layer]
                key, value = stored.keys, stored.values
            else:
                part = cache.cross_attention_cache if is_cross else cache.self_attention_cache
                key, value = part.update(*self._keys_values(source, rope_key), layer)
                if is_cross:
                    cache.is_updated[layer] = True

        # transformers hands sdpa no mask when causality alone suffices; restore it then.
        causal = attention_mask is None and self.is_causal and not is_cross and length > 1
        out = nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            scale=1.0,  # queries are pre-scaled, as in Whisper
        )
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.out_proj(out), None

    def _keys_values(
        self, source: torch.Tensor, rope_key: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated when ``rope_key`` is given) and values ``(B, H, L, head_dim)`` of ``source``."""
        batch = source.shape[0]
        key = self.k_proj(source).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(source).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        if rope_key is not None:
            key = apply_rotary(key, *rope_key)
        return key, value
