"""``MagnetTrainer``: the Hugging Face ``Trainer`` with what speech models with compression need.

- the boundary losses ride on the model's loss; their parts (ASR loss, boundary loss, compression
  ratio, train boundary rate) are averaged over each logging window and logged next to ``loss``;
- a micro-batch with no usable sample, or whose loss is not finite, is skipped and counted, and so
  are samples the collator dropped (``num_skipped``): bad data never ends or poisons a run. Under
  several processes the ranks decide together (:meth:`MagnetTrainer.skip_together`), so every rank
  enters the same collectives (docs/architecture.md, "Several processes");
- dynamic batching by duration (``max_batch_seconds``);
- a streamed training set (``data.streaming``): its own loader, its position saved in each checkpoint and
  restored on resume (:mod:`magnet_asr.data.streaming`);
- separate learning rates per parameter group (projector, predictors, the rest);
- ``evaluate`` decodes the validation utterances and reports WER (gathered across ranks), so
  ``metric_for_best_model=SELECTION_METRIC`` selects checkpoints by what we care about: that WER, once
  the compression curriculum has reached its target.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import types
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from magnet_asr.data.manifest import Utterance
from magnet_asr.data.sampler import DurationBatchSampler
from magnet_asr.data.streaming import StreamingSpeechDataset, StreamLoader
from magnet_asr.training.distillation import BATCH_KEYS

if TYPE_CHECKING:
    from magnet_asr.data.collator import SpeechDataset

STAGING_PREFIX = ".tmp-checkpoint"
# The validation WER of a model at its target compression, returned (not logged) by ``evaluate`` for
# ``metric_for_best_model``: inf while a compression curriculum is still ramping up, so no checkpoint
# evaluated below the run's compression is picked (issue 12: a fixed-rate control pooled 1.9x in
# validation at step 100, was picked, and was then tested at its 3.3x).
SELECTION_METRIC = "wer_at_target"
AT_TARGET = "at_target"  # 1.0 when the model was evaluated at its target compression, else 0.0


def parameter_groups(
    named: Sequence[tuple[str, torch.nn.Parameter]], learning_rates: dict[str, float], default: float
) -> list[dict[str, Any]]:
    """Optimizer parameter groups, one per learning rate: a parameter takes the rate of the first
    ``learning_rates`` key its name contains (``{"projector.": 1e-3}``), else ``default``."""
    groups: dict[float, list[torch.nn.Parameter]] = defaultdict(list)
    for name, param in named:
        groups[next((lr for key, lr in learning_rates.items() if key in name), default)].append(param)
    return [{"params": params, "lr": lr} for lr, params in groups.items()]


class MagnetTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        make_recognizer: Callable[[torch.nn.Module], Any] | None = None,
        eval_utterances: Sequence[Utterance] = (),
        max_batch_seconds: float | None = None,
        learning_rates: dict[str, float] | None = None,
        distiller: Any = None,
        max_eval_skip_fraction: float | None = None,
        evaluation_figures: Callable[[torch.nn.Module, Trainer], dict[str, float]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # evaluation fails when it skipped more than this share of its utterances (None: any share)
        self.max_eval_skip_fraction = max_eval_skip_fraction
        self.evaluation_figures = evaluation_figures  # a family's own figures at each evaluation
        self.distiller = distiller  # magnet_asr.training.distillation.Distiller, or None
        # compute_loss returns the model's mean loss; the Trainer must scale it for accumulation itself
        self.model_accepts_loss_kwargs = False
        self.make_recognizer = make_recognizer
        self.eval_utterances = list(eval_utterances)
        self.max_batch_seconds = max_batch_seconds
        self.learning_rates = dict(learning_rates or {})  # parameter-name prefix -> learning rate
        self._window: dict[str, list[float]] = defaultdict(list)
        self._counts: dict[str, float] = defaultdict(float)
        self.skipped_samples = 0  # summed over ranks (skip_together)
        self.skipped_batches = 0  # micro-batches every rank skipped together
        self._skip_step = False  # the current accumulation window's optimizer step is skipped
        self.stream_loader: StreamLoader | None = None  # the training loader of a streamed dataset

    # --- data -------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        if isinstance(self.train_dataset, StreamingSpeechDataset):
            # the stream shards itself by rank and batches itself (by duration when max_batch_seconds is set)
            self.train_dataset.shard(self.accelerator.process_index, self.accelerator.num_processes)
            self.stream_loader = StreamLoader(
                self.train_dataset, self.data_collator, self.args.dataloader_num_workers
            )
            return self.stream_loader
        if self.max_batch_seconds is None:
            return super().get_train_dataloader()
        dataset = cast("SpeechDataset", self.train_dataset)  # a dataset with per-item ``durations``
        sampler = DurationBatchSampler(
            dataset.durations,
            self.max_batch_seconds,
            max_batch_size=self.args.per_device_train_batch_size,
            seed=self.args.seed,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        return self.accelerator.prepare(loader)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.train_dataset, StreamingSpeechDataset) and isinstance(resume_from_checkpoint, str):
            # the stream continues from the positions saved in the checkpoint (data/streaming.py, "Resume")
            self.train_dataset.shard(self.accelerator.process_index, self.accelerator.num_processes)
            self.train_dataset.restore(Path(resume_from_checkpoint), self.args.dataloader_num_workers)
            where = self.train_dataset.position_summary()
            print_rank_line(f"rank {self.accelerator.process_index}: the training stream resumes at {where}")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def get_resumed_dataloader(self, dataloader: DataLoader, num_batches: int) -> DataLoader:
        # a stream was restored in train(): skipping its first batches would read and decode them again
        if isinstance(dataloader, StreamLoader):
            return dataloader
        return super().get_resumed_dataloader(dataloader, num_batches)

    # --- optimization -----------------------------------------------------------------------------
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.learning_rates:
            assert self.model is not None  # Trainer.__init__ builds it (model or model_init)
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            param_groups = parameter_groups(named, self.learning_rates, self.args.learning_rate)
            for group in param_groups:
                group["weight_decay"] = self.args.weight_decay
            self.optimizer = torch.optim.AdamW(param_groups, lr=self.args.learning_rate)
        optimizer = super().create_optimizer(model)  # the one above, or the Trainer's own from its arguments
        _skip_steps_when(optimizer, self._take_skip_flag)
        return optimizer

    def _take_skip_flag(self) -> bool:
        skip, self._skip_step = self._skip_step, False
        return skip

    # --- skipping bad batches ---------------------------------------------------------------------
    def skip_together(self, bad: bool, dropped_samples: int = 0) -> bool:
        """Whether any rank has a bad micro-batch; adds every rank's ``dropped_samples`` to ``skipped_samples``.

        One all-reduce. Every rank calls it at the same points of a step, so all of them take the same
        branch: a rank that skipped alone would leave out the forward's and the backward's collectives
        that the others enter (under DDP they then wait for each other, or pair collectives of different
        steps). The counts are therefore the same on every rank.
        """
        counts = torch.tensor([float(bad), float(dropped_samples)], device=self.args.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        self.skipped_samples += int(counts[1])
        return bool(counts[0] > 0)

    def skipped_loss(self, model: torch.nn.Module, loss: torch.Tensor | None = None) -> torch.Tensor:
        """The loss a skipped micro-batch returns (on every rank alike): zero, with a backward.

        ``loss``: the step's loss when every rank ran the forward; the backward then takes the graph a
        normal step takes (the one DDP prepared for and, with ``find_unused_parameters``, searched),
        zero-weighted (``nan_to_num`` first: NaN * 0 is NaN). Without a forward, a zero-weighted sum over
        the trainable parameters: every parameter's gradient hook fires, as engines that reduce from
        those hooks (DeepSpeed ZeRO) expect. Either way the gradients of this accumulation window are
        useless (zero, or NaN where the activations were), so the window's optimizer step is skipped
        too (:func:`_skip_steps_when`): no weight moves, not even by AdamW's momentum or weight decay,
        which a step on zero gradients would apply. The learning-rate schedule still advances, and the
        window's other micro-batches are dropped with it.
        """
        if model.training:  # an evaluation loss has no step to skip
            self.skipped_batches += 1
            self._skip_step = True
        if loss is not None:
            return loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
        zero = torch.zeros((), device=self.args.device, requires_grad=True)
        return sum((p.sum() * 0.0 for p in model.parameters() if p.requires_grad), zero)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        dropped = int(inputs.pop("num_skipped", 0))
        # the collator's lists for distillation, not model inputs
        extras = {key: inputs.pop(key) for key in BATCH_KEYS if key in inputs}
        empty = "input_features" not in inputs and "input_ids" not in inputs  # the whole batch was bad
        if self.skip_together(empty, dropped if model.training else 0):
            loss = self.skipped_loss(model)
            return (loss, None) if return_outputs else loss
        outputs = model(**inputs)
        loss, parts = outputs.loss, {}
        if self.distiller is not None and extras:
            loss, parts = self.distiller.loss(outputs, {**inputs, **extras})
        if self.skip_together(not bool(torch.isfinite(loss))):
            # A NaN/Inf here would poison every weight through the optimizer
            loss = self.skipped_loss(model, loss)
        else:
            self._record(outputs)
            for key, value in parts.items():
                self._window[key].append(float(value.detach()))
        return (loss, outputs) if return_outputs else loss

    def _record(self, outputs: Any) -> None:
        for key in ("asr_loss", "boundary_loss", "ctc_loss"):
            value = getattr(outputs, key, None)
            if value is not None:
                self._window[key].append(float(value.detach()))
        # frame counts are summed over the window, so ratios are of totals, not means of per-batch ratios
        before, after = getattr(outputs, "frames_before", None), getattr(outputs, "frames_after", None)
        if before is not None and after is not None:
            self._counts["frames_before"] += float(before.sum())
            self._counts["frames_after"] += float(after.sum())
        for index, out in enumerate(getattr(outputs, "boundary_outputs", None) or ()):
            for name, value in out.losses.items():  # each term unweighted: binomial_0, phones_0...
                self._window[f"boundary_{name}_{index}"].append(float(value.detach()))
            self._counts[f"boundaries_{index}"] += float(out.num_boundaries.sum())
            self._counts[f"positions_{index}"] += float(out.num_positions.sum())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: attach this window's averages
            for key, values in self._window.items():
                if values:
                    logs[key] = sum(values) / len(values)
            self._window.clear()
            logs.update(self._ratios())
            logs["skipped_samples"] = self.skipped_samples
            logs["skipped_batches"] = self.skipped_batches
            assert self.model is not None  # Trainer.__init__ builds it (model or model_init)
            predictors = _predictors(self.model)
            if predictors:
                logs["temperature"] = float(getattr(predictors[0], "temperature", math.nan))
        super().log(logs, start_time)

    # --- checkpoints ------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` atomically: into ``.tmp-checkpoint-N``, renamed when complete.

        A crash mid-write leaves only a staging folder, which ``resume_from_checkpoint=auto`` (it looks
        for ``checkpoint-N``) never picks, so the previous checkpoint stays the one a resume uses.
        """
        import transformers.trainer as hf_trainer
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial=trial))
        step = self.state.global_step
        staging, final = run_dir / f"{STAGING_PREFIX}-{step}", run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        hf_trainer.PREFIX_CHECKPOINT_DIR = STAGING_PREFIX  # where the base class writes this checkpoint
        try:
            super()._save_checkpoint(model, trial)
        finally:
            hf_trainer.PREFIX_CHECKPOINT_DIR = PREFIX_CHECKPOINT_DIR
        if self.stream_loader is not None:  # each rank's stream position, for the resume
            self.stream_loader.save(staging)
        self.accelerator.wait_for_everyone()  # every rank has written its part
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best and Path(best).name.startswith(STAGING_PREFIX):
                self.state.best_model_checkpoint = str(
                    run_dir / Path(best).name.replace(STAGING_PREFIX, PREFIX_CHECKPOINT_DIR)
                )
                self.state.save_to_json(str(staging / "trainer_state.json"))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            rotate_checkpoints(
                str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True
            )
        self.accelerator.wait_for_everyone()

    def _ratios(self) -> dict[str, float]:
        counts, self._counts = self._counts, defaultdict(float)
        out = {}
        if counts.get("frames_after"):
            out["compression"] = counts["frames_before"] / counts["frames_after"]
        index = 0
        while f"positions_{index}" in counts:
            out[f"boundary_rate_train_{index}"] = counts[f"boundaries_{index}"] / max(
                counts[f"positions_{index}"], 1.0
            )
            index += 1
        return out

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        if self.make_recognizer is None or not self.eval_utterances:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        from accelerate.utils import gather_object

        from magnet_asr.evaluation.evaluate import evaluate

        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        shard = self.eval_utterances[rank::world]
        recognizer = self.make_recognizer(model)
        recognizer.synced_gpus = shards_parameters(self.accelerator)
        summary = evaluate(recognizer, shard, batch_size=self.args.per_device_eval_batch_size)
        model.train(was_training)
        pairs = gather_object([(r["reference"], r["hypothesis"]) for r in summary["utterances"]])
        stats = gather_object(
            [(summary["encoder_frames"], summary["compressed_frames"], summary["num_skipped"])]
        )
        from magnet_asr.evaluation.evaluate import check_skipped
        from magnet_asr.text import wer

        # from the gathered counts, the same on every rank: all of them stop together
        check_skipped(
            sum(s[2] for s in stats),
            len(self.eval_utterances),
            self.max_eval_skip_fraction,
            f"{metric_key_prefix} at step {self.state.global_step}",
        )

        metrics = {
            f"{metric_key_prefix}_wer": wer([p[0] for p in pairs], [p[1] for p in pairs])
            if pairs
            else math.nan,
            f"{metric_key_prefix}_compression": sum(s[0] for s in stats) / max(sum(s[1] for s in stats), 1),
            f"{metric_key_prefix}_skipped": float(sum(s[2] for s in stats)),
            f"{metric_key_prefix}_num_utterances": float(len(pairs)),
        }
        if self.evaluation_figures is not None:  # every rank computes its share (it may gather)
            figures = self.evaluation_figures(model, self)
            metrics.update({f"{metric_key_prefix}_{key}": value for key, value in figures.items()})
        at_target = curriculum_complete(model)
        # logged, so log_history (kept across resume) tells which checkpoints are at the target (averaging)
        metrics[f"{metric_key_prefix}_{AT_TARGET}"] = float(at_target)
        self.log(metrics)
        metrics[f"{metric_key_prefix}_{SELECTION_METRIC}"] = (
            metrics[f"{metric_key_prefix}_wer"] if at_target else math.inf
        )
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def print_rank_line(text: str) -> None:
    """Print ``text`` and its newline in one write: ranks share one unbuffered stream, where ``print``
    writes the newline apart and another rank's line could run into this one (issue 14)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def shards_parameters(accelerator: Any) -> bool:
    """Whether the model's parameters are split over several ranks (FSDP, DeepSpeed ZeRO-3): then every
    forward needs every rank, ``generate`` included (``synced_gpus``)."""
    from accelerate.utils import DistributedType

    if accelerator.num_processes < 2:
        return False
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and plugin is not None
        and plugin.zero_stage == 3
    )


def _skip_steps_when(optimizer: torch.optim.Optimizer, skip: Callable[[], bool]) -> None:
    """Make ``optimizer.step()`` do nothing when ``skip()`` says so (it is asked once per step).

    The Trainer's loop steps the optimizer unconditionally; this is the one place a step can be left
    out. The replacement is a bound method, as the learning-rate scheduler expects when it wraps
    ``step`` to track calls. DeepSpeed steps its own optimizer inside its engine: there a skipped
    window steps on the zero gradients (identically on every rank).
    """
    if getattr(optimizer, "_magnet_skippable", False):
        return
    step = optimizer.step

    def guarded(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        return None if skip() else step(*args, **kwargs)

    optimizer.step = types.MethodType(guarded, optimizer)  # type: ignore[method-assign]
    optimizer._magnet_skippable = True  # type: ignore[attr-defined]


def curriculum_complete(model: torch.nn.Module) -> bool:
    """True when every boundary predictor of ``model`` is at its final compression (no curriculum, or
    one that has reached its target); the schedule callback sets ``curriculum_fraction`` each step."""
    return all(getattr(p, "curriculum_fraction", 1.0) >= 1.0 for p in _predictors(model))


def _predictors(model: torch.nn.Module) -> list[torch.nn.Module]:
    from magnet_asr.compression import BoundaryPredictor

    return [m for m in model.modules() if isinstance(m, BoundaryPredictor)]
