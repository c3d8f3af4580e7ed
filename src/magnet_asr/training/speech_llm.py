"""SpeechLLM training setup, for the ``magnet-asr train`` recipe when ``cfg.model == "speech_llm"``.

:func:`setup_speech_llm` turns the Hydra groups into what the recipe's trainer needs:

- ``encoder``: the Whisper checkpoint, ``freeze`` (default for SpeechLLM runs: true);
- ``compressor``: boundary predictors inside the encoder (learned compression, trained even when the
  encoder is frozen), settings shared with MagnetWhisper (:func:`~magnet_asr.training.recipe.predictor_settings`);
- ``projector``: stacking ``k``, MLP width, dropout, encoder-output cache size;
- ``llm``: the causal LM, ``finetune`` (lora | full | frozen), LoRA settings, instruction, decoding;
- ``training``: separate learning rates for the projector and the predictors (LoRA gets the base rate).
  SLAM-ASR trains a freshly initialized projector with a larger rate than adapters on a pretrained LLM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from magnet_asr.data.llm_collator import SpeechLLMCollator
from magnet_asr.evaluation.speech_llm_decode import SpeechLLMRecognizer
from magnet_asr.models.speech_llm import SpeechLLM, build_speech_llm

__all__ = ["learning_rates", "setup_speech_llm", "speech_llm_settings"]


def _decoding(cfg: Any) -> dict[str, Any]:
    llm = cfg.llm
    return {
        "num_beams": llm.num_beams,
        "max_new_tokens_per_second": llm.max_new_tokens_per_second,
        "repetition_penalty": llm.repetition_penalty,
        "no_repeat_ngram_size": llm.no_repeat_ngram_size,
        "loop_guard": llm.loop_guard,
    }


def speech_llm_settings(cfg: Any) -> dict[str, Any]:
    """:class:`~magnet_asr.models.speech_llm.SpeechLLMConfig` fields from a composed run config."""
    from magnet_asr.training import recipe

    llm, projector = cfg.llm, cfg.projector
    return {
        "encoder_settings": recipe.encoder_settings(cfg),
        "freeze_encoder": bool(cfg.encoder.freeze),
        "llm_finetune": llm.finetune,
        "lora_rank": llm.lora_rank,
        "lora_alpha": llm.lora_alpha,
        "lora_dropout": llm.lora_dropout,
        "lora_target_modules": list(llm.lora_target_modules),
        "projector_stack": projector.stack,
        "projector_hidden_size": projector.hidden_size,
        "projector_dropout": projector.dropout,
        "encoder_cache_gb": projector.encoder_cache_gb,
        "instruction": llm.prompt,
        "system_prompt": llm.system_prompt,
        "decoding": _decoding(cfg),
    }


def learning_rates(cfg: Any) -> dict[str, float]:
    """``{parameter-name substring: learning rate}`` for ``MagnetTrainer(learning_rates=...)``."""
    rates: dict[str, float] = {}
    if cfg.training.projector_learning_rate is not None:
        rates["projector."] = float(cfg.training.projector_learning_rate)
    if cfg.training.predictor_learning_rate is not None:
        rates["predictors."] = float(cfg.training.predictor_learning_rate)
    return rates


def setup_speech_llm(
    cfg: Any,
) -> tuple[SpeechLLM, Any, SpeechLLMCollator, Callable[[Any], SpeechLLMRecognizer], dict[str, float]]:
    """``(model, tokenizer, collator, make_recognizer, learning_rates)`` for a ``speech_llm`` run.

    The tokenizer carries the added ``<audio>`` token; save it beside the model (``from_pretrained`` of
    the recognizer falls back to the LLM's own tokenizer otherwise).
    """
    model, tokenizer = build_speech_llm(cfg.encoder.name, cfg.llm.name, **speech_llm_settings(cfg))
    if cfg.llm.gradient_checkpointing or cfg.encoder.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    collator = SpeechLLMCollator(
        tokenizer,
        model.prompt,
        n_mels=int(model.encoder.config.num_mel_bins),
        target=cfg.compressor.target if cfg.compressor.enabled else None,
        num_predictors=len(model.config.predictor_layers),
        boundaries_per_unit=cfg.compressor.boundaries_per_unit,
    )

    def make_recognizer(trained: Any) -> SpeechLLMRecognizer:
        return SpeechLLMRecognizer(trained, tokenizer, name=cfg.run_name)

    return model, tokenizer, collator, make_recognizer, learning_rates(cfg)
