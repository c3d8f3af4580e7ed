"""Best-checkpoint selection on validation WER waits for the compression curriculum (issue 12): a
checkpoint evaluated before the curriculum reached its target pooled less than the run is for."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import soundfile as sf
import torch
from transformers import TrainingArguments

from magnet_asr.audio import SAMPLE_RATE
from magnet_asr.compression import BoundaryPredictor, BoundaryPredictorConfig
from magnet_asr.data.manifest import Utterance
from magnet_asr.evaluation.decode import Transcription
from magnet_asr.training.callbacks import ScheduleCallback
from magnet_asr.training.trainer import SELECTION_METRIC, MagnetTrainer, curriculum_complete

REFERENCE = "please enter your number"


class RegressionWithPredictor(torch.nn.Module):
    """A regression batch in, ``.loss`` out, with a boundary predictor the schedule callback drives."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.predictor = BoundaryPredictor(BoundaryPredictorConfig(hidden_size=4))

    def forward(self, input_features: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=((self.linear(input_features).squeeze(-1) - labels) ** 2).mean())


class WrongWords:
    """Reads the reference with its first ``num_wrong`` words replaced."""

    name, max_seconds = "wrong-words", 30.0

    def __init__(self, num_wrong: int) -> None:
        self.num_wrong = num_wrong

    def transcribe(self, waveforms):
        words = REFERENCE.split()
        text = " ".join(["wrong"] * self.num_wrong + words[self.num_wrong :])
        return [Transcription(text, encoder_frames=50, compressed_frames=50) for _ in waveforms]


def test_curriculum_complete_reads_every_predictor():
    model = RegressionWithPredictor()
    assert curriculum_complete(model)
    model.predictor.curriculum_fraction = 0.5
    assert not curriculum_complete(model)
    assert curriculum_complete(torch.nn.Linear(2, 2))  # no predictor, no curriculum


def test_checkpoints_evaluated_during_the_curriculum_are_never_picked(tmp_path):
    torch.manual_seed(0)
    wav = tmp_path / "a.wav"
    sf.write(wav, np.random.default_rng(0).normal(0, 0.1, SAMPLE_RATE).astype("float32"), SAMPLE_RATE)
    evaluations: list[int] = []

    def worse_each_time(model):  # perfect at the first evaluation, one more word wrong each time after
        evaluations.append(len(evaluations))
        return WrongWords(evaluations[-1])

    items = [{"input_features": torch.randn(4), "labels": torch.randn(())} for _ in range(6)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        per_device_train_batch_size=1,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        metric_for_best_model=SELECTION_METRIC,
        greater_is_better=False,
        load_best_model_at_end=True,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    # the curriculum ramps over the first half (3 steps): the evaluation at step 2 is still on the ramp
    schedule = ScheduleCallback(curriculum="linear", curriculum_ramp=0.5, target_factor=3.0)
    trainer = MagnetTrainer(
        model=RegressionWithPredictor(),
        args=args,
        train_dataset=items,
        eval_dataset=items,  # the Trainer asks for one; evaluation decodes eval_utterances instead
        data_collator=lambda batch: {k: torch.stack([b[k] for b in batch]) for k in batch[0]},
        callbacks=[schedule],
        make_recognizer=worse_each_time,
        eval_utterances=[Utterance("a", str(wav), REFERENCE, 1.0, split="validation")],
    )
    trainer.train()
    wers = [(e["step"], e["eval_wer"]) for e in trainer.state.log_history if "eval_wer" in e]
    assert wers == [(2, 0.0), (4, 0.25), (6, 0.5)]  # plain WER would pick step 2
    # logged for checkpoint averaging, which reads log_history
    assert [e["eval_at_target"] for e in trainer.state.log_history if "eval_wer" in e] == [0.0, 1.0, 1.0]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    assert trainer.state.best_metric == 0.25
