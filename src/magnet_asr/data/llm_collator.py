"""The SpeechLLM collator: features, masks and the tokenized response of each utterance.

The prompt around the audio is assembled by the model, once the encoder has counted each sample's audio
tokens (:mod:`magnet_asr.models.processing_speech_llm`); the collator only tokenizes the response with
that prompt's :meth:`~magnet_asr.models.processing_speech_llm.ChatPrompt.response_ids`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from magnet_asr.audio import log_mel_spectrogram
from magnet_asr.data.collator import IGNORE_INDEX, collate_target_counts, pad_features, pad_sequences

if TYPE_CHECKING:  # the processor is the model's; the collator only calls it
    from magnet_asr.models.processing_speech_llm import ChatPrompt

__all__ = ["SpeechLLMCollator"]


@dataclass
class SpeechLLMCollator:
    """Batches for :class:`~magnet_asr.models.speech_llm.SpeechLLM`.

    Output keys: ``input_features (B, n_mels, T)`` at the true length and ``attention_mask (B, T)``
    over mel frames; ``labels (B, N)``: the response tokens (transcript + end-of-turn), -100 padded,
    which the model places after the prompt; ``target_counts (P, B)`` for boundary predictors;
    ``cache_keys``: utterance ids for the frozen encoder's output cache; ``num_skipped``.
    """

    tokenizer: Any
    prompt: ChatPrompt
    n_mels: int = 80
    target: str | None = None
    num_predictors: int = 0
    boundaries_per_unit: float = 1.0
    keep_ids: bool = False  # as WhisperCollator.keep_ids: the lists distillation looks teacher targets up by

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        good = [it for it in items if "error" not in it]
        batch: dict[str, Any] = {"num_skipped": len(items) - len(good)}
        if not good:
            return batch
        feats = [log_mel_spectrogram(it["audio"], self.n_mels) for it in good]
        batch["input_features"], batch["attention_mask"] = pad_features(feats)
        responses = [self.prompt.response_ids(self.tokenizer, it["text"]) for it in good]
        batch["labels"] = pad_sequences(responses, IGNORE_INDEX)
        counts = collate_target_counts(
            [it["text"] for it in good], self.target, self.num_predictors, self.boundaries_per_unit
        )
        if counts is not None:
            batch["target_counts"] = counts
        # the length guards against two corpora reusing an id
        batch["cache_keys"] = [f"{it['id']}:{len(it['audio'])}" for it in good]
        if self.keep_ids:
            batch["utterance_ids"] = [it["id"] for it in good]
            batch["audio_paths"] = [it["path"] for it in good]
            batch["waveforms"] = [it["audio"] for it in good]
        return batch
