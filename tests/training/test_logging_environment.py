"""W&B is harmless offline: no API key means offline logging into the run, never a login prompt."""

from __future__ import annotations

import importlib.util
import os

import pytest

from magnet_asr.training.recipe import logging_environment


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_tensorboard_logs_into_the_run(clean_env, tmp_path):
    logging_environment(["tensorboard"], tmp_path)
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "logs")
    assert "WANDB_MODE" not in os.environ


def test_wandb_without_key_goes_offline_into_the_run(clean_env, tmp_path, capsys):
    pytest.importorskip("wandb")
    logging_environment(["tensorboard", "wandb"], tmp_path)
    assert os.environ["WANDB_MODE"] == "offline"
    assert os.environ["WANDB_DIR"] == str(tmp_path)
    assert "offline" in capsys.readouterr().out


def test_wandb_with_key_stays_online_and_the_key_is_not_printed(clean_env, tmp_path, capsys):
    pytest.importorskip("wandb")
    clean_env.setenv("WANDB_API_KEY", "secret-key-123")
    logging_environment(["wandb"], tmp_path)
    assert "WANDB_MODE" not in os.environ
    assert "secret-key-123" not in capsys.readouterr().out


def test_wandb_not_installed_is_a_clear_error(clean_env, tmp_path):
    real = importlib.util.find_spec
    clean_env.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ValueError, match=r"report_to names wandb.*pip install"):
        logging_environment(["wandb"], tmp_path)
