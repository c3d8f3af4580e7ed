"""The ``magnet-asr train`` recipe: config -> model, data, trainer -> train -> test-set evaluation.

Split into ``_setup_*`` steps (torchtune style) so each is reachable from tests.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from magnet_asr.data.manifest import Utterance, read_manifest


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
    return {
        "variant": c.variant,
        "prior": 1.0 / c.compression,
        "temperature": c.temperature,
        "threshold": c.threshold,
        "pooling": c.pooling,
        "target": c.target,
        "loss": [c.loss] if c.loss else [],
        "loss_weight": c.loss_weight,
        "reembed_positions": c.reembed_positions,
    }


def _setup_model(cfg: Any) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoTokenizer

    from magnet_asr.models import MagnetWhisper
    from magnet_asr.weights import resolve_model

    if cfg.model != "magnet_whisper":
        raise ValueError(f"model: '{cfg.model}' has no training recipe yet")
    settings: dict[str, Any] = {
        "position_encoding": cfg.encoder.position_encoding,
        "extra_conv_strides": list(cfg.encoder.extra_conv_strides),
    }
    if cfg.compressor.enabled:
        settings.update(
            predictor_layers=list(cfg.compressor.layers),
            predictor_settings=predictor_settings(cfg),
        )
    model = MagnetWhisper.from_whisper(cfg.encoder.name, **settings)
    if cfg.encoder.freeze:
        for name, param in model.model.encoder.named_parameters():
            param.requires_grad = "predictors." in name
    if cfg.encoder.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.encoder.name))
    return model, tokenizer


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


def _setup_trainer(cfg: Any, model, tokenizer, data: DataSplits, output_dir: Path):
    from magnet_asr.data.collator import SpeechDataset, WhisperCollator
    from magnet_asr.evaluation.decode import MagnetWhisperRecognizer
    from magnet_asr.training.callbacks import ScheduleCallback
    from magnet_asr.training.trainer import MagnetTrainer

    collator = WhisperCollator(
        tokenizer,
        n_mels=model.config.num_mel_bins,
        target=cfg.compressor.target if cfg.compressor.enabled else None,
        num_predictors=len(model.config.predictor_layers),
    )
    rates = {}
    if cfg.training.predictor_learning_rate is not None:
        rates["predictors."] = cfg.training.predictor_learning_rate
    return MagnetTrainer(
        model=model,
        args=_training_arguments(cfg, output_dir),
        train_dataset=SpeechDataset(data.train, max_seconds=cfg.data.max_seconds),
        eval_dataset=SpeechDataset(data.validation, max_seconds=cfg.data.max_seconds),  # decoded by evaluate()
        data_collator=collator,
        make_recognizer=lambda m: MagnetWhisperRecognizer(m, tokenizer, name=cfg.run_name),
        eval_utterances=data.validation,
        max_batch_seconds=cfg.training.max_batch_seconds,
        learning_rates=rates,
        callbacks=[ScheduleCallback.from_config(cfg)],
    )


def _resume_path(cfg: Any, output_dir: Path) -> str | bool | None:
    value = cfg.training.resume_from_checkpoint
    if value in (None, "", "none"):
        return None
    if value == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    return str(value)


def train(cfg: Any) -> dict[str, Any]:
    """Run a whole training job from a composed run config; returns the final results."""
    from magnet_asr.evaluation.decode import MagnetWhisperRecognizer
    from magnet_asr.evaluation.evaluate import evaluate, write_json

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    output_dir = Path(cfg.training.output_dir)
    # transformers 5 reads the TensorBoard directory from the environment; one fixed place per run
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output_dir / "logs"))
    torch.manual_seed(cfg.training.seed)
    data = _setup_data(cfg)
    model, tokenizer = _setup_model(cfg)
    trainer = _setup_trainer(cfg, model, tokenizer, data, output_dir)
    world = trainer.accelerator.num_processes
    effective = cfg.training.per_device_batch_size * cfg.training.gradient_accumulation_steps * world
    if trainer.is_world_process_zero():
        print(f"effective batch size: {effective} ({world} process(es))")
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    trainer.train(resume_from_checkpoint=_resume_path(cfg, output_dir))
    final_dir = output_dir / "final"
    trainer.save_model(str(final_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(final_dir))
    results: dict[str, Any] = {"run_name": cfg.run_name, "model_dir": str(final_dir), "test": {}}
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    recognizer = MagnetWhisperRecognizer(model, tokenizer, name=cfg.run_name)
    for spec, utterances in data.test.items():
        summary = evaluate(
            recognizer,
            utterances,
            batch_size=cfg.training.per_device_batch_size,
            data_name=spec,
            split="test",
        )
        results["test"][spec] = {k: v for k, v in summary.items() if k != "utterances"}
        if trainer.is_world_process_zero():
            write_json(summary, output_dir / f"test_{spec}.json")
    results["train_skipped_samples"] = trainer.skipped_samples
    if trainer.is_world_process_zero():
        write_json(results, output_dir / "results.json")
        print(
            json.dumps(
                {
                    k: {kk: v.get(kk) for kk in ("wer", "mean_compression", "rtfx")}
                    for k, v in results["test"].items()
                }
            )
        )
    return results
