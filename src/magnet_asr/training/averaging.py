"""Checkpoint averaging: ``final/`` as the mean weights of a run's last checkpoints (``training.average_checkpoints``).

Why: at 5x, seeds of one recipe spread widely on asterisk test (0.058-0.103 over four seeds, issue 12), and
a 100-utterance validation picks a checkpoint partly by noise. The mean of the last few checkpoints of
one run (Vaswani et al. 2017 average the last 5-20; Izmailov et al. 2018, SWA) sits in a flatter point
than any of them. Only checkpoints validated at the target compression count, so a compression
curriculum's early steps are never mixed in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from magnet_asr.training.trainer import AT_TARGET

__all__ = ["average_weights", "checkpoints_to_average", "load_average"]

WEIGHTS_NAME = "model.safetensors"


def checkpoints_to_average(
    output_dir: Path, log_history: list[dict[str, Any]], count: int
) -> dict[int, Path]:
    """The ``count`` newest ``checkpoint-N`` folders of ``output_dir`` validated at the target compression,
    by step, oldest first.

    A checkpoint qualifies when ``log_history`` has an evaluation at its step that was at the target
    compression (``eval_at_target``: 0 while a compression curriculum ramps up). Fewer than ``count``
    when fewer qualify, and an error when none does.
    """
    at_target = sorted({int(e["step"]) for e in log_history if e.get(f"eval_{AT_TARGET}") == 1.0})
    found = {
        step: path for step in at_target if (path := output_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}").is_dir()
    }
    if not found:
        raise ValueError(
            f"training.average_checkpoints: no checkpoint in {output_dir} was validated at the target "
            "compression (is training.save_steps a multiple of training.eval_steps?)"
        )
    return dict(list(found.items())[-count:])


def average_weights(checkpoints: list[Path]) -> dict[str, torch.Tensor]:
    """Mean of every floating-point tensor in the checkpoints' ``model.safetensors`` (summed in float32,
    cast back to each tensor's dtype); other tensors (integer buffers) come from the newest checkpoint."""
    from safetensors.torch import load_file

    total: dict[str, torch.Tensor] = {}
    newest: dict[str, torch.Tensor] = {}
    for path in checkpoints:
        file = path / WEIGHTS_NAME
        if not file.is_file():
            raise ValueError(
                f"training.average_checkpoints: {file} not found (sharded or FSDP checkpoints are not averaged)"
            )
        names = set(newest)
        newest = load_file(str(file))
        if names and set(newest) != names:
            raise ValueError(
                f"training.average_checkpoints: {path} holds other tensors than {checkpoints[0]}"
            )
        for name, tensor in newest.items():
            if tensor.is_floating_point():
                total[name] = total[name] + tensor.float() if name in total else tensor.float()
    return {
        name: (total[name] / len(checkpoints)).to(tensor.dtype) if tensor.is_floating_point() else tensor
        for name, tensor in newest.items()
    }


def load_average(model: torch.nn.Module, checkpoints: list[Path]) -> None:
    """Load the mean weights of ``checkpoints`` into ``model``.

    The files leave out tied tensors (a decoder's output projection shares its token embedding), so keys
    may be missing; a key the model does not have is an error: the checkpoints belong to another model.
    """
    state = average_weights(checkpoints)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"training.average_checkpoints: {checkpoints[-1]} holds tensors this model lacks: "
            f"{result.unexpected_keys[:5]}"
        )
