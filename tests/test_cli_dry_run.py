"""`magnet-asr train --dry-run`: the production recipe composes, builds its model and data offline, trains nothing."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from librispeech_fixtures import utterances, write_librispeech_folder
from magnet_asr.cli import main
from magnet_asr.paths import models_dir

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private MAGNET_ASR_HOME for the data, sharing the converted bundled weights."""
    from magnet_asr.weights import resolve_model

    for name in ("whisper-tiny.en", "smollm2-135m-instruct"):
        resolve_model(name)  # converted once into the real cache
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir())
    monkeypatch.setenv("MAGNET_ASR_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return home


@pytest.mark.parametrize("streaming", [False, True])
def test_dry_run_production_offline(tmp_path, home, capsys, streaming):
    root = write_librispeech_folder(tmp_path / "LibriSpeech", utterances())
    out_dir = tmp_path / "run"
    code = main(
        [
            "train",
            "--dry-run",
            "+experiments=production",
            "encoder=whisper_tiny_en",
            "llm=smollm2_135m",
            f"data.librispeech_root={root}",
            f"data.streaming={str(streaming).lower()}",
            f"training.output_dir={out_dir}",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "model speech_llm (SpeechLLM)" in printed and "dry run: nothing trained" in printed
    if streaming:
        assert re.search(
            r"data train: librispeech:train.clean.100: streaming, 4 shard\(s\), 8 utterances", printed
        )
    else:
        assert re.search(r"data train: 8 utterances, 0\.00\d h", printed)
    assert re.search(r"data validation: 2 utterances", printed)
    assert re.search(r"data test librispeech:test.clean: 2 utterances", printed)
    total, trainable = (
        int(x.replace(",", ""))
        for x in re.search(r"parameters: ([\d,]+) total, ([\d,]+) trainable", printed).groups()
    )
    assert (
        100_000_000 < total < 250_000_000 and 0 < trainable < total // 10
    )  # frozen encoder, LoRA on the LLM
    assert not out_dir.exists()  # nothing trained, nothing written
    assert os.environ["MAGNET_ASR_HOME"] == str(home)
