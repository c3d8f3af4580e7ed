"""Supervised training can start from a MagnetWhisper checkpoint (e.g. after GRPO), predictors included."""

from __future__ import annotations

import pytest
import torch

from magnet_asr.models import MagnetWhisper, MagnetWhisperConfig
from magnet_asr.schema import load_run_config
from magnet_asr.training.builders import build_magnet_whisper
from tiny import TINY_WHISPER

PHONEME = {"variant": "mlp", "prior": 0.3, "target": "phoneme", "loss": ["binomial"]}


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = MagnetWhisper(
        MagnetWhisperConfig(**TINY_WHISPER, predictor_layers=[1], predictor_settings=PHONEME)
    )
    with torch.no_grad():
        model.model.encoder.predictors["1"].mlp[-1].bias.fill_(1.25)
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_magnet_checkpoint_keeps_its_trained_predictors(checkpoint):
    cfg = load_run_config(["+experiments=magnet_demo", f"encoder.name={checkpoint}"])
    model = build_magnet_whisper(cfg)
    assert model.model.encoder.predictors["1"].mlp[-1].bias.item() == 1.25


@pytest.mark.parametrize(
    "override", ["compressor.layers=[0]", "compressor=none", "compressor.target=syllable"]
)
def test_a_compressor_that_disagrees_with_the_checkpoint_is_a_clear_error(checkpoint, override):
    cfg = load_run_config(["+experiments=magnet_demo", f"encoder.name={checkpoint}", override])
    with pytest.raises(ValueError, match="make them agree"):
        build_magnet_whisper(cfg)


def test_phone_supervision_adds_the_phones_loss_and_the_collator_field():
    from magnet_asr.training.builders import predictor_settings

    cfg = load_run_config(["+experiments=magnet_demo", "compressor.phone_supervision_weight=0.5"])
    settings = predictor_settings(cfg)
    assert settings["loss"] == ["binomial", "phones"] and settings["loss_weights"] == [1.0, 0.5]
    assert settings["max_segment_frames"] == 5  # magnet_demo's cap
    five = predictor_settings(load_run_config(["+experiments=magnet_demo_5x"]))
    # a longer cap at one segment per phoneme: an uncapped pause stopped the decoder there
    assert five["max_segment_frames"] == 12 and "phones" in five["loss"]
    assert five["pooling"] == "attention"  # measured better than the mean at one segment per phoneme
    off = predictor_settings(
        load_run_config(["+experiments=magnet_demo", "compressor.phone_supervision_weight=0"])
    )
    assert off["loss"] == ["binomial"] and off["loss_weights"] == [1.0]


@pytest.mark.parametrize(
    ("student", "control"),
    [("magnet_demo", "magnet_demo_fixed"), ("magnet_demo_5x", "magnet_demo_5x_fixed")],
)
def test_a_fixed_rate_control_trains_like_its_student_but_for_the_boundaries(student, control):
    from omegaconf import OmegaConf

    learned, fixed = (
        OmegaConf.to_container(load_run_config([f"+experiments={n}"])) for n in (student, control)
    )
    assert fixed["compressor"]["variant"] == "uniform" and fixed["compressor"]["target"] == "fixed"
    assert fixed["compressor"]["pooling"] == learned["compressor"]["pooling"]
    assert fixed["compressor"]["layers"] == learned["compressor"]["layers"]
    for run in (learned, fixed):
        del run["training"]["output_dir"]  # runs/<run_name>
    for group in ("training", "distillation", "data", "encoder"):
        assert fixed[group] == learned[group], group


def test_init_from_a_control_run_leaves_only_the_new_predictors_fresh(tmp_path):
    from magnet_asr.training.builders import initialize_from

    torch.manual_seed(0)
    control = MagnetWhisper(MagnetWhisperConfig(**TINY_WHISPER))
    with torch.no_grad():
        control.model.encoder.layers[1].fc1.weight.fill_(0.5)
    control.save_pretrained(tmp_path / "control")
    student = MagnetWhisper(
        MagnetWhisperConfig(**TINY_WHISPER, predictor_layers=[1], predictor_settings=PHONEME)
    )
    counts = initialize_from(student, str(tmp_path / "control"))
    predictor = [n for n, _ in student.named_parameters() if ".predictors." in n]
    assert counts["fresh_trained"] == len(predictor) > 0
    assert torch.equal(student.model.encoder.layers[1].fc1.weight, control.model.encoder.layers[1].fc1.weight)
    student.save_pretrained(tmp_path / "student")
    with pytest.raises(ValueError, match="tensors this model does not have: .*predictors"):
        initialize_from(control, str(tmp_path / "student"))  # no predictor to take them
