"""The corpus registry: build_corpus / resolve_data contracts and their one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from magnet_asr.data import (
    CorpusError,
    build_corpus,
    corpus_names,
    read_manifest,
    resolve_data,
    write_manifest,
)

CAN_SYNTH = Path("/usr/share/games/fortunes").is_dir() and bool(
    shutil.which("espeak-ng") or shutil.which("flite")
)


def test_names():
    assert corpus_names() == ["synth", "asterisk", "librispeech", "manifest"]


def test_unknown_corpus_and_options_are_one_line_errors():
    with pytest.raises(CorpusError, match="unknown corpus 'timit'; choose from synth, asterisk"):
        build_corpus("timit")
    with pytest.raises(
        CorpusError, match=r"corpus synth: unknown option\(s\) num_utts; accepted: num_utterances"
    ):
        build_corpus("synth", num_utts=5)
    with pytest.raises(CorpusError, match="needs a source"):
        build_corpus("manifest")


def test_unresolvable_spec():
    with pytest.raises(
        CorpusError, match=r"no/such/thing: neither a corpus \(synth, asterisk, librispeech\)"
    ):
        resolve_data("no/such/thing")


@pytest.mark.skipif(not CAN_SYNTH, reason="needs fortunes and espeak-ng or flite")
def test_resolve_name_uses_the_existing_build(magnet_home):
    built = build_corpus("synth", num_utterances=3)
    assert built == magnet_home / "data" / "synth" / "manifest.jsonl"
    assert resolve_data("synth") == built  # not rebuilt with the default size
    assert len(read_manifest(resolve_data("synth"))) == 3


def test_synth_size_spec_needs_a_number():
    with pytest.raises(CorpusError, match="synth:many: synth:N takes the number of utterances"):
        resolve_data("synth:many")


@pytest.mark.skipif(not CAN_SYNTH, reason="needs fortunes and espeak-ng or flite")
def test_synth_size_spec_builds_its_own_folder_once(magnet_home):
    manifest = resolve_data("synth:3")
    assert manifest == magnet_home / "data" / "synth-3" / "manifest.jsonl"
    assert sorted(u.split for u in read_manifest(manifest)) == ["test", "train", "validation"]
    stamp = manifest.stat().st_mtime_ns
    assert resolve_data("synth:3") == manifest and manifest.stat().st_mtime_ns == stamp
    assert not (magnet_home / "data" / "synth").exists()  # the default-size corpus is another folder


@pytest.mark.skipif(not CAN_SYNTH, reason="needs fortunes and espeak-ng or flite")
def test_force_rebuilds(tmp_path):
    first = build_corpus("synth", out_dir=tmp_path, num_utterances=3)
    stamp = first.stat().st_mtime_ns
    wav = sorted((tmp_path / "wav").iterdir())[0]
    wav_stamp = wav.stat().st_mtime_ns
    assert build_corpus("synth", out_dir=tmp_path, force=True, num_utterances=3) == first
    assert first.stat().st_mtime_ns != stamp and wav.stat().st_mtime_ns != wav_stamp


def test_force_never_deletes_foreign_audio(tmp_path, tone):
    """``force`` removes wav/ only in a folder built as that corpus (build.json says so)."""
    audio = tone(tmp_path / "wav" / "mine.wav", 0.5)
    (tmp_path / "mine.txt").write_text("my words")
    write_manifest([], tmp_path / "manifest.jsonl")
    with pytest.raises(CorpusError):
        build_corpus("asterisk", out_dir=tmp_path, force=True, sounds_dir=str(tmp_path / "absent"))
    assert audio.exists()


def test_manifest_round_trip(tmp_path, tone):
    from magnet_asr.data.manifest import Utterance

    tone(tmp_path / "wav" / "a.wav", 1.0)
    utts = [Utterance("a", "wav/a.wav", "héllo, wörld", 1.0, "test"), Utterance("b", "/abs/b.wav", "x", 2.5)]
    path = write_manifest(utts, tmp_path / "m.jsonl")
    back = read_manifest(path)
    assert back[0].audio == str(tmp_path / "wav" / "a.wav") and back[0].text == "héllo, wörld"
    assert (back[1].audio, back[1].split, back[1].duration) == ("/abs/b.wav", "train", 2.5)
    assert [u.id for u in read_manifest(path, split="test")] == ["a"]


def test_cli_data_command_builds_a_manifest_corpus(tmp_path, tone, magnet_home, capsys):
    from magnet_asr.cli import main

    tone(tmp_path / "in" / "x.wav", 1.0)
    (tmp_path / "in" / "x.txt").write_text("some words")
    assert main(["data", "manifest", str(tmp_path / "in"), "--name", "mine", "--split", "test"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(magnet_home / "data" / "mine" / "manifest.jsonl")
    assert [(u.id, u.split, u.duration) for u in read_manifest(printed)] == [("x", "test", 1.0)]
    assert main(["data", "manifest", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
