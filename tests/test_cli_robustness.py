"""`transcribe` on awkward input, with the real bundled whisper-tiny.en: every file gives a transcript or a
one-line error naming it, never a traceback; and a plain run prints the transcript and nothing else (no
warning, no progress bar)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cli_helpers import SENTENCE, run_cli, synthesize

os.environ["HF_HUB_OFFLINE"] = "1"

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]

MODEL = "whisper-tiny.en"


def _speech(folder: Path) -> tuple[np.ndarray, int]:
    out = synthesize(folder / "speech_source.wav")
    audio, sr = sf.read(out, dtype="float32")
    out.unlink()
    return audio, sr


def _truncated(path: Path, audio: np.ndarray, sr: int) -> None:
    sf.write(path, audio, sr, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header still announces the whole clip


def _with_nan(audio: np.ndarray) -> np.ndarray:
    out = audio.copy()
    out[len(out) // 2 : len(out) // 2 + 10] = np.nan
    return out


Writer = Callable[[Path, np.ndarray, int], None]

# name -> (file name, writer, expected: "text" (a transcript of the sentence), "any" (a transcript or an
# error), or the words the one-line error must contain)
CASES: dict[str, tuple[str, Writer, str]] = {
    "stereo_44k": (
        "stereo_44k.wav",
        lambda p, a, sr: sf.write(p, np.stack([a, 0.5 * a], 1), sr),  # sr is replaced by 44.1 kHz below
        "text",
    ),
    "pcm_u8": ("pcm_u8.wav", lambda p, a, sr: sf.write(p, a, sr, subtype="PCM_U8"), "text"),
    "nan": ("nan.wav", lambda p, a, sr: sf.write(p, _with_nan(a), sr, subtype="FLOAT"), "NaN"),
    "5ms": ("5ms.wav", lambda p, a, sr: sf.write(p, a[sr : sr + sr // 200], sr), "shorter than one"),
    "flac": ("speech.flac", lambda p, a, sr: sf.write(p, a, sr), "text"),
    "ogg": ("speech.ogg", lambda p, a, sr: sf.write(p, a, sr), "text"),
    "text_as_wav": (
        "notes.wav",
        lambda p, a, sr: p.write_text("meeting notes, not audio\n"),
        "cannot decode",
    ),
    "truncated": ("truncated.wav", _truncated, "any"),
    "directory": ("folder.wav", lambda p, a, sr: p.mkdir(), "is a directory"),
    "non_ascii_name": ("réunion été 会议.wav", lambda p, a, sr: sf.write(p, a, sr), "text"),
    "clipped": ("clipped.wav", lambda p, a, sr: sf.write(p, np.clip(8 * a, -1, 1), sr), "text"),
    "missing": ("missing.wav", lambda p, a, sr: None, "file not found"),
}


@pytest.fixture(scope="module")
def model() -> str:
    """Convert the bundled weights first: the conversion's own progress bars are not transcribe's."""
    from magnet_asr.weights import ensure_bundled

    ensure_bundled(MODEL)
    return MODEL


@pytest.fixture(scope="module")
def outcome(tmp_path_factory, model) -> tuple[dict[str, Path], subprocess.CompletedProcess]:
    """Every case written into one folder, transcribed by one `transcribe` run (one model load)."""
    import soxr

    folder = tmp_path_factory.mktemp("awkward")
    audio, sr = _speech(folder)
    files = {}
    for name, (file_name, write, _) in CASES.items():
        path = folder / file_name
        if name == "stereo_44k":
            write(path, soxr.resample(audio, sr, 44_100).astype(np.float32), 44_100)
        else:
            write(path, audio, sr)
        files[name] = path
    return files, run_cli("transcribe", "--model", model, *map(str, files.values()))


def test_no_traceback_and_only_one_line_errors(outcome):
    files, proc = outcome
    assert "Traceback" not in proc.stderr and proc.returncode == 1, proc.stderr
    errors = proc.stderr.splitlines()
    # nothing but the errors: no warning or progress bar in between
    assert all(line.startswith("error: ") for line in errors), proc.stderr
    named = [line for line in errors if any(f"error: {path}: " in line for path in files.values())]
    assert named == errors


@pytest.mark.parametrize("case", list(CASES))
def test_each_file_gives_a_transcript_or_a_one_line_error_naming_it(outcome, case):
    from magnet_asr.text import wer

    files, proc = outcome
    path = str(files[case])
    texts = {
        line.split("\t", 1)[0]: line.split("\t", 1)[1] for line in proc.stdout.splitlines() if "\t" in line
    }
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"error: {path}: ")]
    expected = CASES[case][2]
    assert (path in texts) + len(errors) == 1, (proc.stdout, proc.stderr)
    if expected == "text":
        assert path in texts and wer(SENTENCE, texts[path]) < 0.5, texts.get(path)
    elif expected != "any":
        assert errors and expected in errors[0], errors


def test_transcribe_prints_only_the_transcript(outcome):
    files, _ = outcome
    proc = run_cli("transcribe", "--model", MODEL, str(files["flac"]))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith(f"{files['flac']}\t")
