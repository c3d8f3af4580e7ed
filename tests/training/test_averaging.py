"""Checkpoint averaging (``training.average_checkpoints``): which checkpoints, their mean, loading it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from magnet_asr.models import MagnetWhisper, MagnetWhisperConfig
from magnet_asr.schema import load_run_config
from magnet_asr.training.averaging import average_weights, checkpoints_to_average, load_average
from tiny import TINY_WHISPER


def tiny_model(seed: int) -> MagnetWhisper:
    torch.manual_seed(seed)
    return MagnetWhisper(MagnetWhisperConfig(**TINY_WHISPER, predictor_layers=[1]))


def validation(step: int, at_target: bool) -> dict[str, float]:
    return {"step": step, "eval_wer": 0.2, "eval_at_target": float(at_target)}


def test_only_checkpoints_validated_at_the_target_compression_newest_last(tmp_path):
    for step in (100, 200, 300, 400, 500):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-600").write_text("not a folder")
    (tmp_path / "checkpoint-final").mkdir()
    history = [
        validation(100, False),  # the curriculum was still ramping up
        validation(200, False),
        {"step": 250, "loss": 1.0},
        validation(300, True),
        validation(400, True),
        validation(500, True),
        validation(600, True),  # a validation whose checkpoint is not on disk
    ]
    names = lambda found: [p.name for p in found.values()]  # noqa: E731
    assert names(checkpoints_to_average(tmp_path, history, 2)) == ["checkpoint-400", "checkpoint-500"]
    assert list(checkpoints_to_average(tmp_path, history, 5)) == [300, 400, 500]  # by step, oldest first
    assert names(checkpoints_to_average(tmp_path, history, 5)) == [f"checkpoint-{s}" for s in (300, 400, 500)]
    with pytest.raises(ValueError, match="no checkpoint .* was validated at the target compression"):
        checkpoints_to_average(tmp_path, history[:3], 2)


def test_the_mean_of_two_checkpoints_loads_into_a_third_model(tmp_path):
    first, second = tiny_model(0), tiny_model(1)
    checkpoints = [tmp_path / "checkpoint-4", tmp_path / "checkpoint-6"]
    first.save_pretrained(checkpoints[0])
    second.save_pretrained(checkpoints[1])
    model = tiny_model(2)
    load_average(model, checkpoints)
    one, two = first.state_dict(), second.state_dict()
    for name, tensor in model.state_dict().items():  # tied tensors (left out of the files) included
        torch.testing.assert_close(tensor, (one[name] + two[name]) / 2, msg=name)
    assert not torch.equal(model.proj_out.weight, first.proj_out.weight)


def test_half_precision_tensors_are_summed_in_float32_and_integers_come_from_the_newest(tmp_path):
    big = torch.full((3,), 60000.0, dtype=torch.float16)  # the float16 sum of two would be inf
    for step, count in ((1, 5), (2, 7)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        tensors = {"w": big, "count": torch.tensor([count])}
        save_file(tensors, str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))
    mean = average_weights([tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"])
    assert mean["w"].dtype == torch.float16 and torch.equal(mean["w"], big)
    assert mean["count"].tolist() == [7]


def test_missing_foreign_or_mismatched_checkpoints_are_errors(tmp_path: Path):
    tiny_model(0).save_pretrained(tmp_path / "checkpoint-1")
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match="checkpoint-2/model.safetensors not found"):
        average_weights([tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"])
    save_file({"other.weight": torch.zeros(2)}, str(tmp_path / "checkpoint-2" / "model.safetensors"))
    with pytest.raises(ValueError, match="checkpoint-2 holds other tensors than"):
        average_weights([tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"])
    with pytest.raises(ValueError, match="holds tensors this model lacks"):
        load_average(tiny_model(0), [tmp_path / "checkpoint-2"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.average_checkpoints=-1"], "must be >= 0"),
        (["training.average_checkpoints=3"], r"save_total_limit >= 4"),
        (
            ["training.average_checkpoints=2", "training.eval_steps=3", "training.save_steps=2"],
            "a multiple of",
        ),
        (["training.average_checkpoints=2", "training.eval_steps=0"], "a multiple of"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(overrides)


def test_a_config_that_can_average_composes():
    cfg = load_run_config(["training.average_checkpoints=3", "training.save_total_limit=4"])
    assert cfg.training.average_checkpoints == 3
