"""Recognizers behind one interface, so `eval` and `transcribe` work for every model family.

A recognizer turns a batch of 16 kHz waveforms into :class:`Transcription` objects. Plain Whisper
checkpoints (bundled name, local directory or hub name) are decoded with transformers' ``generate``
on 30 s padded input, as transformers does: a pretrained Whisper fed its exact length without
fine-tuning collapses (DESIGN.md). Later model families register a loader in ``LOADERS`` under their
``model_type``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from magnet_asr.audio import CHUNK_LENGTH, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram, num_encoder_frames

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration

    from magnet_asr.models import MagnetWhisper

# Whisper emits roughly 3-4 tokens per second of speech; this cap stops a looping decoder early
# without ever cutting a real transcript (Whisper's own hard limit is 448 target positions).
TOKENS_PER_SECOND_CAP = 10
MAX_WHISPER_NEW_TOKENS = 440


@dataclass
class Transcription:
    text: str
    encoder_frames: int  # encoder frames of the real audio (50/s)
    compressed_frames: int  # frames after boundary pooling; equal to encoder_frames without compression

    @property
    def compression(self) -> float:
        return self.encoder_frames / max(self.compressed_frames, 1)


class Recognizer(Protocol):
    name: str
    max_seconds: float

    def transcribe(self, waveforms: Sequence[np.ndarray]) -> list[Transcription]: ...


def max_new_tokens_for(seconds: float) -> int:
    return int(min(MAX_WHISPER_NEW_TOKENS, 16 + TOKENS_PER_SECOND_CAP * seconds))


class WhisperRecognizer:
    """Hugging Face ``WhisperForConditionalGeneration``, greedy, batched, 30 s padded input."""

    max_seconds = float(CHUNK_LENGTH)

    def __init__(self, model: WhisperForConditionalGeneration, tokenizer, name: str = "whisper") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.n_mels = int(model.config.num_mel_bins)
        gen = model.generation_config
        self.multilingual = (
            bool(getattr(gen, "is_multilingual", False)) or int(model.config.vocab_size) >= 51865
        )

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu") -> WhisperRecognizer:
        from transformers import AutoTokenizer, WhisperForConditionalGeneration

        # PreTrainedModel.to is wrapped with functools.wraps, whose stub does not bind ``self``
        model = WhisperForConditionalGeneration.from_pretrained(path).to(device)  # type: ignore[arg-type]
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, name=str(path))

    @torch.inference_mode()
    def transcribe(self, waveforms: Sequence[np.ndarray]) -> list[Transcription]:
        device = next(self.model.parameters()).device
        features = torch.stack([log_mel_spectrogram(w, self.n_mels, pad_to=N_SAMPLES) for w in waveforms])
        longest = max(len(w) for w in waveforms) / SAMPLE_RATE
        kwargs: dict = {"max_new_tokens": max_new_tokens_for(longest)}
        if self.multilingual:
            kwargs.update(language="en", task="transcribe")
        tokens = self.model.generate(features.to(device), **kwargs)
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [
            Transcription(text.strip(), num_encoder_frames(len(w)), num_encoder_frames(len(w)))
            for text, w in zip(texts, waveforms)
        ]


def batch_features(waveforms: Sequence[np.ndarray], n_mels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of each waveform at its true length, zero-padded to the longest.

    Returns ``features (B, n_mels, T)`` and ``mask (B, T)`` (1 = real mel frame); models that take the
    mask ignore the padding, so a sample's output does not depend on its batch.
    """
    feats = [log_mel_spectrogram(w, n_mels) for w in waveforms]
    longest = max(f.shape[-1] for f in feats)
    features = torch.zeros(len(feats), n_mels, longest)
    mask = torch.zeros(len(feats), longest, dtype=torch.long)
    for i, f in enumerate(feats):
        features[i, :, : f.shape[-1]] = f
        mask[i, : f.shape[-1]] = 1
    return features, mask


class MagnetWhisperRecognizer(WhisperRecognizer):
    """MagnetWhisper on variable-length input: no padding to 30 s, compression reported per sample."""

    model: MagnetWhisper

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu") -> MagnetWhisperRecognizer:
        from transformers import AutoTokenizer

        from magnet_asr.models import MagnetWhisper

        model = MagnetWhisper.from_pretrained(path).to(device)
        return cls(model, AutoTokenizer.from_pretrained(path), name=str(path))

    @torch.inference_mode()
    def transcribe(self, waveforms: Sequence[np.ndarray]) -> list[Transcription]:
        device = next(self.model.parameters()).device
        features, mask = batch_features(waveforms, self.n_mels)
        encoded = self.model.encode(features.to(device), mask.to(device))
        longest = max(len(w) for w in waveforms) / SAMPLE_RATE
        kwargs: dict = {"max_new_tokens": max_new_tokens_for(longest), "encoder_outputs": encoded}
        if self.multilingual:
            kwargs.update(language="en", task="transcribe")
        tokens = self.model.generate(**kwargs)
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        assert encoded.frames_before is not None and encoded.frames_after is not None  # set by encode
        before, after = encoded.frames_before.tolist(), encoded.frames_after.tolist()
        return [Transcription(t.strip(), int(b), int(a)) for t, b, a in zip(texts, before, after)]


def _load_speech_llm(path: str, device: str = "cpu") -> Recognizer:
    from magnet_asr.evaluation.speech_llm_decode import SpeechLLMRecognizer

    return SpeechLLMRecognizer.from_pretrained(path, device)


LOADERS: dict[str, Callable[[str, str], Recognizer]] = {
    "whisper": WhisperRecognizer.from_pretrained,
    "magnet_whisper": MagnetWhisperRecognizer.from_pretrained,
    "speech_llm": _load_speech_llm,
}


def model_type_of(path: str) -> str:
    """``model_type`` from a local directory's config.json, or from the hub config for a hub name."""
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        return str(json.loads(config_file.read_text()).get("model_type", ""))
    from transformers import AutoConfig

    import magnet_asr.models  # noqa: F401  (registers our model types with AutoConfig)

    return str(AutoConfig.from_pretrained(path).model_type)


def load_recognizer(name_or_path: str, device: str = "cpu") -> Recognizer:
    """Load any supported model from a bundled name, a local directory or a hub name."""
    from magnet_asr.weights import resolve_model

    path = resolve_model(name_or_path)
    model_type = model_type_of(path)
    if model_type not in LOADERS:
        known = ", ".join(sorted(LOADERS))
        raise ValueError(f"{name_or_path}: model_type '{model_type}' is not supported (known: {known})")
    recognizer = LOADERS[model_type](path, device)
    recognizer.name = name_or_path
    return recognizer
