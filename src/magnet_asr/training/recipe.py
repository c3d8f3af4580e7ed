"""The ``magnet-asr train`` recipe: config -> model, data, trainer -> train -> test-set evaluation.

Split into ``_setup_*`` steps (torchtune style) so each is reachable from tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from omegaconf import OmegaConf

from magnet_asr.data.manifest import Utterance, read_manifest

if TYPE_CHECKING:
    from magnet_asr.models import MagnetWhisper


@dataclass
class DataSplits:
    train: list[Utterance]
    validation: list[Utterance]
    test: dict[str, list[Utterance]]


def _utterances(specs: list[str], split: str, limit: int | None) -> list[Utterance]:
    from magnet_asr.data.corpora import resolve_data

    out: list[Utterance] = []
    for spec in specs:
        out.extend(read_manifest(resolve_data(spec), split=split))
    if limit is not None and len(out) > limit:
        # an even spread over the corpora rather than the first corpus only
        step = len(out) / limit
        out = [out[int(i * step)] for i in range(limit)]
    return out


def _setup_data(cfg: Any) -> DataSplits:
    data = cfg.data
    train = _utterances(list(data.train), "train", data.max_train_utterances)
    if not train:
        raise ValueError(f"data.train: no training utterances in {list(data.train)}")
    return DataSplits(
        train=train,
        validation=_utterances(list(data.validation), "validation", data.max_eval_utterances),
        test={spec: _utterances([spec], "test", data.max_eval_utterances) for spec in data.test},
    )


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
    """Tokenizer, collator, recognizer and learning rates around a MagnetWhisper ``model``."""
    from transformers import AutoTokenizer

    from magnet_asr.data.collator import WhisperCollator
    from magnet_asr.evaluation.decode import MagnetWhisperRecognizer
    from magnet_asr.weights import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.encoder.name))
    num_predictors = len(model.config.predictor_layers)
    collator = WhisperCollator(
        tokenizer,
        n_mels=model.config.num_mel_bins,
        target=cfg.compressor.target if num_predictors else None,
        num_predictors=num_predictors,
        boundaries_per_unit=cfg.compressor.boundaries_per_unit,
        phone_boundaries=bool(num_predictors and cfg.compressor.phone_supervision_weight),
    )
    rates = {}
    if cfg.training.predictor_learning_rate is not None:
        rates["predictors."] = cfg.training.predictor_learning_rate
    # the trainer hands make_recognizer its (unwrapped) model, i.e. this MagnetWhisper
    return ModelSetup(
        model,
        tokenizer,
        collator,
        lambda m: MagnetWhisperRecognizer(cast("MagnetWhisper", m), tokenizer, name=cfg.run_name),
        rates,
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


def _setup_magnet_whisper(cfg: Any) -> ModelSetup:
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


def _setup_model(cfg: Any) -> ModelSetup:
    if cfg.model == "magnet_whisper":
        from magnet_asr.training.grpo import grpo_enabled, setup_grpo

        return setup_grpo(cfg) if grpo_enabled(cfg) else _setup_magnet_whisper(cfg)
    if cfg.model == "speech_llm":
        from magnet_asr.training.speech_llm import setup_speech_llm

        return setup_speech_llm(cfg)
    raise ValueError(f"model: '{cfg.model}' cannot be trained (choose magnet_whisper or speech_llm)")


def _training_arguments(cfg: Any, output_dir: Path):
    from transformers import TrainingArguments

    t = cfg.training
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps or None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        metric_for_best_model="wer",
        greater_is_better=False,
        load_best_model_at_end=bool(t.eval_steps) and t.save_steps % max(t.eval_steps, 1) == 0,
        report_to=list(t.report_to),
        remove_unused_columns=False,
        dataloader_num_workers=cfg.data.num_workers,
        use_cpu=t.device == "cpu",
        disable_tqdm=False,
    )


def _setup_trainer(cfg: Any, setup: ModelSetup, data: DataSplits, output_dir: Path):
    from magnet_asr.data.collator import SpeechDataset
    from magnet_asr.training.callbacks import ScheduleCallback
    from magnet_asr.training.grpo import trainer_class

    cls, extra = trainer_class(cfg)  # GRPOTrainer for training.grpo=true, else MagnetTrainer
    if setup.distiller is not None:
        extra["distiller"] = setup.distiller
    return cls(
        model=setup.model,
        args=_training_arguments(cfg, output_dir),
        train_dataset=SpeechDataset(data.train, max_seconds=cfg.data.max_seconds),
        # evaluate() decodes eval_utterances; the dataset only tells the Trainer there is evaluation
        eval_dataset=SpeechDataset(data.validation, max_seconds=cfg.data.max_seconds),
        data_collator=setup.collator,
        make_recognizer=setup.make_recognizer,
        eval_utterances=data.validation,
        max_batch_seconds=cfg.training.max_batch_seconds,
        learning_rates=setup.learning_rates,
        callbacks=[ScheduleCallback.from_config(cfg)],
        **extra,
    )


def _resume_path(cfg: Any, output_dir: Path) -> str | bool | None:
    value = cfg.training.resume_from_checkpoint
    if value in (None, "", "none"):
        return None
    if value == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    return str(value)


def logging_environment(report_to: list[str], output_dir: Path) -> None:
    """Environment the Trainer's loggers read; call before the Trainer exists.

    transformers 5 reads the TensorBoard directory from the environment, so each run logs to its own
    ``logs/``. W&B without ``WANDB_API_KEY`` would ask for a login (or fail without a network): it then
    runs offline into the output directory, to be synced later with ``wandb sync``.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(output_dir / "logs")
    if "wandb" not in report_to:
        return
    if importlib.util.find_spec("wandb") is None:
        raise ValueError(
            "training.report_to names wandb, which is not installed: pip install 'magnet-asr[wandb]'"
        )
    os.environ.setdefault("WANDB_PROJECT", "magnet-asr")
    os.environ.setdefault("WANDB_DIR", str(output_dir))
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
        print(f"W&B: no WANDB_API_KEY, logging offline to {output_dir}/wandb (upload with `wandb sync`)")


