"""``MagnetTrainer``: the Hugging Face ``Trainer`` with what speech models with compression need.

- the boundary losses ride on the model's loss; their parts (ASR loss, boundary loss, compression
  ratio, train boundary rate) are averaged over each logging window and logged next to ``loss``;
- a batch whose loss is not finite is skipped (no gradient reaches the optimizer) and counted, and
  so are samples the collator dropped (``num_skipped``): bad data never ends or poisons a run;
- dynamic batching by duration (``max_batch_seconds``);
- a streamed training set (``data.streaming``): its own loader, its position saved in each checkpoint and
  restored on resume (:mod:`magnet_asr.data.streaming`);
- separate learning rates per parameter group (projector, predictors, the rest);
- ``evaluate`` decodes the validation utterances and reports WER (gathered across ranks), so
  ``metric_for_best_model="wer"`` selects checkpoints by what we care about.
"""

from __future__ import annotations

import math
import os
import shutil
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


class MagnetTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        make_recognizer: Callable[[torch.nn.Module], Any] | None = None,
        eval_utterances: Sequence[Utterance] = (),
        max_batch_seconds: float | None = None,
        learning_rates: dict[str, float] | None = None,
        distiller: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.distiller = distiller  # magnet_asr.training.distillation.Distiller, or None
        # compute_loss returns the model's mean loss; the Trainer must scale it for accumulation itself
        self.model_accepts_loss_kwargs = False
        self.make_recognizer = make_recognizer
        self.eval_utterances = list(eval_utterances)
        self.max_batch_seconds = max_batch_seconds
        self.learning_rates = dict(learning_rates or {})  # parameter-name prefix -> learning rate
        self._window: dict[str, list[float]] = defaultdict(list)
        self._counts: dict[str, float] = defaultdict(float)
        self.skipped_samples = 0
        self.skipped_batches = 0
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
            print(
                f"rank {self.accelerator.process_index}: the training stream resumes at {where}", flush=True
            )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def get_resumed_dataloader(self, dataloader: DataLoader, num_batches: int) -> DataLoader:
        # a stream was restored in train(): skipping its first batches would read and decode them again
        if isinstance(dataloader, StreamLoader):
            return dataloader
        return super().get_resumed_dataloader(dataloader, num_batches)

    # --- optimization -----------------------------------------------------------------------------
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None or not self.learning_rates:
            return super().create_optimizer()
        groups: dict[float, list[torch.nn.Parameter]] = defaultdict(list)
        assert self.model is not None  # Trainer.__init__ builds it (model or model_init)
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            lr = next(
                (lr for prefix, lr in self.learning_rates.items() if prefix in name), self.args.learning_rate
            )
            groups[lr].append(param)
        param_groups = [
            {"params": params, "lr": lr, "weight_decay": self.args.weight_decay}
            for lr, params in groups.items()
        ]
        self.optimizer = torch.optim.AdamW(param_groups, lr=self.args.learning_rate)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.skipped_samples += int(inputs.pop("num_skipped", 0))
        # the collator's lists for distillation, not model inputs
        extras = {key: inputs.pop(key) for key in BATCH_KEYS if key in inputs}
        if "input_features" not in inputs and "input_ids" not in inputs:  # the whole batch was bad
            self.skipped_batches += 1
            loss = torch.zeros((), device=self.args.device, requires_grad=True)
            return (loss, None) if return_outputs else loss
        outputs = model(**inputs)
        loss, parts = outputs.loss, {}
        if self.distiller is not None and extras:
            loss, parts = self.distiller.loss(outputs, {**inputs, **extras})
        if not torch.isfinite(loss):
            # A NaN/Inf here would poison every weight through the optimizer; drop the batch instead.
            self.skipped_batches += 1
            loss = torch.zeros((), device=loss.device, requires_grad=True)
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
        summary = evaluate(
            self.make_recognizer(model), shard, batch_size=self.args.per_device_eval_batch_size
        )
        model.train(was_training)
        pairs = gather_object([(r["reference"], r["hypothesis"]) for r in summary["utterances"]])
        stats = gather_object(
            [(summary["encoder_frames"], summary["compressed_frames"], summary["num_skipped"])]
        )
        from magnet_asr.text import wer

        metrics = {
            f"{metric_key_prefix}_wer": wer([p[0] for p in pairs], [p[1] for p in pairs])
            if pairs
            else math.nan,
            f"{metric_key_prefix}_compression": sum(s[0] for s in stats) / max(sum(s[1] for s in stats), 1),
            f"{metric_key_prefix}_skipped": float(sum(s[2] for s in stats)),
            f"{metric_key_prefix}_num_utterances": float(len(pairs)),
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def _predictors(model: torch.nn.Module) -> list[torch.nn.Module]:
    from magnet_asr.compression import BoundaryPredictor

    return [m for m in model.modules() if isinstance(m, BoundaryPredictor)]
