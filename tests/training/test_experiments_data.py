"""Every experiment composes and builds its datasets: production from local LibriSpeech look-alikes (folder,
save_to_disk, parquet; copied or streamed), the others from stand-ins for the built synth and asterisk corpora."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from librispeech_fixtures import utterances, write_librispeech_dataset, write_librispeech_folder
from magnet_asr.schema import configs_dir, load_run_config
from magnet_asr.training.recipe import _setup_data

EXPERIMENTS = sorted(p.stem for p in (configs_dir() / "experiments").glob("*.yaml"))
# `synth:N` corpora the configs name, each built in its own folder (data/synth-N)
SYNTH_SIZES = sorted(
    {int(n) for p in configs_dir().rglob("*.yaml") for n in re.findall(r"\bsynth:(\d+)", p.read_text())}
)


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
    """A private MAGNET_ASR_HOME whose synth (every size the configs name) and asterisk corpora are finished
    builds of three tone clips a split."""
    import numpy as np
    import soundfile as sf

    home = tmp_path / "home"
    monkeypatch.setenv("MAGNET_ASR_HOME", str(home))
    builds = [("synth", "synth", 2, {}), ("asterisk", "asterisk", 1, {})]
    builds += [("synth", f"synth-{n}", 2, {"num_utterances": n}) for n in SYNTH_SIZES]
    for corpus, folder_name, version, options in builds:
        folder = home / "data" / folder_name
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
        info = {"corpus": corpus, "options": options, "manifest_version": version}
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
    listed = sum(cfg.data.train_repeats.get(spec, 1) for spec in cfg.data.train)
    assert len(data.train) == min(per_corpus * listed, cfg.data.max_train_utterances or 10**9)
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


def test_train_repeats_list_a_corpus_that_many_times(home, caplog):
    cfg = load_run_config(["data.train=[synth,asterisk]", "++data.train_repeats={asterisk:4}"])
    ids = [u.id for u in _setup_data(cfg).train]
    assert len(ids) == 3 + 4 * 3
    assert sum(i.startswith("asterisk") for i in ids) == 12 and len(set(ids)) == 6
    # a user's own data.train beside an experiment's repeats: they do not apply, and the log says so
    cfg = load_run_config(["data.train=[synth]", "++data.train_repeats={asterisk:4}"])
    assert len(_setup_data(cfg).train) == 3
    assert "data.train_repeats: asterisk not in data.train, ignored" in caplog.text
    with pytest.raises(ValueError, match="data.train_repeats: counts must be >= 1"):
        load_run_config(["++data.train_repeats={asterisk:0}"])
    with pytest.raises(ValueError, match="data.train_repeats does not apply to a stream"):
        _setup_data(load_run_config(["data.streaming=true", "++data.train_repeats={asterisk:2}"]))
