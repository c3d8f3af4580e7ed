"""Trainer callbacks that drive the compression schedules (``magnet_asr.compression.schedules``).

At every step the callback writes the scheduled values into the predictors: Gumbel temperature,
boundary-loss weight, the compression curriculum (prior for ``fixed`` targets, the fraction of the way
from 1x to the transcript count otherwise), and whether only the predictors train. Values are pure
functions of ``state.global_step``, so a resumed run continues the schedules exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

from magnet_asr.compression import BoundaryPredictor, schedules


@dataclass
class ScheduleCallback(TrainerCallback):
    temperature_start: float = 1.0
    temperature_end: float | None = None
    loss_weight: float = 1.0
    loss_warmup_steps: int = 0
    curriculum: str = "none"
    curriculum_ramp: float = 0.5
    target_factor: float = 5.0
    predictor_only_steps: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> ScheduleCallback:
        c = cfg.compressor
        return cls(
            temperature_start=c.temperature,
            temperature_end=c.temperature_end,
            loss_weight=c.loss_weight,
            loss_warmup_steps=c.loss_warmup_steps,
            curriculum=c.curriculum,
            curriculum_ramp=c.curriculum_ramp,
            target_factor=c.compression,
            predictor_only_steps=c.predictor_only_steps,
        )

    def __post_init__(self) -> None:
        self._frozen: dict[str, bool] | None = None

    def values(self, step: int, max_steps: int) -> dict[str, float]:
        """The scheduled values at ``step`` of ``max_steps``."""
        progress = schedules.progress(step, max(max_steps, 1))
        out = {"loss_weight": schedules.loss_weight(step, self.loss_weight, self.loss_warmup_steps)}
        if self.temperature_end is not None:
            out["temperature"] = schedules.temperature(progress, self.temperature_start, self.temperature_end)
        if self.curriculum != "none":
            fraction = schedules.curriculum_fraction(progress, self.curriculum, self.curriculum_ramp)
            out["curriculum_fraction"] = fraction
            out["prior"] = 1.0 / (1.0 + fraction * (self.target_factor - 1.0))
        return out

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        predictors = [m for m in model.modules() if isinstance(m, BoundaryPredictor)]
        if not predictors:
            return
        values = self.values(state.global_step, state.max_steps)
        for predictor in predictors:
            predictor.loss_weight = values["loss_weight"]
            if "temperature" in values:
                predictor.temperature = values["temperature"]
            if "curriculum_fraction" in values:
                predictor.curriculum_fraction = values["curriculum_fraction"]
                if predictor.config.target == "fixed":
                    predictor.prior = values["prior"]
        self._toggle_freeze(
            model, schedules.predictor_warmup_active(state.global_step, self.predictor_only_steps)
        )

    def _toggle_freeze(self, model, active: bool) -> None:
        if active and self._frozen is None:
            self._frozen = schedules.freeze_all_but_predictors(model)
        elif not active and self._frozen is not None:
            schedules.restore_requires_grad(model, self._frozen)
            self._frozen = None
