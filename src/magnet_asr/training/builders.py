"""Model-family builders: a run config to the model and what the shared recipe needs around it.

:class:`ModelSetup` is what each family gives :mod:`magnet_asr.training.recipe`; the recipe dispatches to
:func:`setup_magnet_whisper`, :func:`magnet_asr.training.grpo.setup_grpo` or
:func:`magnet_asr.training.speech_llm.setup_speech_llm`, and none of them imports the recipe back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from magnet_asr.models import MagnetWhisper


def predictor_settings(cfg: Any) -> dict[str, Any]:
    """``BoundaryPredictorConfig`` keyword arguments from the ``compressor`` config group."""
    c = cfg.compressor
    losses = [c.loss] if c.loss else []
    weights = [1.0] * len(losses)
    if c.phone_supervision_weight:
        losses.append("phones")
        weights.append(float(c.phone_supervision_weight))
    return {
        "variant": c.variant,
        "prior": 1.0 / c.compression,
        "temperature": c.temperature,
        "threshold": c.threshold,
        "peak_threshold": c.peak_threshold,
        "pooling": c.pooling,
        "target": c.target,
        "loss": losses,
        "loss_weights": weights,
        "loss_weight": c.loss_weight,
        "reembed_positions": c.reembed_positions,
        "train_sampling": c.train_sampling,
        "repulsion_distance": c.repulsion_distance,
        "input_norm": c.input_norm and c.variant == "mlp",
        "max_segment_frames": c.max_segment_frames,
        "max_compression": c.max_compression,
    }


@dataclass
class ModelSetup:
    """What a model family gives the shared recipe."""

    model: torch.nn.Module
    tokenizer: Any
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    make_recognizer: Callable[[torch.nn.Module], Any]
    learning_rates: dict[str, float] = field(default_factory=dict)
    # runs once before a fresh (not resumed) training, with the built trainer; returns figures to report
    before_training: Callable[[Any], dict[str, Any]] | None = None
    # distillation from a teacher (training.distillation.Distiller): its trainer adds the loss parts
    distiller: Any = None
    # saved into final/ beside the tokenizer, for transformers' ASR pipeline
    feature_extractor: Any = None
    # (model, trainer) -> figures logged at each evaluation beside the WER (SpeechLLM: the audio loss gap)
    evaluation_figures: Callable[[torch.nn.Module, Any], dict[str, float]] | None = None


def encoder_settings(cfg: Any) -> dict[str, Any]:
    """``MagnetWhisperConfig`` keyword arguments from the ``encoder`` and ``compressor`` groups."""
    settings: dict[str, Any] = {
        "position_encoding": cfg.encoder.position_encoding,
        "extra_conv_strides": list(cfg.encoder.extra_conv_strides),
    }
    if cfg.compressor.enabled:
        settings.update(
            predictor_layers=list(cfg.compressor.layers),
            predictor_settings=predictor_settings(cfg),
            proportional_attention=cfg.compressor.proportional_attention,
        )
    return settings


def magnet_whisper_setup(cfg: Any, model: MagnetWhisper) -> ModelSetup:
    """Tokenizer, collator, recognizer, feature extractor and learning rates around a MagnetWhisper
    ``model``."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    from magnet_asr.data.collator import WhisperCollator
    from magnet_asr.evaluation.decode import MagnetWhisperRecognizer
    from magnet_asr.models.whisper_generation import decoder_prompt, language_and_task
    from magnet_asr.weights import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.encoder.name))
    num_predictors = len(model.config.predictor_layers)
    # one prompt for training and decoding (docs/architecture.md, "Decoding"); saved with the model's
    # generation settings, so final/ decodes with it too (transformers' pipeline included)
    language, task = language_and_task(model, cfg.encoder.language, cfg.encoder.task)
    if language is not None:
        # WhisperGenerationConfig-only fields, which GenerationConfig (the declared type) does not name
        setattr(model.generation_config, "language", language)  # noqa: B010
        setattr(model.generation_config, "task", task)  # noqa: B010
    collator = WhisperCollator(
        tokenizer,
        n_mels=model.config.num_mel_bins,
        target=cfg.compressor.target if num_predictors else None,
        num_predictors=num_predictors,
        boundaries_per_unit=cfg.compressor.boundaries_per_unit,
        phone_boundaries=bool(num_predictors and cfg.compressor.phone_supervision_weight),
        prompt=decoder_prompt(model.generation_config, language, task),
    )
    rates = {}
    if cfg.training.predictor_learning_rate is not None:
        rates["predictors."] = cfg.training.predictor_learning_rate
    # the mel settings our features use (magnet_asr.audio), so a pipeline reads the audio as training did
    features = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    # the trainer hands make_recognizer its (unwrapped) model, i.e. this MagnetWhisper
    return ModelSetup(
        model,
        tokenizer,
        collator,
        lambda m: MagnetWhisperRecognizer(
            cast("MagnetWhisper", m), tokenizer, name=cfg.run_name, language=language, task=task
        ),
        rates,
        feature_extractor=features,
    )


