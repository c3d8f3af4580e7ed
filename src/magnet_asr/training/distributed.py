"""Sharded engines (FSDP, DeepSpeed) around the recipe's Trainer, and the run's speed and memory figures.

- **Auto-wrap classes come from the model that is built** (:func:`wrap_classes`): one FSDP unit per repeated
  block the model holds. A launch config cannot name them: accelerate refuses a class the model does not contain,
  and MagnetWhisper (Whisper encoder + decoder layers) and SpeechLLM (Whisper encoder layers + the LLM's decoder
  layers: Llama, Qwen2...) hold different ones.
- **``final/`` is a full state dict gathered on rank 0** (:func:`save_final`), whatever
  ``fsdp_state_dict_type`` the checkpoints use (``SHARDED_STATE_DICT``: each rank writes its shard, fast, and
  ``resume_from_checkpoint`` reads them back), so ``from_pretrained`` loads it.
- **accelerate runs FSDP on accelerators only**: on CPU processes it sets up ``MULTI_CPU`` (plain DDP) and drops
  the FSDP plugin without a word; :func:`prepare_sharding` stops such a run instead of training it unsharded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers.trainer import TRAINING_ARGS_NAME  # tests/training/test_recipe.py pins it

from magnet_asr.models.encoder import MagnetWhisperEncoder
from magnet_asr.training.trainer import shards_parameters

# The launcher's flag for FSDP (`accelerate launch` with `distributed_type: FSDP` exports it to every process).
FSDP_ENV = "ACCELERATE_USE_FSDP"


def wrap_classes(model: torch.nn.Module) -> list[str]:
    """The class names FSDP wraps as one unit each (``transformer_cls_names_to_wrap``) for ``model``.

    Hugging Face models declare their blocks in ``_no_split_modules`` (Whisper: its encoder and decoder layers;
    the LLM inside a SpeechLLM, under PEFT or not: its decoder layer); a SpeechLLM's encoder is a plain module
    whose ``layers`` are Whisper encoder layers. Only classes the model instantiates are named (accelerate
    refuses others), sorted: transformers collects ``_no_split_modules`` into a set, whose order changes between
    processes.
    """
    declared: list[str] = []
    for module in model.modules():
        declared.extend(getattr(module, "_no_split_modules", None) or ())
        if isinstance(module, MagnetWhisperEncoder):
            declared.extend(type(layer).__name__ for layer in module.layers)
    present = {type(module).__name__ for module in model.modules()}
    names = sorted(set(declared) & present)
    if not names:
        raise ValueError(f"{type(model).__name__}: no transformer layer class to wrap for FSDP")
    return names


def same_forwards_on_every_rank(model: torch.nn.Module) -> None:
    """Turn off what lets one rank skip a module's forward that another rank runs: under FSDP (or ZeRO-3) each
    sharded module's forward all-gathers its parameters, so the ranks' collectives would pair up wrongly (gloo
    stops with "Received data size doesn't match expected size", NCCL hangs). That is SpeechLLM's encoder cache:
    one rank's batch is cached, another's is not."""
    if getattr(model, "encoder_cache", None) is not None:
        setattr(model, "encoder_cache", None)  # noqa: B010  (nn.Module is typed without it)
        print("sharded model: the SpeechLLM encoder cache is off (every rank runs the encoder)", flush=True)


def prepare_sharding(trainer: Any, model: torch.nn.Module) -> None:
    """Set the FSDP auto-wrap classes from ``model`` on ``trainer``'s FSDP plugin, and make every rank run the
    same forwards (:func:`same_forwards_on_every_rank`) where the parameters are sharded (FSDP, ZeRO-3 over
    several processes); call before ``train``.

    Raises where the launcher asked for FSDP but accelerate set up none (CPU processes), and for FSDP1 over a
    model with frozen parameters without ``use_orig_params`` (FSDP1 flattens a unit's parameters into one
    tensor, which cannot be partly frozen; FSDP2 shards each parameter on its own)."""
    if shards_parameters(trainer.accelerator):
        same_forwards_on_every_rank(model)
    if not trainer.is_fsdp_enabled:
        if os.environ.get(FSDP_ENV, "false").lower() == "true":
            raise ValueError(
                "the accelerate config asks for FSDP, but accelerate runs FSDP on GPUs (accelerators) only and set"
                f" up {trainer.accelerator.distributed_type} here: on CPUs use configs/accelerate/cpu_ddp.yaml"
            )
        return
    plugin = trainer.accelerator.state.fsdp_plugin
    frozen = any(not p.requires_grad for p in model.parameters())
    if plugin.fsdp_version == 1 and frozen and not plugin.use_orig_params:
        raise ValueError(
            "FSDP1 cannot shard a model with frozen parameters without use_orig_params: set"
            " fsdp_use_orig_params: true, or fsdp_version: 2, in the accelerate config"
        )
    # replaces any list from the launch config: accelerate reads the names when it wraps the model in train()
    plugin.transformer_cls_names_to_wrap = wrap_classes(model)
    if trainer.is_world_process_zero():
        print(
            f"FSDP{plugin.fsdp_version} wraps {', '.join(plugin.transformer_cls_names_to_wrap)}", flush=True
        )


def save_final(trainer: Any, directory: Path) -> None:
    """``trainer.save_model(directory)`` with, under FSDP, the full state dict gathered on rank 0 (every rank
    must call it): a sharded ``final/`` would not load with ``from_pretrained``.

    The Trainer's pickled ``training_args.bin`` is removed from ``directory``: ``final/`` is what users share,
    loading a pickle runs code, and nothing reads it (the run's ``config.yaml`` and the model card record
    the settings; checkpoints keep theirs)."""
    if trainer.is_fsdp_enabled:
        plugin = trainer.accelerator.state.fsdp_plugin
        # the configs belong to the state-dict type; set_state_dict_type makes FULL's (rank 0 only, on the CPU)
        plugin.state_dict_config = plugin.optim_state_dict_config = None
        plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(directory))
    if trainer.args.should_save:
        (directory / TRAINING_ARGS_NAME).unlink(missing_ok=True)


def trained_model(trainer: Any, directory: Path) -> torch.nn.Module:
    """The model that rank 0 evaluates after :func:`save_final`, in eval mode.

    Under FSDP the trainer's model holds shards that need every rank for each forward, while rank 0 evaluates
    alone: the model saved in ``directory`` is loaded back instead (which also shows ``final/`` loads)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not trainer.is_fsdp_enabled:
        return model.eval()
    loaded = unsharded_class(model).from_pretrained(str(directory))  # type: ignore[attr-defined]
    return loaded.to(trainer.args.device).eval()


def unsharded_class(model: torch.nn.Module) -> type[torch.nn.Module]:
    """The model's own class: FSDP2 swaps it for ``FSDP<Name>(FSDPModule, Name)`` in place (FSDP1's unwrapped
    module keeps its own)."""
    from torch.distributed.fsdp import FSDPModule

    return next(
        c for c in type(model).__mro__ if issubclass(c, torch.nn.Module) and not issubclass(c, FSDPModule)
    )


def run_figures(trainer: Any) -> dict[str, float | None]:
    """What a run cost: the Trainer's ``train_runtime`` and ``train_steps_per_second`` (this process's last
    ``train()``, evaluations and checkpoints included) and this process's peak GPU memory (GiB; None on CPU)."""
    history: list[dict[str, float]] = trainer.state.log_history
    summary = next((entry for entry in reversed(history) if "train_runtime" in entry), {})
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {
        "train_runtime": summary.get("train_runtime"),
        "train_steps_per_second": summary.get("train_steps_per_second"),
        "peak_memory_gb": peak,
    }
