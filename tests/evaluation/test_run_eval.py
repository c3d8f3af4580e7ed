"""``run_eval`` on a user's own list or folder: evaluated whole unless a split is asked for, and every row
that is not scored counted with its reason (summary JSON and console line)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from magnet_asr.audio import num_encoder_frames
from magnet_asr.cli import main
from magnet_asr.data.manifest import Utterance, read_manifest, write_manifest
from magnet_asr.evaluation.decode import Transcription
from magnet_asr.evaluation.run import run_eval, summary_line

ROWS = 18
TEXT = "one two"


class EchoRecognizer:
    """Says the same words for every clip (the reference of every row)."""

    name = "echo"
    max_seconds = 30.0

    def transcribe(self, waveforms):
        return [
            Transcription(TEXT, num_encoder_frames(len(w)), num_encoder_frames(len(w))) for w in waveforms
        ]


@pytest.fixture(autouse=True)
def magnet_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache root: lists are imported under it."""
    home = tmp_path / "magnet_home"
    monkeypatch.setenv("MAGNET_ASR_HOME", str(home))
    return home


@pytest.fixture
def clips(tmp_path: Path) -> list[Path]:
    """18 real short wavs (0.3 s of noise, distinct lengths)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(ROWS):
        path = tmp_path / "audio" / f"clip{i:02d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, (0.1 * rng.normal(size=4800 + 16 * i)).astype(np.float32), 16000)
        paths.append(path)
    return paths


def write_list(kind: str, clips: list[Path], root: Path) -> Path:
    """The clips as a ``kind`` source without a split column: jsonl, tsv or a folder of wav + txt."""
    if kind == "jsonl":
        path = root / "my_list.jsonl"
        path.write_text("".join(json.dumps({"audio": f"audio/{c.name}", "text": TEXT}) + "\n" for c in clips))
        return path
    if kind == "tsv":
        path = root / "my_list.tsv"
        path.write_text("".join(f"audio/{c.name}\t{TEXT}\n" for c in clips))
        return path
    for clip in clips:
        clip.with_suffix(".txt").write_text(TEXT)
    return clips[0].parent


@pytest.mark.parametrize("kind", ["jsonl", "tsv", "folder"])
def test_list_without_splits_is_evaluated_whole(tmp_path, clips, kind):
    summary = run_eval(EchoRecognizer(), str(write_list(kind, clips, tmp_path)))
    assert summary["num_utterances"] == ROWS and summary["split"] == "all"
    assert summary["num_rows"] == ROWS and summary["num_left_out"] == 0 and summary["left_out"] == {}
    assert summary["wer"] == 0.0
    assert f"utterances {ROWS}" in summary_line(summary) and "left out" not in summary_line(summary)


def test_training_keeps_the_hash_split(tmp_path, clips):
    from magnet_asr.data.corpora import resolve_data

    rows = read_manifest(resolve_data(write_list("jsonl", clips, tmp_path)))
    assert all(u.hash_split for u in rows)
    assert {u.split for u in rows} >= {"train", "test"}  # 18 ids hash into more than one split
    again = read_manifest(resolve_data(write_list("jsonl", clips, tmp_path)))
    assert [u.split for u in rows] == [u.split for u in again]


def test_asked_split_is_scored_and_the_rest_counted(tmp_path, clips):
    listing = write_list("jsonl", clips, tmp_path)
    summary = run_eval(EchoRecognizer(), str(listing), split="train")
    from magnet_asr.data.corpora import resolve_data

    train = sum(u.split == "train" for u in read_manifest(resolve_data(listing)))
    assert 0 < train < ROWS and summary["num_utterances"] == train
    assert summary["left_out"] == {"in other splits": ROWS - train} and summary["num_rows"] == ROWS
    line = summary_line(summary)
    assert f"utterances {train} of {ROWS}, left out {ROWS - train} ({ROWS - train} in other splits)" in line


def test_limit_and_bad_rows_are_counted_with_their_reasons(tmp_path, clips):
    clips[0].write_bytes(b"RIFF not really a wav")
    clips[1].unlink()
    sf.write(clips[2], np.full(16000 * 31, 0.1, np.float32), 16000)  # over the recognizer's 30 s
    summary = run_eval(EchoRecognizer(), str(write_list("jsonl", clips, tmp_path)), limit=12)
    assert summary["num_utterances"] == 10 and summary["num_rows"] == ROWS and summary["num_left_out"] == 8
    assert summary["left_out"] == {"beyond the limit": 6, "unreadable": 1, "missing": 1}
    kinds = {s["id"]: s["kind"] for s in summary["skipped"]}
    assert kinds == {"audio.clip00": "unreadable", "audio.clip01": "missing"}
    # the 31 s clip is scored, decoded in two windows; the clips up to 30 s are also scored on their own
    long = next(r for r in summary["utterances"] if r["id"] == "audio.clip02")
    assert long["hypothesis"] == f"{TEXT} {TEXT}"
    assert summary["num_long_form"] == 1
    assert summary["short_form"] == {"max_seconds": 30.0, "num_utterances": 9, "wer": 0.0, "cer": 0.0}
    line = summary_line(summary)
    assert "utterances 10  (of them 9 up to 30 s: WER 0.0000  CER 0.0000)" in line
    assert "of 18, left out 8 (6 beyond the limit, 1 unreadable, 1 missing)" in line


def test_data_with_its_own_splits_keeps_the_test_default(tmp_path, clips):
    # a source with a split column (a tsv here), and a complete manifest: their test split, as before
    tsv = tmp_path / "split.tsv"
    splits = ["train"] * 12 + ["test"] * 6
    tsv.write_text("".join(f"audio/{c.name}\t{TEXT}\t{s}\n" for c, s in zip(clips, splits)))
    summary = run_eval(EchoRecognizer(), str(tsv))
    assert summary["split"] == "test" and summary["num_utterances"] == 6
    assert summary["left_out"] == {"in other splits": 12}
    manifest = write_manifest(
        [Utterance(c.stem, str(c), TEXT, 0.3, s) for c, s in zip(clips, splits)], tmp_path / "m.jsonl"
    )
    assert run_eval(EchoRecognizer(), str(manifest))["num_utterances"] == 6
    assert run_eval(EchoRecognizer(), str(manifest), split="all")["num_utterances"] == ROWS


def test_unknown_or_empty_split_is_a_one_line_error(tmp_path, clips):
    listing = write_list("jsonl", clips, tmp_path)
    with pytest.raises(ValueError, match="unknown split 'dev'; use one of train, validation, test, all"):
        run_eval(EchoRecognizer(), str(listing), split="dev")
    manifest = write_manifest([Utterance("a", str(clips[0]), TEXT, 0.3, "train")], tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match=r"no utterances in split 'test' \(rows per split: train 1\)"):
        run_eval(EchoRecognizer(), str(manifest))


def test_cli_eval_of_an_18_row_list(tmp_path, clips, monkeypatch, capsys):
    monkeypatch.setattr("magnet_asr.evaluation.run.load_recognizer", lambda name, **options: EchoRecognizer())
    out = tmp_path / "result.json"
    listing = write_list("tsv", clips, tmp_path)
    assert main(["eval", "--model", "echo", "--data", str(listing), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_utterances"] == ROWS and len(result["utterances"]) == ROWS
    assert f"echo on {listing}/all: WER 0.0000" in capsys.readouterr().out
    assert main(["eval", "--model", "echo", "--data", str(listing), "--split", "test", "--limit", "1"]) == 0
    assert "utterances 1 of 18, left out 17 (" in capsys.readouterr().out