def build_magnet_whisper(cfg: Any) -> MagnetWhisper:
    """The MagnetWhisper a run starts from.

    ``encoder.name`` is either a ``MagnetWhisper`` checkpoint (e.g. ``runs/magnet_demo/final``: continue
    training it), loaded with its trained predictors, which must agree with the ``compressor`` group
    (layers, target kind; their other settings come from the checkpoint); or any Whisper checkpoint,
    which gets new predictors from the ``compressor`` group.
    """
    from magnet_asr.evaluation.decode import model_type_of
    from magnet_asr.models import MagnetWhisper
    from magnet_asr.weights import resolve_model

    path = resolve_model(cfg.encoder.name)
    if model_type_of(path) != "magnet_whisper":
        return MagnetWhisper.from_whisper(cfg.encoder.name, **encoder_settings(cfg))
    model = MagnetWhisper.from_pretrained(path)
    c = cfg.compressor
    layers = list(model.config.predictor_layers)
    targets = {p.config.target for p in model.model.encoder.predictors.values()}
    wanted_layers = list(c.layers) if c.enabled else []
    wanted_targets = {c.target} if c.enabled else set()
    if wanted_layers != layers or targets != wanted_targets:
        raise ValueError(
            f"{cfg.encoder.name}: checkpoint has predictors at layers {layers} with targets "
            f"{sorted(targets)}, the config asks for compressor.layers={wanted_layers}, "
            f"target={sorted(wanted_targets)}; make them agree"
        )
    return model


def setup_magnet_whisper(cfg: Any) -> ModelSetup:
    """A supervised (or distilled) MagnetWhisper run: the model, frozen parts, and its distiller."""
    model = build_magnet_whisper(cfg)
    if cfg.encoder.freeze:
        for name, param in model.model.encoder.named_parameters():
            param.requires_grad = "predictors." in name
    if cfg.encoder.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    setup = magnet_whisper_setup(cfg, model)
    if cfg.distillation.enabled:
        from magnet_asr.training.distillation import build_distiller

        setup.distiller = build_distiller(cfg)
        setup.collator.keep_ids = True  # type: ignore[attr-defined]
    return setup


def initialize_from(model: torch.nn.Module, directory: str) -> dict[str, Any]:
    """Load the tensors of a saved model directory (``training.init_from``) into ``model``.

    Every saved tensor must exist in ``model`` with the same number of elements (a different
    architecture is an error, not a silent partial load; the model's own load hooks reshape legacy
    layouts, such as ``EmbeddingCTCHead``'s 0-d ``log_scale``); the model's tensors the directory lacks
    (e.g. a student's new boundary predictors, or frozen parts a SpeechLLM does not save) keep their
    fresh values. Returns the counts, for the run's log."""
    from pathlib import Path

    from magnet_asr.models.speech_llm import read_weights

    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"training.init_from: {directory} is not a saved model directory")
    saved = read_weights(path)
    own = model.state_dict()
    unknown = sorted(set(saved) - set(own))
    if unknown:
        raise ValueError(f"training.init_from {directory}: tensors this model does not have: {unknown[:3]}")
    for key, tensor in saved.items():  # same size, other shape: a module's load hook may reshape it
        if tensor.numel() != own[key].numel():
            raise ValueError(
                f"training.init_from {directory}: {key} is {tuple(tensor.shape)} there, "
                f"{tuple(own[key].shape)} in this model"
            )
    is_saved_key = getattr(model, "is_saved_key", None)  # SpeechLLM saves only what it trains
    frozen = sorted(k for k in saved if is_saved_key is not None and not is_saved_key(k))
    if frozen:  # loaded into a frozen part, it would be used in training but lost at the next save
        raise ValueError(
            f"training.init_from {directory}: tensors trained there that this model keeps frozen "
            f"(is llm.finetune, llm.freeze_embeddings or encoder.train_layers different?): {frozen[:3]}"
        )
    model.load_state_dict(saved, strict=False)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    fresh = [n for n in trained if n not in saved]
    print(
        f"training.init_from {directory}: {len(saved)} tensors loaded; "
        f"{len(fresh)} of {len(trained)} trained tensors start fresh"
    )
    return {"loaded": len(saved), "fresh_trained": len(fresh)}
