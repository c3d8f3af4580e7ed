"""Audio constants, loading, validation and Whisper log-mel features.

Constants follow openai/whisper ``audio.py``: 16 kHz mono, 25 ms windows (400 samples)
every 10 ms (160 samples), so 100 mel frames/s; the encoder's conv stem halves that to
50 frames/s; a Whisper window is 30 s.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30  # seconds in one Whisper window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames/s
ENCODER_STRIDE = 2  # the conv stem's second convolution has stride 2
ENCODER_FRAMES_PER_SECOND = FRAMES_PER_SECOND // ENCODER_STRIDE  # 50 encoder frames/s
SILENCE_PEAK = 1e-4  # peak amplitude below which a clip counts as silent (about -80 dBFS)
# One analysis window (25 ms): a shorter clip has no mel frame, and the STFT's reflect padding fails on it.
MIN_SECONDS = N_FFT / SAMPLE_RATE
SAMPLES_PER_ENCODER_FRAME = HOP_LENGTH * ENCODER_STRIDE  # 320 samples, 20 ms
# A long clip's window may end up to this much before its 30 s limit, at the quietest encoder frame there.
LONG_FORM_SEARCH_SECONDS = 5.0
# pause_windows: a pause is a run of encoder frames this far below the clip's loud frames (its 95th
# percentile frame energy), at least PAUSE_SECONDS long; a piece shorter than MIN_PIECE_SECONDS is joined
# to a neighbour (a lone word read without context)
PAUSE_DROP_DB = 30.0
PAUSE_SECONDS = 0.3
MIN_PIECE_SECONDS = 1.0


class AudioError(ValueError):
    """Audio that cannot be used; the message names the file and the reason on one line.

    ``kind`` is the reason in a few words (``missing``, ``unreadable``, ``empty``, ``too short``,
    ``non-finite``, ``silent``, ``too long``), so callers can count the clips they left out by reason.
    """

    def __init__(self, message: str, kind: str = "unreadable") -> None:
        super().__init__(message)
        self.kind = kind


def is_silent(audio: np.ndarray) -> bool:
    """True for an empty clip or one whose peak is below :data:`SILENCE_PEAK` (digital silence)."""
    return audio.size == 0 or float(np.abs(audio).max()) < SILENCE_PEAK


def _name(source: str | Path | None) -> str:
    return str(source) if source is not None else "<audio>"


def validate(
    audio: np.ndarray,
    source: str | Path | None = None,
    max_seconds: float | None = None,
    allow_silent: bool = False,
) -> np.ndarray:
    """Check a 16 kHz mono waveform; return it as float32 or raise :class:`AudioError`."""
    name = _name(source)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise AudioError(f"{name}: expected mono audio, got shape {tuple(audio.shape)}")
    if audio.size == 0:
        raise AudioError(f"{name}: empty audio (0 samples)", "empty")
    if not np.isfinite(audio).all():
        raise AudioError(f"{name}: audio contains NaN or Inf samples", "non-finite")
    if not allow_silent and is_silent(audio):
        raise AudioError(f"{name}: audio is silent (peak below {SILENCE_PEAK:g})", "silent")
    seconds = audio.size / SAMPLE_RATE
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(
            f"{name}: audio is {seconds:.1f} s long, longer than the maximum of {max_seconds:g} s", "too long"
        )
    return audio


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample with soxr (high quality); a no-op when the rates match."""
    if orig_sr == target_sr:
        return audio.astype(np.float32, copy=False)
    if orig_sr <= 0:
        raise AudioError(f"invalid sample rate {orig_sr}")
    import soxr

    return soxr.resample(audio, orig_sr, target_sr, quality="HQ").astype(np.float32)


