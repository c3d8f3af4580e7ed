"""The ``magnet-asr train`` recipe: config -> model, data, trainer -> train -> test-set evaluation.

Split into ``_setup_*`` steps (torchtune style) so each is reachable from tests.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from itertools import chain, zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

from magnet_asr.data.manifest import Utterance, read_manifest
from magnet_asr.training.builders import ModelSetup, initialize_from

if TYPE_CHECKING:
    from magnet_asr.data.streaming import StreamingSpeechDataset

logger = logging.getLogger(__name__)


@dataclass
class DataSplits:
    train: list[Utterance] | StreamingSpeechDataset  # the stream for data.streaming=true
    validation: list[Utterance]
    test: dict[str, list[Utterance]]


def _utterances(
    specs: list[str],
    split: str,
    limit: int | None,
    librispeech_root: str | None,
    repeats: dict[str, int] | None = None,
) -> list[Utterance]:
    from magnet_asr.data.corpora import resolve_data

    repeats = repeats or {}
    corpora = [
        read_manifest(resolve_data(spec, librispeech_root), split=split) * repeats.get(spec, 1)
        for spec in specs
    ]
    if limit is None:
        return list(chain.from_iterable(corpora))
    # the first utterances of each corpus in turn, not of the first corpus only; one corpus gives its first
    # `limit`, the rows `eval --limit` and benchmarks/bench_transcribe.py score, so the figures agree
    interleaved = (u for group in zip_longest(*corpora) for u in group if u is not None)
    return list(interleaved)[:limit]


def _train_stream(cfg: Any) -> StreamingSpeechDataset:
    from magnet_asr.data.streaming import StreamingSpeechDataset, open_streams

    data, t = cfg.data, cfg.training
    if t.max_steps <= 0:
        raise ValueError(
            "data.streaming=true trains for training.max_steps steps; set training.max_steps > 0"
        )
    if data.max_train_utterances is not None:
        raise ValueError(
            "data.max_train_utterances does not apply to a stream; set it to null (or data.streaming=false)"
        )
    if any(count > 1 for count in data.train_repeats.values()):
        raise ValueError(
            "data.train_repeats does not apply to a stream; set its counts to 1 (or data.streaming=false)"
        )
    return StreamingSpeechDataset(
        open_streams(list(data.train), "train", data.librispeech_root),
        batch_size=t.per_device_batch_size,
        max_batch_seconds=t.max_batch_seconds,
        max_seconds=data.max_seconds,
        buffer_size=data.stream_buffer_size,
        seed=t.seed,
    )


def _setup_data(cfg: Any) -> DataSplits:
    data = cfg.data
    root = data.librispeech_root
    if data.streaming:
        train: list[Utterance] | StreamingSpeechDataset = _train_stream(cfg)
    else:
        repeats = dict(data.train_repeats)
        unused = sorted(set(repeats) - set(data.train))
        if unused:
            logger.warning("data.train_repeats: %s not in data.train, ignored", ", ".join(unused))
        train = _utterances(list(data.train), "train", data.max_train_utterances, root, repeats)
        if not train:
            raise ValueError(f"data.train: no training utterances in {list(data.train)}")
    return DataSplits(
        train=train,
        validation=_utterances(list(data.validation), "validation", data.max_eval_utterances, root),
        test={spec: _utterances([spec], "test", data.max_eval_utterances, root) for spec in data.test},
    )


def _setup_model(cfg: Any) -> ModelSetup:
    if cfg.encoder.train_layers and cfg.model != "speech_llm":
        raise ValueError(
            f"encoder.train_layers={cfg.encoder.train_layers}: only a speech_llm run trains part of a frozen "
            "encoder (a magnet_whisper run with encoder.freeze=false trains all of it)"
        )
    if cfg.model == "magnet_whisper":
        from magnet_asr.training.builders import setup_magnet_whisper
        from magnet_asr.training.grpo import grpo_enabled, setup_grpo

        setup = setup_grpo(cfg) if grpo_enabled(cfg) else setup_magnet_whisper(cfg)
    elif cfg.model == "speech_llm":
        from magnet_asr.training.speech_llm import setup_speech_llm

        setup = setup_speech_llm(cfg)
    else:
        raise ValueError(f"model: '{cfg.model}' cannot be trained (choose magnet_whisper or speech_llm)")
    if cfg.training.init_from:  # a resumed run's checkpoint then overrides these tensors, as it should
        initialize_from(setup.model, cfg.training.init_from)
    return setup


def _training_arguments(cfg: Any, output_dir: Path):
    from transformers import TrainingArguments

    from magnet_asr.training.trainer import SELECTION_METRIC

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
        metric_for_best_model=SELECTION_METRIC,
        greater_is_better=False,
        load_best_model_at_end=t.load_best_model_at_end
        and bool(t.eval_steps)
        and t.save_steps % max(t.eval_steps, 1) == 0,
        report_to=list(t.report_to),
        remove_unused_columns=False,
        dataloader_num_workers=cfg.data.num_workers,
        use_cpu=t.device == "cpu",
        disable_tqdm=False,
    )


def _setup_trainer(cfg: Any, setup: ModelSetup, data: DataSplits, output_dir: Path):
    from magnet_asr.data.collator import SpeechDataset
    from magnet_asr.data.streaming import StreamingSpeechDataset
    from magnet_asr.training.callbacks import ScheduleCallback
    from magnet_asr.training.grpo import trainer_class

    cls, extra = trainer_class(cfg)  # GRPOTrainer for training.grpo=true, else MagnetTrainer
    if setup.distiller is not None:
        extra["distiller"] = setup.distiller
    return cls(
        model=setup.model,
        args=_training_arguments(cfg, output_dir),
        train_dataset=data.train
        if isinstance(data.train, StreamingSpeechDataset)
        else SpeechDataset(data.train, max_seconds=cfg.data.max_seconds),
        # evaluate() decodes eval_utterances; the dataset only tells the Trainer there is evaluation
        eval_dataset=SpeechDataset(data.validation, max_seconds=cfg.data.max_seconds),
        data_collator=setup.collator,
        make_recognizer=setup.make_recognizer,
        eval_utterances=data.validation,
        max_batch_seconds=cfg.training.max_batch_seconds,
        learning_rates=setup.learning_rates,
        max_eval_skip_fraction=cfg.training.max_eval_skip_fraction,
        evaluation_figures=setup.evaluation_figures,
        callbacks=[ScheduleCallback.from_config(cfg)],
        **extra,
    )


def _file_stem(spec: str) -> str:
    """A file-name stem per test spec: a manifest's stem, ``librispeech-test.clean`` for ``librispeech:test.clean``."""
    from magnet_asr.data.librispeech import SPEC_PREFIX

    if spec.startswith(SPEC_PREFIX):
        return "librispeech-" + Path(spec[len(SPEC_PREFIX) :]).name
    return Path(spec).stem


