"""Recognizers behind one interface, so `eval` and `transcribe` work for every model family.

A recognizer turns a batch of 16 kHz waveforms into :class:`Transcription` objects. Plain Whisper
checkpoints (bundled name, local directory or hub name) are decoded with transformers' ``generate``
on 30 s padded input, as transformers does: a pretrained Whisper fed its exact length without
fine-tuning collapses (docs/architecture.md). Later model families register a loader in ``LOADERS`` under their
``model_type``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from magnet_asr.audio import (
    CHUNK_LENGTH,
    ENCODER_FRAMES_PER_SECOND,
    N_SAMPLES,
    SAMPLE_RATE,
    SAMPLES_PER_ENCODER_FRAME,
    is_silent,
    log_mel_spectrogram,
    long_form_windows,
    num_encoder_frames,
    num_frames,
    pause_windows,
)
from magnet_asr.models.speech_llm_generation import DecodeSettings
from magnet_asr.models.whisper_generation import GREEDY, DecodingOptions, decode, language_and_task
from magnet_asr.text import MAX_NEW_TOKENS_FLOOR, MAX_NEW_TOKENS_PER_SECOND

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration

    from magnet_asr.models import MagnetWhisper

# Whisper's decoder has 448 target positions; its prompt takes a few of them. Below that, the per-second
# cap of magnet_asr.text (MAX_NEW_TOKENS_PER_SECOND) stops a looping decoder early.
MAX_WHISPER_NEW_TOKENS = 440


@dataclass
class Transcription:
    """One hypothesis and what the encoder did with the clip.

    ``boundary_frames[k]``: the segment ends of predictor ``k`` (in the order of the config's
    ``predictor_layers``) as sorted encoder-stem frame indices (50 frames/s) of this sample's real frames,
    the final forced one included; a later predictor's segment ends where its last constituent frame
    ends (:func:`stem_segment_ends`). None for a model without predictors. ``hit_token_cap``: decoding
    stopped at ``max_new_tokens`` without an end-of-text token (a loop, or a cap too low).
    """

    text: str
    encoder_frames: int  # encoder frames of the real audio (50/s)
    compressed_frames: int  # frames after boundary pooling; equal to encoder_frames without compression
    boundary_frames: list[list[int]] | None = None
    hit_token_cap: bool = False

    @property
    def compression(self) -> float:
        return self.encoder_frames / max(self.compressed_frames, 1)


class Recognizer(Protocol):
    """``max_seconds``: the longest clip read whole. A recognizer may also set ``split_at_pauses = True``:
    :func:`transcribe_long` then cuts longer clips at every pause (:func:`magnet_asr.audio.pause_windows`)
    instead of into windows as long as possible."""

    name: str
    max_seconds: float

    def transcribe(self, waveforms: Sequence[np.ndarray]) -> list[Transcription]: ...


def max_new_tokens_for(seconds: float) -> int:
    return int(min(MAX_WHISPER_NEW_TOKENS, MAX_NEW_TOKENS_FLOOR + MAX_NEW_TOKENS_PER_SECOND * seconds))


# What transformers' own Whisper ``generate`` makes ``GenerationMixin.generate`` warn, whatever its caller
# passes (5.23, 5.24): it fills ``max_length`` with the global default before that call, so every
# ``max_new_tokens`` reads as "both set", and it passes ``generation_config`` together with
# ``suppress_tokens``. Neither is ours to act on; each would print on every ``transcribe`` and eval batch.
_WHISPER_INTERNAL_WARNINGS = (
    "Both `max_new_tokens`",
    "Passing `generation_config` together with generation-related",
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: Sequence[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextmanager
def _quiet_whisper_generate() -> Iterator[None]:
    """Drop :data:`_WHISPER_INTERNAL_WARNINGS` during one Whisper ``generate`` call (and only those)."""
    logger = logging.getLogger("transformers.generation.utils")
    drop = _DropMessages(_WHISPER_INTERNAL_WARNINGS)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def stem_segment_ends(
    boundary_outputs: Sequence[Any], stem_frames: Sequence[int], stride: int = 1
) -> list[list[list[int]]]:
    """Segment ends of every predictor, per sample, as encoder-stem frame indices (50 frames/s).

    ``boundary_outputs[k]`` has ``boundaries`` and ``mask`` ``(B, L_k)`` over predictor ``k``'s input;
    ``stem_frames[b]``: real stem frames of sample ``b``; ``stride``: stem frames per input frame of the
    first predictor (the product of ``extra_conv_strides``; input frame ``j`` ends at stem frame
    ``min((j+1)*stride, stem_frames) - 1``). Predictor ``k > 0`` decides over predictor ``k-1``'s segments,
    so its boundary at input ``j`` is the end of segment ``j`` of predictor ``k-1``. The last real frame is
    always a segment end (real frames after the last boundary form one final segment). Returns
    ``[b][k] -> sorted list of stem frame indices``.
    """
    out: list[list[list[int]]] = []
    for b, frames in enumerate(stem_frames):
        # each predictor input frame, as the stem frame it ends at
        input_ends = [min((j + 1) * stride, int(frames)) - 1 for j in range(-(-int(frames) // stride))]
        per_layer: list[list[int]] = []
        for level in boundary_outputs:
            real = (
                level.mask[b].bool()
                if level.mask is not None
                else torch.ones_like(level.boundaries[b]).bool()
            )
            decided = (level.boundaries[b] > 0.5) & real
            local = torch.nonzero(decided).flatten().tolist()
            last = int(real.sum()) - 1
            if last >= 0 and (not local or local[-1] != last):
                local.append(last)
            ends = [input_ends[j] for j in local if j < len(input_ends)]
            per_layer.append(ends)
            input_ends = ends
        out.append(per_layer)
    return out


class WhisperRecognizer:
    """Hugging Face ``WhisperForConditionalGeneration``, batched, 30 s padded input; greedy, or with
    openai-whisper's guards (``decoding``, :mod:`magnet_asr.models.whisper_generation`)."""

    max_seconds = float(CHUNK_LENGTH)

    def __init__(
        self,
        model: WhisperForConditionalGeneration,
        tokenizer,
        name: str = "whisper",
        decoding: DecodingOptions = GREEDY,
        language: str | None = None,
        task: str | None = None,
        synced_gpus: bool = False,
    ) -> None:
        """``language``, ``task``: the prompt of a multilingual model (default: its generation config's, else
        English transcription; ignored for an English-only one), the pair its training labels started with.
        ``synced_gpus``: for a model sharded over the ranks (FSDP, DeepSpeed ZeRO-3), whose ``generate``
        must keep every rank stepping until all have finished."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.decoding = decoding
        self.n_mels = int(model.config.num_mel_bins)
        self.language, self.task = language_and_task(model, language, task)
        self.synced_gpus = synced_gpus

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu") -> WhisperRecognizer:
        from transformers import AutoTokenizer, WhisperForConditionalGeneration

        # PreTrainedModel.to is wrapped with functools.wraps, whose stub does not bind ``self``
        model = WhisperForConditionalGeneration.from_pretrained(path).to(device)  # type: ignore[arg-type]
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, name=str(path))

    def _decode(
        self,
        encoder_outputs: Any,
        waveforms: Sequence[np.ndarray],
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[list[str], list[bool]]:
        """Texts and token-cap flags of a batch, from its encoder output. With the guards, digital silence
        reads as an empty transcript whatever the decoder says (tiny.en gives "you" with a mean
        log-probability above the no-speech rule's -1), as the SpeechLLM recognizer has always done."""
        seconds = max(len(w) for w in waveforms) / SAMPLE_RATE
        with _quiet_whisper_generate():
            decoded = decode(
                self.model,
                encoder_outputs,
                self.tokenizer,
                max_new_tokens_for(seconds),
                self.decoding,
                language=self.language,
                task=self.task,
                attention_mask=attention_mask,
                synced_gpus=self.synced_gpus,
            )
        texts = [
            "" if silent else text.strip()
            for text, silent in zip(
                self.tokenizer.batch_decode(decoded.tokens, skip_special_tokens=True),
                decoded.no_speech or [False] * len(decoded.tokens),
            )
        ]
        if self.decoding.guards:
            texts = ["" if is_silent(w) else t for t, w in zip(texts, waveforms)]
        return texts, decoded.hit_token_cap

    @torch.inference_mode()
    def transcribe(self, waveforms: Sequence[np.ndarray]) -> list[Transcription]:
        from transformers.modeling_outputs import BaseModelOutput

        device = next(self.model.parameters()).device
        features = torch.stack([log_mel_spectrogram(w, self.n_mels, pad_to=N_SAMPLES) for w in waveforms])
        # Whisper reads the 30 s window whole (its padding is silence, as in pretraining)
        hidden = self.model.get_encoder()(features.to(device)).last_hidden_state
        # every feature frame is real to Whisper (the padding is silence); saying so spares generate's
        # "attention mask is not set with a batched input" warning
        mask = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long, device=device)
        texts, capped = self._decode(BaseModelOutput(last_hidden_state=hidden), waveforms, mask)
        return [
            Transcription(text, num_encoder_frames(len(w)), num_encoder_frames(len(w)), hit_token_cap=cap)
            for text, w, cap in zip(texts, waveforms, capped)
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

    @property
    def predictor_layers(self) -> list[int]:
        """Encoder layer index of each predictor, the order of ``Transcription.boundary_frames``."""
        return list(self.model.config.predictor_layers)

    @torch.inference_mode()
    def transcribe(self, waveforms: Sequence[np.ndarray]) -> list[Transcription]:
        device = next(self.model.parameters()).device
        features, mask = batch_features(waveforms, self.n_mels)
        encoded = self.model.encode(features.to(device), mask.to(device))
        assert encoded.frames_before is not None and encoded.frames_after is not None  # set by encode
        before, after = encoded.frames_before.tolist(), encoded.frames_after.tolist()
        boundaries: list[list[list[int]] | None] = [None] * len(waveforms)
        if encoded.boundary_outputs:
            stride = math.prod(self.model.config.extra_conv_strides)
            stem = [num_encoder_frames(len(w)) for w in waveforms]
            boundaries = list(stem_segment_ends(encoded.boundary_outputs, stem, stride))
        texts, capped = self._decode(encoded, waveforms, mask.to(device))
        return [
            Transcription(t, int(b), int(a), boundary_frames=frames, hit_token_cap=cap)
            for t, b, a, frames, cap in zip(texts, before, after, boundaries, capped)
        ]


def transcribe_long(recognizer: Recognizer, waveforms: Sequence[np.ndarray]) -> list[Transcription]:
    """``recognizer.transcribe`` for clips of any length, every model family.

    A clip longer than ``recognizer.max_seconds`` is cut into windows where it is quietest
    (:func:`magnet_asr.audio.long_form_windows`: no overlap, cuts on the encoder-frame grid), or at its
    pauses for a recognizer with ``split_at_pauses`` (:func:`magnet_asr.audio.pause_windows`); the windows of a
    batch are decoded in batches of the same size, and each clip's transcript is its windows' texts joined
    by a space, its frames summed, its boundary frames shifted to the clip's own frame grid, and
    ``hit_token_cap`` set if any window hit it.
    """
    cut = pause_windows if getattr(recognizer, "split_at_pauses", False) else long_form_windows
    windows = [
        (i, start, end) for i, w in enumerate(waveforms) for start, end in cut(w, recognizer.max_seconds)
    ]
    if len(windows) == len(waveforms):
        return list(recognizer.transcribe(waveforms))
    size = max(len(waveforms), 1)
    outputs: list[Transcription] = []
    for first in range(0, len(windows), size):
        chunk = windows[first : first + size]
        outputs += recognizer.transcribe([waveforms[i][start:end] for i, start, end in chunk])
    merged: list[Transcription] = []
    for i in range(len(waveforms)):
        parts = [(start, out) for (owner, start, _), out in zip(windows, outputs) if owner == i]
        merged.append(_join(parts))
    return merged


def _join(parts: Sequence[tuple[int, Transcription]]) -> Transcription:
    """One clip's transcription from its windows' ``(start sample, transcription)`` in order."""
    boundaries: list[list[int]] | None = None
    if parts[0][1].boundary_frames is not None:
        layers = len(parts[0][1].boundary_frames or [])
        boundaries = [
            [
                f + start // SAMPLES_PER_ENCODER_FRAME
                for start, out in parts
                for f in (out.boundary_frames or [])[k]
            ]
            for k in range(layers)
        ]
    return Transcription(
        " ".join(out.text for _, out in parts if out.text),
        sum(out.encoder_frames for _, out in parts),
        sum(out.compressed_frames for _, out in parts),
        boundary_frames=boundaries,
        hit_token_cap=any(out.hit_token_cap for _, out in parts),
    )


class SpeechLLMRecognizer:
    """A :class:`~magnet_asr.evaluation.decode.Recognizer` for SpeechLLM checkpoints.

    ``compressed_frames`` is the number of audio tokens the LLM reads, so ``mean_compression`` is
    encoder frames (50/s) per audio token. ``max_seconds`` is the encoder's limit, or the model's
    ``decoding["max_window_seconds"]`` where that is shorter; with that setting, longer clips are cut at
    their pauses (``split_at_pauses``).
    """

    def __init__(
        self, model: Any, tokenizer: Any, name: str = "speech_llm", synced_gpus: bool = False, **decode: Any
    ) -> None:
        """``synced_gpus``: for a model sharded over the ranks (FSDP, DeepSpeed ZeRO-3); ``decode``: settings
        for :meth:`~magnet_asr.models.speech_llm.SpeechLLM.generate`."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.decode = decode
        self.synced_gpus = synced_gpus
        encoder_config = model.encoder.config
        self.n_mels = int(encoder_config.num_mel_bins)
        learned = getattr(encoder_config, "position_encoding", "learned") == "learned"
        encoder_seconds = (
            encoder_config.max_source_positions / ENCODER_FRAMES_PER_SECOND
            if learned
            else float(CHUNK_LENGTH)
        )
        settings = DecodeSettings.from_config(model.config, **decode)
        if settings.ctc_weight > 0 and model.projector.ctc_head is None:
            raise ValueError(
                f"{name}: ctc_weight {settings.ctc_weight} needs a CTC head, and this model has none "
                "(trained with projector.ctc_loss_weight 0)"
            )
        window = settings.max_window_seconds
        self.max_seconds = encoder_seconds if window is None else min(encoder_seconds, window)
        self.split_at_pauses = window is not None

    @property
    def decoding(self) -> DecodeSettings:
        """What it decodes with: the settings saved in the model's config, updated with this recognizer's."""
        return DecodeSettings.from_config(self.model.config, **self.decode)

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu") -> SpeechLLMRecognizer:
        """Load a saved SpeechLLM and its tokenizer (saved beside it, else the LLM's own)."""
        from magnet_asr.models.speech_llm import SpeechLLM, load_tokenizer

        model = SpeechLLM.from_pretrained(path, device=device)
        has_tokenizer = (Path(path) / "tokenizer_config.json").is_file()
        source = str(path) if has_tokenizer else model.config.llm_name
        if not source:
            raise ValueError(f"{path}: no tokenizer saved beside the model and no llm_name in its config")
        tokenizer = load_tokenizer(source)
        return cls(model, tokenizer, name=str(path))

    @torch.inference_mode()
    def transcribe(self, waveforms: Sequence[np.ndarray]) -> list[Transcription]:
        out = [Transcription("", 0, 0) for _ in waveforms]
        usable = [i for i, w in enumerate(waveforms) if num_frames(len(w)) > 0]
        if not usable:
            return out
        device = next(self.model.parameters()).device
        features, mask = batch_features([waveforms[i] for i in usable], self.n_mels)
        audio = self.model.embed_audio(features.to(device), mask.to(device))
        skip = torch.tensor([is_silent(np.asarray(waveforms[i])) for i in usable])
        tokens = self.model.generate(audio=audio, skip=skip, synced_gpus=self.synced_gpus, **self.decode)
        texts = self.tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)
        for text, index, count in zip(texts, usable, audio.counts.tolist()):
            out[index] = Transcription(text.strip(), num_encoder_frames(len(waveforms[index])), int(count))
        return out


LOADERS: dict[str, Callable[[str, str], Recognizer]] = {
    "whisper": WhisperRecognizer.from_pretrained,
    "magnet_whisper": MagnetWhisperRecognizer.from_pretrained,
    "speech_llm": SpeechLLMRecognizer.from_pretrained,
}


def model_type_of(path: str) -> str:
    """``model_type`` from a local directory's config.json, or from the hub config for a hub name."""
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        return str(json.loads(config_file.read_text()).get("model_type", ""))
    from transformers import AutoConfig

    import magnet_asr.models  # noqa: F401  (registers our model types with AutoConfig)

    return str(AutoConfig.from_pretrained(path).model_type)


def load_recognizer(
    name_or_path: str,
    device: str = "cpu",
    decoding: DecodingOptions | None = None,
    speech_llm_decoding: dict[str, Any] | None = None,
) -> Recognizer:
    """Load any supported model from a bundled name, a local directory or a hub name.

    ``decoding``: how a Whisper or MagnetWhisper model decodes (default greedy, no guards). SpeechLLM
    decodes with its own loop guard and takes none of these options except the defaults.
    ``speech_llm_decoding``: SpeechLLM decoding settings over those saved in its config
    (:class:`~magnet_asr.models.speech_llm_generation.DecodeSettings` fields, e.g. ``{"ctc_weight": 0.3}``);
    an error for the other models.
    """
    from magnet_asr.weights import resolve_model

    path = resolve_model(name_or_path)
    model_type = model_type_of(path)
    if model_type not in LOADERS:
        known = ", ".join(sorted(LOADERS))
        raise ValueError(f"{name_or_path}: model_type '{model_type}' is not supported (known: {known})")
    # Reading local weights takes a second: no progress bar for it. A hub name keeps its download bars.
    with _no_progress_bars() if Path(path).is_dir() else nullcontext():
        recognizer = LOADERS[model_type](path, device)
    recognizer.name = name_or_path
    if decoding is not None:
        if isinstance(recognizer, WhisperRecognizer):
            recognizer.decoding = decoding
        elif decoding.num_beams > 1:
            raise ValueError(
                f"{name_or_path}: beam search is available for Whisper and MagnetWhisper models only"
            )
    if speech_llm_decoding:
        if not isinstance(recognizer, SpeechLLMRecognizer):
            raise ValueError(f"{name_or_path}: {sorted(speech_llm_decoding)} apply to SpeechLLM models only")
        recognizer = SpeechLLMRecognizer(
            recognizer.model,
            recognizer.tokenizer,
            name=name_or_path,
            **{**recognizer.decode, **speech_llm_decoding},
        )
    return recognizer


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off (its public switch), then back on if they were on."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