def train(cfg: Any) -> dict[str, Any]:
    """Run a whole training job from a composed run config; returns the final results."""
    from magnet_asr.evaluation.evaluate import evaluate, write_json

    output_dir = Path(cfg.training.output_dir)
    logging_environment(list(cfg.training.report_to), output_dir)
    torch.manual_seed(cfg.training.seed)
    data = _setup_data(cfg)
    setup = _setup_model(cfg)
    trainer = _setup_trainer(cfg, setup, data, output_dir)
    world = trainer.accelerator.num_processes
    effective = cfg.training.per_device_batch_size * cfg.training.gradient_accumulation_steps * world
    if trainer.is_world_process_zero():
        print(f"effective batch size: {effective} ({world} process(es))")
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    resume = _resume_path(cfg, output_dir)
    # a resumed run's checkpoint already holds what before_training produced
    prepared = setup.before_training(trainer) if setup.before_training and not resume else None
    if setup.distiller is not None and cfg.distillation.prefill:
        setup.distiller.prepare(data.train, setup.collator, trainer.accelerator, cfg.data.max_seconds)
    trainer.train(resume_from_checkpoint=resume)
    final_dir = output_dir / "final"
    trainer.save_model(str(final_dir))
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    # One line per rank: under DDP every rank must end with the same weights.
    print(f"rank {trainer.accelerator.process_index} weights checksum {weights_checksum(model)}", flush=True)
    if not trainer.is_world_process_zero():
        return {}
    setup.tokenizer.save_pretrained(str(final_dir))
    results: dict[str, Any] = {"run_name": cfg.run_name, "model_dir": str(final_dir), "test": {}}
    if prepared:
        results["before_training"] = prepared
    recognizer = setup.make_recognizer(model)
    batch_size = cfg.training.per_device_batch_size
    for spec, utterances in data.test.items():
        summary = evaluate(recognizer, utterances, batch_size=batch_size, data_name=spec, split="test")
        results["test"][spec] = {k: v for k, v in summary.items() if k != "utterances"}
        write_json(summary, output_dir / f"test_{Path(spec).stem}.json")
    results["train_skipped_samples"] = trainer.skipped_samples
    results["train_skipped_batches"] = trainer.skipped_batches
    # the last training log window: every loss part (ASR, boundary, distillation...) as logged
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    if logged:
        results["train_log"] = logged[-1]
    if setup.distiller is not None:
        results["distillation"] = setup.distiller.summary()
    write_json(results, output_dir / "results.json")
    brief = {
        k: {m: v.get(m) for m in ("wer", "mean_compression", "rtfx")} for k, v in results["test"].items()
    }
    print(json.dumps(brief))
    return results


def weights_checksum(model: torch.nn.Module) -> str:
    """A short hash of every parameter's bytes (compares weights across ranks or runs)."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