def _resume_path(cfg: Any, output_dir: Path) -> str | bool | None:
    value = cfg.training.resume_from_checkpoint
    if value in (None, "", "none"):
        return None
    if value == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    return str(value)


def _average_checkpoints(cfg: Any, trainer: Any, output_dir: Path) -> list[int] | None:
    """With ``training.average_checkpoints`` > 1, the trainer's model takes the mean weights of the last
    checkpoints (every rank reads them); returns their steps."""
    from magnet_asr.training.averaging import checkpoints_to_average, load_average

    if cfg.training.average_checkpoints < 2:
        return None
    checkpoints = checkpoints_to_average(
        output_dir, trainer.state.log_history, cfg.training.average_checkpoints
    )
    load_average(trainer.accelerator.unwrap_model(trainer.model), list(checkpoints.values()))
    steps = list(checkpoints)
    if trainer.is_world_process_zero():
        print(f"final/: the mean weights of the checkpoints at steps {steps}")
    return steps


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


def train(cfg: Any, command: str | None = None) -> dict[str, Any]:
    """Run a whole training job from a composed run config; returns the final results.

    ``command``: the command line that started it, for the model card in ``final/``."""
    from magnet_asr.evaluation.evaluate import evaluate, write_json
    from magnet_asr.training.distributed import prepare_sharding, run_figures, save_final, trained_model
    from magnet_asr.training.trainer import print_rank_line

    output_dir = Path(cfg.training.output_dir)
    logging_environment(list(cfg.training.report_to), output_dir)
    torch.manual_seed(cfg.training.seed)
    data = _setup_data(cfg)
    setup = _setup_model(cfg)
    if cfg.data.streaming and (setup.before_training or cfg.distillation.prefill):
        # both read the training set as a map-style dataset outside the Trainer
        raise ValueError(
            "data.streaming=true: projector.ctc_warmup_steps and distillation.prefill need data.streaming=false"
        )
    trainer = _setup_trainer(cfg, setup, data, output_dir)
    prepare_sharding(trainer, setup.model)  # FSDP: the auto-wrap classes of this model
    if cfg.training.average_checkpoints > 1 and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        raise ValueError(
            "training.average_checkpoints: not under FSDP or DeepSpeed (their checkpoints are sharded)"
        )
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
    averaged = _average_checkpoints(cfg, trainer, output_dir)
    final_dir = output_dir / "final"
    save_final(trainer, final_dir)  # under FSDP, the full state dict gathered on rank 0
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    if cfg.training.log_weights_checksum:  # one line per rank: under DDP every rank must end alike
        print_rank_line(
            f"rank {trainer.accelerator.process_index} weights checksum {weights_checksum(model)}"
        )
    if not trainer.is_world_process_zero():
        return {}
    setup.tokenizer.save_pretrained(str(final_dir))
    if setup.feature_extractor is not None:
        setup.feature_extractor.save_pretrained(str(final_dir))
    results: dict[str, Any] = {"run_name": cfg.run_name, "model_dir": str(final_dir), "test": {}}
    if prepared:
        results["before_training"] = prepared
    if averaged:
        results["averaged_checkpoints"] = averaged
    recognizer = setup.make_recognizer(trained_model(trainer, final_dir))
    batch_size = cfg.training.per_device_batch_size
    for spec, utterances in data.test.items():
        summary = evaluate(
            recognizer,
            utterances,
            batch_size=batch_size,
            data_name=spec,
            split="test",
            max_skip_fraction=cfg.training.max_eval_skip_fraction,
        )
        results["test"][spec] = {k: v for k, v in summary.items() if k != "utterances"}
        write_json(summary, output_dir / f"test_{_file_stem(spec)}.json")
    results["train_skipped_samples"] = trainer.skipped_samples
    results["train_skipped_batches"] = trainer.skipped_batches
    results["train_figures"] = run_figures(trainer)  # steps/s, peak GPU memory
    if trainer.stream_loader is not None:  # rank 0's stream: the rows it dropped, by reason
        results["train_stream_skipped"] = trainer.stream_loader.skipped_by_reason()
    # the last training log window: every loss part (ASR, boundary, distillation...) as logged
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    if logged:
        results["train_log"] = logged[-1]
    # every validation: the WER curve, and each family's own figures (SpeechLLM: own vs rolled audio loss)
    results["evaluations"] = [entry for entry in trainer.state.log_history if "eval_wer" in entry]
    if setup.distiller is not None:
        results["distillation"] = setup.distiller.summary()
    write_json(results, output_dir / "results.json")
    from magnet_asr.training.model_card import write_model_card

    write_model_card(final_dir, cfg, results, command, trainer.state.global_step)
    brief = {
        k: {m: v.get(m) for m in ("wer", "mean_compression", "rtfx")} for k, v in results["test"].items()
    }
    print(json.dumps(brief))
    return results


