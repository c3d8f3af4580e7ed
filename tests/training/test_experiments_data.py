"""Every experiment composes and builds its datasets: production from local LibriSpeech look-alikes (folder,
save_to_disk, parquet; copied or streamed), the others from stand-ins for the built synth and asterisk corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from librispeech_fixtures import utterances, write_librispeech_dataset, write_librispeech_folder
from magnet_asr.schema import configs_dir, load_run_config
from magnet_asr.training.recipe import _setup_data

EXPERIMENTS = sorted(p.stem for p in (configs_dir() / "experiments").glob("*.yaml"))


@pytest.fixture(scope="module")
def libri(tmp_path_factory) -> dict[str, Path]:
    utts = utterances()
    base = tmp_path_factory.mktemp("libri")
    return {
        "folder": write_librispeech_folder(base / "LibriSpeech", utts),
        "disk": write_librispeech_dataset(base / "disk", utts, "disk"),
        "parquet": write_librispeech_dataset(base / "parquet", utts, "parquet"),
    }


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private MAGNET_ASR_HOME whose synth and asterisk corpora are finished builds of three tone clips a split."""
    import numpy as np
    import soundfile as sf

    home = tmp_path / "home"
    monkeypatch.setenv("MAGNET_ASR_HOME", str(home))
    for corpus, version in (("synth", 2), ("asterisk", 1)):
        folder = home / "data" / corpus
        (folder / "wav").mkdir(parents=True)
        rows = []
        for i, split in enumerate(["train"] * 3 + ["validation"] * 3 + ["test"] * 3):
            wav = folder / "wav" / f"{i}.wav"
            sf.write(str(wav), 0.3 * np.sin(np.arange(16000) * 0.1).astype(np.float32), 16000)
            rows.append(
                {
                    "id": f"{corpus}{i}",
                    "audio": f"wav/{i}.wav",
                    "text": "A TONE",
                    "duration": 1.0,
                    "split": split,
                }
            )
        (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        info = {"corpus": corpus, "options": {}, "manifest_version": version}
        (folder / "build.json").write_text(json.dumps(info))
    return home


def _uses_librispeech(cfg) -> bool:
    return any(
        str(s).startswith("librispeech") for s in [*cfg.data.train, *cfg.data.validation, *cfg.data.test]
    )


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_its_data(name, home, libri):
    cfg = load_run_config([f"+experiments={name}", f"data.librispeech_root={libri['folder']}"])
    data = _setup_data(cfg)
    per_corpus = 8 if _uses_librispeech(cfg) else 3
    assert len(data.train) == min(per_corpus * len(cfg.data.train), cfg.data.max_train_utterances or 10**9)
    assert data.validation and all(data.test.values()) and set(data.test) == set(cfg.data.test)
    assert all(Path(u.audio).is_file() for u in [*data.train, *data.validation])


@pytest.mark.parametrize("fmt", ["folder", "disk", "parquet"])
@pytest.mark.parametrize("streaming", [False, True])
def test_production_data_from_a_local_librispeech(home, libri, fmt, streaming):
    cfg = load_run_config(
        ["+experiments=production", f"data.librispeech_root={libri[fmt]}", f"data.streaming={streaming}"]
    )
    assert list(cfg.data.train) == ["librispeech:train.clean.100"]
    data = _setup_data(cfg)
    assert [u.split for u in data.validation] == ["validation"] * 2
    assert [len(v) for v in data.test.values()] == [2]
    if not streaming:
        assert len(data.train) == 8
        return
    assert "8 utterances listed" in data.train.describe()[0]
    data.train.shard(0, 1)
    batch = next(iter(data.train))
    assert 1 <= len(batch["items"]) <= cfg.training.per_device_batch_size
    assert batch["items"][0]["text"] in {u[1] for u in utterances()["train-clean-100"]}


def test_streaming_needs_max_steps(home, libri):
    with pytest.raises(ValueError, match="training.max_steps"):
        _setup_data(load_run_config(["data.streaming=true", "training.max_steps=-1"]))
    with pytest.raises(ValueError, match="max_train_utterances"):
        _setup_data(load_run_config(["+experiments=mac_minimal", "data.streaming=true"]))
