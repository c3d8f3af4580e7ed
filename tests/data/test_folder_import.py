"""Importing a user's folder, tsv or jsonl list, and the registry's resolve_data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from magnet_asr.data import CorpusError, build_corpus, read_manifest, resolve_data, write_manifest
from magnet_asr.data.folder import import_source, read_entries, scan_folder
from magnet_asr.data.manifest import Utterance


@pytest.fixture
def folder(tmp_path, tone) -> Path:
    root = tmp_path / "my_audio"
    tone(root / "a" / "one.wav", 1.0, 16000)
    (root / "a" / "one.txt").write_text("Hello  there\n")
    tone(root / "two.flac", 0.75, 44100)
    (root / "two.txt").write_text("general kenobi")
    tone(root / "no_transcript.wav", 0.5)
    # LibriSpeech layout: a *.trans.txt names the files of its folder.
    tone(root / "19" / "198" / "19-198-0000.flac", 2.0, 16000)
    (root / "19" / "198" / "19-198.trans.txt").write_text("19-198-0000 NORTHANGER ABBEY\n")
    return root


def test_scan_folder(folder):
    entries = {e.id: e for e in scan_folder(folder)}
    assert sorted(entries) == ["19.198.19-198-0000", "a.one", "two"]
    assert entries["a.one"].text == "Hello there"
    assert entries["19.198.19-198-0000"].text == "NORTHANGER ABBEY"


def test_folder_import_durations_and_splits(tmp_path, folder):
    utts = read_manifest(import_source(folder, tmp_path / "m.jsonl"))
    assert {u.id: u.duration for u in utts} == pytest.approx(
        {"19.198.19-198-0000": 2.0, "a.one": 1.0, "two": 0.75}
    )
    assert all(Path(u.audio).is_absolute() and u.split in ("train", "validation", "test") for u in utts)
    again = read_manifest(import_source(folder, tmp_path / "m2.jsonl"))
    assert [u.split for u in utts] == [u.split for u in again]  # hash split: deterministic
    forced = read_manifest(import_source(folder, tmp_path / "m3.jsonl", split="test"))
    assert {u.split for u in forced} == {"test"}
    with pytest.raises(CorpusError, match="split 'dev'"):
        import_source(folder, tmp_path / "m4.jsonl", split="dev")


def test_tsv_list(tmp_path, tone):
    tone(tmp_path / "clips" / "x.wav", 1.25)
    tone(tmp_path / "clips" / "y.wav", 0.5, 8000)
    tsv = tmp_path / "list.tsv"
    tsv.write_text(
        "path\ttext\n# a comment\nclips/x.wav\tfirst clip\ttrain\nclips/y.wav\tsecond clip\ttest\n"
    )
    utts = read_manifest(resolve_data(tsv))
    assert [(u.id, u.text, u.split, u.duration) for u in utts] == [
        ("clips.x", "first clip", "train", 1.25),
        ("clips.y", "second clip", "test", 0.5),
    ]
    tsv.write_text("clips/x.wav first clip without a tab\n")
    with pytest.raises(CorpusError, match=r"list.tsv:1: expected path<TAB>text"):
        read_entries(tsv)


def test_jsonl_list_and_unreadable_files(tmp_path, tone):
    tone(tmp_path / "ok.wav", 1.0)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF not really a wav")
    rows = [{"audio": "ok.wav", "text": "fine"}, {"path": "corrupt.wav", "text": "broken", "split": "test"}]
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = resolve_data(listing)  # incomplete manifest (no durations): imported into the cache
    assert manifest != listing and "imports" in str(manifest)
    utts = {u.id: u for u in read_manifest(manifest)}
    assert utts["ok"].duration == 1.0
    assert utts["corrupt"].duration == 0.0 and utts["corrupt"].split == "test"  # kept for eval to report


def test_complete_manifest_and_built_folder_resolve_to_themselves(tmp_path, tone):
    tone(tmp_path / "wav" / "a.wav", 1.0)
    manifest = write_manifest([Utterance("a", "wav/a.wav", "text", 1.0, "test")], tmp_path / "manifest.jsonl")
    assert resolve_data(manifest) == manifest
    assert resolve_data(tmp_path) == manifest
    assert read_manifest(manifest)[0].audio == str(tmp_path / "wav" / "a.wav")  # relative to the manifest


def test_manifest_corpus_by_name(folder, magnet_home):
    path = build_corpus("manifest", source=str(folder), name="mine", split="validation")
    assert path == magnet_home / "data" / "mine" / "manifest.jsonl"
    assert {u.split for u in read_manifest(path)} == {"validation"}
    stamp = path.stat().st_mtime_ns
    assert build_corpus("manifest", source=str(folder), name="mine", split="validation") == path
    assert path.stat().st_mtime_ns == stamp
    assert len(read_manifest(build_corpus("manifest", source=str(folder), name="mine", limit=1))) == 1


def test_only_rows_without_a_split_are_marked_hash_split(tmp_path, tone):
    tone(tmp_path / "x.wav", 0.5)
    tone(tmp_path / "y.wav", 0.5)
    tsv = tmp_path / "list.tsv"
    tsv.write_text("x.wav\tfirst\ttest\ny.wav\tsecond\n")
    utts = {u.id: u for u in read_manifest(import_source(tsv, tmp_path / "m.jsonl"))}
    assert not utts["x"].hash_split and utts["y"].hash_split
    forced = read_manifest(import_source(tsv, tmp_path / "m2.jsonl", split="validation"))
    assert not any(u.hash_split for u in forced)
