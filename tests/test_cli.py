"""The `eval` and `transcribe` commands end to end, with the real bundled whisper-tiny.en."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cli_helpers import SENTENCE, run_cli, synthesize

os.environ["HF_HUB_OFFLINE"] = "1"

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """A sentence synthesized on the fly (flite, else espeak-ng) as a 16 kHz wav."""
    return synthesize(tmp_path_factory.mktemp("speech") / "speech.wav")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("bad")
    corrupt = folder / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt this is not audio" * 20)
    empty = folder / "empty.wav"
    empty.write_bytes(b"")
    return corrupt, empty


def test_transcribe_good_and_bad_files(speech, bad_files):
    from magnet_asr.text import wer

    corrupt, empty = bad_files
    proc = run_cli("transcribe", "--model", "whisper-tiny.en", str(corrupt), str(speech), str(empty))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2
    assert str(corrupt) in errors[0] and "cannot decode" in errors[0]
    assert str(empty) in errors[1]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{speech}\t")
    assert wer(SENTENCE, lines[0].split("\t", 1)[1]) < 0.25


def test_transcribe_json(speech):
    proc = run_cli("transcribe", "--model", "whisper-tiny.en", "--json", str(speech))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert rows[0]["file"] == str(speech) and "pound key" in rows[0]["text"].lower()


def test_eval_skips_and_lists_bad_files(tmp_path, speech, bad_files):
    corrupt, empty = bad_files
    manifest = tmp_path / "manifest.jsonl"
    rows = [
        {"id": "good", "audio": str(speech), "text": SENTENCE, "duration": 5.0, "split": "test"},
        {"id": "corrupt", "audio": str(corrupt), "text": "x y z", "duration": 1.0, "split": "test"},
        {"id": "empty", "audio": str(empty), "text": "x y z", "duration": 1.0, "split": "test"},
        {
            "id": "missing",
            "audio": str(tmp_path / "nope.wav"),
            "text": "x y z",
            "duration": 1.0,
            "split": "test",
        },
        {"id": "no-text", "audio": str(speech), "text": "  ", "duration": 5.0, "split": "test"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "result.json"
    proc = run_cli(
        "eval", "--model", "whisper-tiny.en", "--data", str(manifest), "--split", "test", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["num_utterances"] == 1 and result["num_skipped"] == 4
    reasons = {s["id"]: s["reason"] for s in result["skipped"]}
    assert set(reasons) == {"corrupt", "empty", "missing", "no-text"}
    assert "cannot decode" in reasons["corrupt"] and "file not found" in reasons["missing"]
    assert reasons["no-text"] == "empty transcript"
    for key in ("wer", "cer", "audio_seconds", "wall_seconds", "rtfx", "mean_compression"):
        assert result[key] is not None, key
    assert result["wer"] < 0.25 and result["mean_compression"] == 1.0
    assert result["utterances"][0]["id"] == "good" and result["utterances"][0]["hypothesis"]


def test_unknown_model_is_a_one_line_error(tmp_path):
    proc = run_cli("transcribe", "--model", str(tmp_path / "no-such-model-dir"), str(tmp_path / "x.wav"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
