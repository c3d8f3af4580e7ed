"""The datasets-based loader, on tiny local fixtures (the hub is never contacted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf

from librispeech_fixtures import utterances, write_librispeech_dataset, write_librispeech_folder
from magnet_asr.data import CorpusError, build_corpus, read_manifest
from magnet_asr.data.corpora import resolve_data
from magnet_asr.data.librispeech import (
    HUB_NAME,
    build_librispeech,
    librispeech_source,
    our_split,
    split_folder,
)

datasets = pytest.importorskip("datasets")


@pytest.fixture
def clips(tmp_path, tone) -> list[Path]:
    """Three clips in different formats and rates: 1.0 s wav at 8 kHz, 1.5 s flac at 16 kHz, 0.5 s at 22.05 kHz."""
    return [
        tone(tmp_path / "src" / "a.wav", 1.0, 8000),
        tone(tmp_path / "src" / "b.flac", 1.5, 16000),
        tone(tmp_path / "src" / "c.wav", 0.5, 22050),
    ]


def _dataset(paths: list[Path], texts: list[str], ids: list[str]):
    columns = {"audio": [str(p) for p in paths], "text": texts, "id": ids}
    return datasets.Dataset.from_dict(columns).cast_column("audio", datasets.Audio())


@pytest.fixture
def saved_dict(tmp_path, clips) -> Path:
    """A DatasetDict like LibriSpeech's (split names train.100 / validation / test), saved to disk."""
    dd = datasets.DatasetDict(
        {
            "train.100": _dataset(clips[:2], ["HELLO WORLD", "GOOD MORNING"], ["19-198-0000", "19-198-0001"]),
            "validation": _dataset(clips[2:], ["SEE YOU"], ["84-121-0000"]),
            "test": _dataset(clips[:1], ["BYE NOW"], ["19-198-0000"]),  # an id seen in train: kept apart
        }
    )
    path = tmp_path / "local_librispeech"
    dd.save_to_disk(str(path))
    for clip in clips:  # save_to_disk embeds the audio bytes; the originals must not be needed
        clip.unlink()
    return path


def test_split_names():
    assert [our_split(n) for n in ("train.clean.100", "dev", "validation", "test.other")] == [
        "train",
        "validation",
        "validation",
        "test",
    ]
    with pytest.raises(CorpusError, match="pass splits"):
        our_split("holdout")


def test_saved_dataset_dict(tmp_path, saved_dict):
    manifest = build_librispeech(tmp_path / "out", source=saved_dict)
    utts = read_manifest(manifest)
    assert [(u.split, u.text) for u in utts] == [
        ("train", "HELLO WORLD"),
        ("train", "GOOD MORNING"),
        ("validation", "SEE YOU"),
        ("test", "BYE NOW"),
    ]
    assert [u.duration for u in utts] == pytest.approx([1.0, 1.5, 0.5, 1.0], abs=1e-3)
    assert len({u.id for u in utts}) == 4 and utts[0].id == "19-198-0000"
    for u in utts:
        assert sf.info(u.audio).samplerate == 16_000


def test_limit_and_split_selection(tmp_path, saved_dict):
    utts = read_manifest(build_librispeech(tmp_path / "a", source=saved_dict, limit=1))
    assert [u.split for u in utts] == ["train", "validation", "test"]
    utts = read_manifest(build_librispeech(tmp_path / "b", source=saved_dict, split="test"))
    assert [u.text for u in utts] == ["BYE NOW"]
    utts = read_manifest(build_librispeech(tmp_path / "c", source=saved_dict, splits={"validation": "test"}))
    assert [(u.split, u.text) for u in utts] == [("test", "SEE YOU")]