def load_audio(
    path: str | Path,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
    allow_silent: bool = False,
) -> np.ndarray:
    """Load any format libsndfile reads (wav, flac, ogg, mp3 where supported) as mono float32.

    Returns shape ``(num_samples,)`` at ``sample_rate``; raises :class:`AudioError` with a one-line
    message naming the file for a missing, unreadable, empty, too-short (under one analysis window),
    silent, non-finite or too-long clip.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: file not found", "missing")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    return _read_checked(str(path), path, sample_rate, max_seconds, allow_silent)


def decode_audio(
    data: bytes,
    name: str,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
    allow_silent: bool = False,
) -> np.ndarray:
    """:func:`load_audio` for an encoded file held in memory (a ``datasets`` row's audio bytes);
    ``name`` (the utterance id) is what error messages name."""
    import io

    return _read_checked(io.BytesIO(data), name, sample_rate, max_seconds, allow_silent)


def _read_checked(
    source: Any, name: str | Path, sample_rate: int, max_seconds: float | None, allow_silent: bool
) -> np.ndarray:
    import soundfile as sf

    try:
        data, sr = sf.read(source, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises several types for bad files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AudioError(f"{name}: cannot decode audio ({reason})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{name}: empty audio (0 samples)", "empty")
    if data.shape[0] / sr < MIN_SECONDS:
        raise AudioError(
            f"{name}: audio is {data.shape[0] / sr * 1000:.1f} ms long, shorter than one "
            f"{MIN_SECONDS * 1000:g} ms analysis window",
            "too short",
        )
    if max_seconds is not None and data.shape[0] / sr > max_seconds:
        raise AudioError(
            f"{name}: audio is {data.shape[0] / sr:.1f} s long, longer than the maximum of {max_seconds:g} s",
            "too long",
        )
    audio = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(audio).all():  # before resampling: soxr would smear a NaN over its neighbours
        raise AudioError(f"{name}: audio contains NaN or Inf samples", "non-finite")
    audio = resample(audio, sr, sample_rate)
    return validate(audio, name, max_seconds=max_seconds, allow_silent=allow_silent)


def num_frames(num_samples: int) -> int:
    """Mel frames Whisper's feature extractor gives for ``num_samples`` (the STFT's last frame is dropped)."""
    return num_samples // HOP_LENGTH


def num_encoder_frames(num_samples: int) -> int:
    """Encoder frames after the conv stem (stride 2, kernel 3, padding 1) for ``num_samples``."""
    return math.ceil(num_frames(num_samples) / ENCODER_STRIDE)


def _frame_energy(audio: np.ndarray) -> np.ndarray:
    """Mean square of each whole encoder frame (20 ms) of ``audio``, in float64; a partial last frame is
    left out."""
    step = SAMPLES_PER_ENCODER_FRAME
    frames = len(audio) // step
    return (np.asarray(audio[: frames * step], dtype=np.float64).reshape(frames, step) ** 2).mean(axis=1)


def long_form_windows(
    audio: np.ndarray, max_seconds: float = CHUNK_LENGTH, search_seconds: float = LONG_FORM_SEARCH_SECONDS
) -> list[tuple[int, int]]:
    """``(start, end)`` sample ranges that cover ``audio`` in order, each at most ``max_seconds`` long.

    A clip that fits is one window. A longer one is cut where it is quietest: each window ends after the
    encoder frame (20 ms) of least energy among its last ``search_seconds`` (at most a sixth of the window),
    so a cut falls in a pause between words wherever the clip has one (on ties, the latest such frame).
    Cuts lie on the encoder-frame
    grid, so window ``k``'s frames continue window ``k-1``'s, and the windows do not overlap: their
    transcripts are joined in order. The last window is at least one analysis window long.
    """
    step = SAMPLES_PER_ENCODER_FRAME
    limit = int(max_seconds * SAMPLE_RATE) // step * step
    search = max(1, int(min(search_seconds, max_seconds / 6) * SAMPLE_RATE) // step)
    windows: list[tuple[int, int]] = []
    start, total = 0, len(audio)
    while total - start > limit:
        end = start + limit
        # candidate cut after frame i of the search region; keep the remainder a usable clip
        first = end - search * step
        last_frame = max(1, min(search, (total - N_FFT - first) // step))
        energy = _frame_energy(audio[first : first + last_frame * step])
        quietest = last_frame - 1 - int(np.argmin(energy[::-1]))
        cut = first + (quietest + 1) * step
        windows.append((start, cut))
        start = cut
    windows.append((start, total))
    return windows


def pause_windows(audio: np.ndarray, max_seconds: float) -> list[tuple[int, int]]:
    """``(start, end)`` sample ranges that cover ``audio`` in order: one per stretch of speech between pauses.

    A clip no longer than ``max_seconds`` is one window. A longer one is cut in the middle of every pause
    (:data:`PAUSE_SECONDS` of encoder frames at least :data:`PAUSE_DROP_DB` below the clip's loud frames);
    a piece shorter than :data:`MIN_PIECE_SECONDS` is joined to the one before it (the first one to the
    next), and a piece still longer than ``max_seconds`` is cut by :func:`long_form_windows`. For a model
    trained on single utterances, which reads a window of several sentences worse than each alone
    (issue 15). Cuts lie on the encoder-frame grid and the windows do not overlap.
    """
    step = SAMPLES_PER_ENCODER_FRAME
    frames = len(audio) // step
    if len(audio) <= max_seconds * SAMPLE_RATE or frames < 2:
        return [(0, len(audio))]
    level = 10 * np.log10(_frame_energy(audio) + 1e-12)
    quiet = np.concatenate([[False], level < np.percentile(level, 95) - PAUSE_DROP_DB, [False]])
    edges = np.flatnonzero(np.diff(quiet.astype(np.int8)))  # alternating starts and ends of quiet runs
    min_pause = PAUSE_SECONDS * ENCODER_FRAMES_PER_SECOND
    cuts = [
        (first + last) // 2 * step
        for first, last in zip(edges[::2], edges[1::2])
        if last - first >= min_pause and first > 0 and last < frames
    ]
    pieces: list[tuple[int, int]] = []
    shortest = MIN_PIECE_SECONDS * SAMPLE_RATE
    for start, end in zip([0, *cuts], [*cuts, len(audio)]):
        if pieces and min(end - start, pieces[-1][1] - pieces[-1][0]) < shortest:
            pieces[-1] = (pieces[-1][0], end)
        else:
            pieces.append((start, end))
    return [
        (start + first, start + last)
        for start, end in pieces
        for first, last in long_form_windows(audio[start:end], max_seconds)
    ]


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = 80) -> torch.Tensor:
    """Slaney mel filterbank ``(n_mels, N_FFT // 2 + 1)``, as Whisper's feature extractor builds it."""
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(np.asarray(fb, dtype=np.float32)).T.contiguous()


def log_mel_spectrogram(
    audio: np.ndarray | torch.Tensor, n_mels: int = 80, pad_to: int | None = None
) -> torch.Tensor:
    """Whisper log-mel features of one waveform.

    ``audio``: ``(num_samples,)`` at 16 kHz. ``pad_to``: pad the *waveform* with silence to this many
    samples first (``N_SAMPLES`` reproduces Whisper's 30 s input); padding the waveform rather than the
    features matters: zero-padded features cost tiny.en about 2 WER points (docs/architecture.md).
    Returns ``(n_mels, num_samples // HOP_LENGTH)`` float32, matching ``WhisperFeatureExtractor``.
    """
    wav = torch.as_tensor(audio, dtype=torch.float32)
    if pad_to is not None and wav.shape[-1] < pad_to:
        wav = torch.nn.functional.pad(wav, (0, pad_to - wav.shape[-1]))
    window = torch.hann_window(N_FFT)
    stft = torch.stft(wav, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    mel = mel_filters(n_mels) @ magnitudes
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0
