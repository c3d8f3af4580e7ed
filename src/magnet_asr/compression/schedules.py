"""Training schedules as plain functions of progress, for Trainer callbacks.

``progress`` is the fraction of training done, in ``[0, 1]`` (:func:`progress`). A callback computes
the values at each step and writes them to the predictors' attributes (``prior``, ``temperature``,
``loss_weight``), or toggles which parameters train (:func:`freeze_all_but_predictors`).
"""

from __future__ import annotations

import math

from torch import nn

__all__ = [
    "compression_factor",
    "curriculum_fraction",
    "freeze_all_but_predictors",
    "loss_weight",
    "predictor_warmup_active",
    "progress",
    "restore_requires_grad",
    "temperature",
]

CURRICULA = ("linear", "cosine", "staircase")


def progress(step: int, total_steps: int) -> float:
    """Fraction of training done, ``step / total_steps`` clipped to ``[0, 1]``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return min(max(step / total_steps, 0.0), 1.0)


def _check_progress(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {value}")
    return value


def curriculum_fraction(value: float, kind: str = "linear", ramp: float = 1.0, num_stairs: int = 4) -> float:
    """How far along the compression curriculum we are, in ``[0, 1]``.

    The curriculum runs over the first ``ramp`` of training, then holds at 1.

    - ``linear``: ``x`` (with ``x = progress / ramp``).
    - ``cosine``: ``(1 - cos(pi x)) / 2``: gentle at both ends.
    - ``staircase``: ``num_stairs`` equal jumps, ``floor(x (num_stairs + 1)) / num_stairs`` capped at 1:
      starts at 0 (no compression) and reaches 1 for the last ``1 / (num_stairs + 1)`` of the ramp.
    """
    _check_progress(value)
    if kind not in CURRICULA:
        raise ValueError(f"kind must be one of {CURRICULA}, got {kind!r}")
    if not 0.0 < ramp <= 1.0:
        raise ValueError(f"ramp must be in (0, 1], got {ramp}")
    x = min(value / ramp, 1.0)
    if kind == "linear":
        return x
    if kind == "cosine":
        return (1.0 - math.cos(math.pi * x)) / 2.0
    if num_stairs < 1:
        raise ValueError(f"num_stairs must be >= 1, got {num_stairs}")
    return min(math.floor(x * (num_stairs + 1)) / num_stairs, 1.0)


def compression_factor(
    value: float, target_factor: float, kind: str = "linear", ramp: float = 1.0, num_stairs: int = 4
) -> float:
    """Compression factor from 1x (no compression) at progress 0 to ``target_factor``.

    Interpolates the factor (frames per segment), not the rate: ``1 + f (target - 1)`` with ``f`` from
    :func:`curriculum_fraction`. The matching prior for a ``fixed`` target is ``1 / factor``.
    """
    if target_factor < 1.0:
        raise ValueError(f"target_factor must be >= 1, got {target_factor}")
    return 1.0 + curriculum_fraction(value, kind, ramp, num_stairs) * (target_factor - 1.0)


def temperature(value: float, start: float = 1.0, end: float = 0.1, kind: str = "exponential") -> float:
    """Gumbel-sigmoid temperature annealed from ``start`` to ``end``.

    ``exponential`` (``start (end/start)^progress``, the usual Concrete annealing) or ``linear``.
    Lower temperatures make the straight-through gradient closer to the hard decision but noisier;
    the boundary *rate* does not depend on the temperature (docs/architecture.md).
    """
    _check_progress(value)
    if start <= 0 or end <= 0:
        raise ValueError(f"temperatures must be positive, got start={start}, end={end}")
    if kind == "exponential":
        return start * (end / start) ** value
    if kind == "linear":
        return start + (end - start) * value
    raise ValueError(f"kind must be 'exponential' or 'linear', got {kind!r}")


def loss_weight(step: int, max_weight: float, warmup_steps: int, start_step: int = 0) -> float:
    """Boundary-loss weight: 0 before ``start_step``, linear over ``warmup_steps``, then ``max_weight``."""
    if warmup_steps < 0 or start_step < 0:
        raise ValueError("warmup_steps and start_step must be >= 0")
    if step < start_step:
        return 0.0
    if warmup_steps == 0:
        return max_weight
    return max_weight * min((step - start_step) / warmup_steps, 1.0)


def predictor_warmup_active(step: int, freeze_steps: int) -> bool:
    """True while only the predictors should train (the first ``freeze_steps`` steps)."""
    return step < freeze_steps


def freeze_all_but_predictors(model: nn.Module) -> dict[str, bool]:
    """Set ``requires_grad=False`` on every parameter outside a ``BoundaryPredictor``.

    Returns the previous flags by parameter name for :func:`restore_requires_grad`, so parameters
    that were frozen on purpose (a frozen encoder, LoRA bases) stay frozen afterwards. Under DDP,
    toggle before wrapping or use ``find_unused_parameters``: the set of trained parameters changes.
    """
    from .predictor import BoundaryPredictor

    inside = {id(p) for m in model.modules() if isinstance(m, BoundaryPredictor) for p in m.parameters()}
    if not inside:
        raise ValueError("model contains no BoundaryPredictor: freezing everything else would train nothing")
    previous: dict[str, bool] = {}
    for name, parameter in model.named_parameters():
        previous[name] = parameter.requires_grad
        if id(parameter) not in inside:
            parameter.requires_grad_(False)
    return previous


def restore_requires_grad(model: nn.Module, previous: dict[str, bool]) -> None:
    """Undo :func:`freeze_all_but_predictors` with the flags it returned."""
    for name, parameter in model.named_parameters():
        if name in previous:
            parameter.requires_grad_(previous[name])