def dry_run(cfg: Any) -> dict[str, Any]:
    """Compose, build the model and every dataset, print their sizes; train nothing (``train --dry-run``).

    Returns what it printed: ``data`` (per split: utterances and hours, or the streamed sources) and
    ``parameters`` (total, trainable)."""
    data = _setup_data(cfg)
    setup = _setup_model(cfg)
    report: dict[str, Any] = {"data": {}, "parameters": {}}

    def sizes(utterances: list[Utterance]) -> str:
        return f"{len(utterances)} utterances, {sum(u.duration for u in utterances) / 3600:.3f} h"

    if isinstance(data.train, list):
        report["data"]["train"] = sizes(data.train)
    else:
        report["data"]["train"] = "; ".join(data.train.describe())
    report["data"]["validation"] = sizes(data.validation)
    for spec, utterances in data.test.items():
        report["data"][f"test {spec}"] = sizes(utterances)
    params = list(setup.model.parameters())
    report["parameters"] = {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }
    print(f"run {cfg.run_name}: model {cfg.model} ({type(setup.model).__name__})")
    for name, line in report["data"].items():
        print(f"  data {name}: {line}")
    total, trainable = report["parameters"]["total"], report["parameters"]["trainable"]
    print(f"  parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / max(total, 1):.2f}%)")
    print("dry run: nothing trained")
    return report


def weights_checksum(model: torch.nn.Module) -> str:
    """A short hash of the trained parameters (``requires_grad``): names, dtypes, shapes and bytes.

    Compares weights across ranks or runs. Frozen parts (an LLM beside LoRA) are left out: they do not
    change, and copying them would take a 7B LLM's size in host memory on every rank. Tensors are read
    one at a time in their own dtype (no float32 copy), so host memory holds one trained tensor at most.
    """
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not param.requires_grad:
            continue
        data = param.detach()
        digest.update(f"{name} {data.dtype} {tuple(data.shape)}".encode())
        digest.update(
            data.reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
        )  # one tensor's copy at a time
    return digest.hexdigest()[:16]