def test_local_parquet_streaming(tmp_path, clips):
    path = tmp_path / "test-00000-of-00001.parquet"
    _dataset(clips, ["ONE", "TWO", "THREE"], ["a", "b", "c"]).to_parquet(str(path))
    manifest = build_corpus("librispeech", out_dir=tmp_path / "pq", source=str(path), streaming=True)
    utts = read_manifest(manifest)
    assert [(u.id, u.split, u.text) for u in utts] == [
        ("a", "test", "ONE"),
        ("b", "test", "TWO"),
        ("c", "test", "THREE"),
    ]
    assert [u.duration for u in utts] == pytest.approx([1.0, 1.5, 0.5], abs=1e-3)


def test_bad_local_source(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match="not a saved dataset"):
        build_librispeech(tmp_path / "out", source=tmp_path / "x.csv")


def test_hub_failure_is_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'openslr/librispeech_asr' on the Hub (LocalEntryNotFoundError)\nmore"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        CorpusError, match=r"^openslr/librispeech_asr: cannot load from the hub \(Couldn't reach .*\)$"
    ):
        build_librispeech(tmp_path / "out", streaming=True, limit=2)


# --- librispeech:SPLIT and librispeech:PATH specs ----------------------------------------------------


@pytest.fixture(scope="module")
def libri_utts():
    return utterances()


def test_split_names_either_way():
    assert [
        split_folder(n) for n in ("train.clean.100", "train.100", "dev-clean", "validation.other", "test")
    ] == [
        "train-clean-100",
        "train-clean-100",
        "dev-clean",
        "dev-other",
        "test-clean",
    ]
    assert split_folder("holdout") is None


def test_split_spec_without_root_names_the_hub():
    source = librispeech_source("librispeech:train.other.500")
    assert (source.kind, source.location, source.config, source.splits) == (
        "hub",
        HUB_NAME,
        "other",
        {"train.500": "train"},
    )


@pytest.mark.parametrize("fmt", ["folder", "disk", "parquet"])
def test_split_specs_read_a_local_root(tmp_path, libri_utts, fmt):
    if fmt == "folder":
        root = write_librispeech_folder(tmp_path / "LibriSpeech", libri_utts)
    else:
        root = write_librispeech_dataset(tmp_path / fmt, libri_utts, fmt)
    for spec, split, count in [
        ("train.clean.100", "train", 8),
        ("dev-clean", "validation", 2),
        ("test.clean", "test", 2),
    ]:
        utts = read_manifest(resolve_data(f"librispeech:{spec}", librispeech_root=root))
        assert {u.split for u in utts} == {split} and len(utts) == count, spec
        assert all(1.0 < u.duration < 4.0 for u in utts)
        if fmt == "folder":  # read in place: no copies
            assert all(u.audio.startswith(str(root)) and u.audio.endswith(".flac") for u in utts)
    missing = "has no test-other/ folder" if fmt == "folder" else "no split test-other / test.other in"
    with pytest.raises(CorpusError, match=missing):
        resolve_data("librispeech:test.other", librispeech_root=root)


def test_path_specs(tmp_path, libri_utts):
    root = write_librispeech_folder(tmp_path / "LibriSpeech", libri_utts)
    whole = read_manifest(resolve_data(f"librispeech:{root}"))
    assert sorted({u.split for u in whole}) == ["test", "train", "validation"] and len(whole) == 12
    dev = read_manifest(resolve_data(f"librispeech:{root / 'dev-clean'}"))
    assert [u.id for u in dev] == ["84-121-0000", "84-121-0001"] and dev[0].text == libri_utts["dev-clean"][
        0
    ][1]
    (root / "dev-clean").rename(root / "mine")
    with pytest.raises(CorpusError, match="cannot tell the split"):
        resolve_data(f"librispeech:{root / 'mine'}")
    with pytest.raises(CorpusError, match="neither a LibriSpeech split"):
        resolve_data("librispeech:train-clean-1000")
    with pytest.raises(CorpusError, match="librispeech_root: .* does not exist"):
        resolve_data("librispeech:dev-clean", librispeech_root=tmp_path / "nowhere")
