"""Datasets and collators shared by training and evaluation.

A :class:`SpeechDataset` item is the loaded waveform, or the reason it could not be loaded; the
collators drop bad items and report how many they dropped (``num_skipped``), so a corrupt file or an
empty transcript costs one sample, never the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from magnet_asr.audio import (
    ENCODER_FRAMES_PER_SECOND,
    AudioError,
    load_audio,
    log_mel_spectrogram,
    num_encoder_frames,
)
from magnet_asr.data.manifest import Utterance

IGNORE_INDEX = -100  # label positions the loss ignores (PyTorch's cross_entropy default)


class SpeechDataset(torch.utils.data.Dataset):
    """Utterances from a manifest; ``__getitem__`` -> dict with ``audio`` or ``error``."""

    def __init__(self, utterances: Sequence[Utterance], max_seconds: float | None = 30.0) -> None:
        self.utterances = list(utterances)
        self.max_seconds = max_seconds

    def __len__(self) -> int:
        return len(self.utterances)

    @property
    def durations(self) -> list[float]:
        return [u.duration for u in self.utterances]

    def __getitem__(self, index: int) -> dict[str, Any]:
        utt = self.utterances[index]
        item: dict[str, Any] = {"id": utt.id, "path": utt.audio, "text": utt.text.strip()}
        if utt.phones is not None and utt.phone_ends is not None:
            item["phones"], item["phone_ends"] = utt.phones, utt.phone_ends
        if not item["text"]:
            item["error"] = f"{utt.id}: empty transcript"
            return item
        try:
            item["audio"] = load_audio(utt.audio, max_seconds=self.max_seconds)
        except AudioError as e:
            item["error"] = str(e)
        return item


def pad_features(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(n_mels, T_i)`` features zero-padded to the longest: ``(B, n_mels, T)`` and mask ``(B, T)``."""
    longest = max(f.shape[-1] for f in features)
    out = features[0].new_zeros(len(features), features[0].shape[0], longest)
    mask = torch.zeros(len(features), longest, dtype=torch.long)
    for i, f in enumerate(features):
        out[i, :, : f.shape[-1]] = f
        mask[i, : f.shape[-1]] = 1
    return out, mask


def pad_sequences(sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def collate_phone_boundaries(items: Sequence[dict[str, Any]]) -> torch.Tensor:
    """``(B, L)`` true phone ends on encoder-stem frames (50 frames/s) of the items' ``audio``: 1 on a
    frame that ends a phone (:func:`~magnet_asr.compression.targets.reference_boundaries`, the rule the
    boundary metrics score), 0 on the other real frames; ``-1`` on padding and on every frame of an item
    without ``phone_ends`` (unknown, not "no boundary"). ``L`` is the longest item's frame count."""
    from magnet_asr.compression.targets import UNKNOWN, phone_boundary_frames, reference_boundaries

    frames = [num_encoder_frames(len(item["audio"])) for item in items]
    out = torch.full((len(items), max(frames)), UNKNOWN)
    for row, (item, n) in enumerate(zip(items, frames)):
        if "phone_ends" not in item:
            continue
        times = reference_boundaries(item["phones"], item["phone_ends"])
        out[row, :n] = 0.0
        out[row, phone_boundary_frames(times, n, 1.0 / ENCODER_FRAMES_PER_SECOND)] = 1.0
    return out


def collate_target_counts(
    texts: Sequence[str], kind: str | None, num_predictors: int, per_unit: float = 1.0
) -> torch.Tensor | None:
    """Per-utterance boundary targets ``(num_predictors, B)`` from transcripts (phonemes or syllables).

    ``per_unit`` scales the unit counts (1.7 aims at 1.7 segments per phoneme).

    ``None`` for ``fixed`` (or no predictors): the predictor then aims at its prior rate per real frame.
    Every predictor gets the same transcript count; the encoder clamps it to the frames it sees.
    """
    if num_predictors == 0 or kind in (None, "fixed"):
        return None
    from magnet_asr.compression import transcript_counts

    if not per_unit > 0:
        raise ValueError(f"compressor.boundaries_per_unit must be > 0, got {per_unit}")
    counts = (transcript_counts(list(texts), kind) * per_unit).clamp_min(1.0)
    return counts[None].expand(num_predictors, -1).clone()


@dataclass
class WhisperCollator:
    """Batches for (Magnet)Whisper: features at their true length + mask, labels, target counts.

    Labels follow Whisper fine-tuning: the decoder prompt (start, language, task, no-timestamps), the
    text with a leading space, end-of-text; the start token is dropped from labels because the model
    shifts it back in as the first decoder input. ``prompt``: the prompt decoding starts from
    (:func:`magnet_asr.models.whisper_generation.decoder_prompt`), so a multilingual model is trained
    on the language and task it is decoded with; None: the tokenizer's own prefix.
    """

    tokenizer: Any
    n_mels: int = 80
    target: str | None = None
    num_predictors: int = 0
    boundaries_per_unit: float = 1.0
    pad_to: int | None = None  # samples; N_SAMPLES gives Whisper's 30 s input (zero-shot evaluation)
    # also return ``utterance_ids``, ``audio_paths`` and ``waveforms`` (lists): distillation looks up its
    # teacher targets by them (and computes missing ones); the trainer removes them before the forward
    keep_ids: bool = False
    # also return ``phone_boundaries`` (collate_phone_boundaries) for the predictor's ``phones`` loss
    phone_boundaries: bool = False
    prompt: Sequence[int] | None = None

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        good = [it for it in items if "error" not in it]
        batch: dict[str, Any] = {"num_skipped": len(items) - len(good)}
        if not good:
            return batch
        feats = [log_mel_spectrogram(it["audio"], self.n_mels, pad_to=self.pad_to) for it in good]
        batch["input_features"], batch["attention_mask"] = pad_features(feats)
        labels = [self.label_ids(it["text"]) for it in good]
        batch["labels"] = pad_sequences(labels, IGNORE_INDEX)
        counts = collate_target_counts(
            [it["text"] for it in good], self.target, self.num_predictors, self.boundaries_per_unit
        )
        if counts is not None:
            batch["target_counts"] = counts
        if self.phone_boundaries:
            batch["phone_boundaries"] = collate_phone_boundaries(good)
        if self.keep_ids:
            batch["utterance_ids"] = [it["id"] for it in good]
            batch["audio_paths"] = [it["path"] for it in good]
            batch["waveforms"] = [it["audio"] for it in good]
        return batch

    def label_ids(self, text: str) -> list[int]:
        """Label tokens of ``text``: the prompt without the start token, text, end of text."""
        if self.prompt is not None:
            text_ids = self.tokenizer(" " + text, add_special_tokens=False).input_ids
            return [*self.prompt[1:], *text_ids, int(self.tokenizer.eos_token_id)]
        ids = self.tokenizer(" " + text).input_ids
        start = self.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
        return ids[1:] if ids and ids[0] == start else ids


def waveforms_of(items: Sequence[dict[str, Any]]) -> list[np.ndarray]:
    return [it["audio"] for it in items if "error" not in it]
