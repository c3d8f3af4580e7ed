"""``evaluate`` summaries: loop share, per-layer boundary scores against phone times, the table and the
console line."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from magnet_asr.data.manifest import Utterance
from magnet_asr.evaluation.decode import Transcription
from magnet_asr.evaluation.evaluate import evaluate
from magnet_asr.evaluation.report import table_row
from magnet_asr.evaluation.run import summary_line

# 1 s clips (50 stem frames): pau until 0.2 s, speech phones ending at 0.4 and 0.6, trailing pau from 0.8
PHONES = ["pau", "a", "b", "c", "pau"]
ENDS = [0.2, 0.4, 0.6, 0.8, 1.0]
LOOP = " ".join(["thank you"] * 20)


class FakeRecognizer:
    """Returns fixed transcriptions by clip length order; boundaries of two predictors at layers 1 and 3."""

    name = "fake"
    max_seconds = 30.0
    predictor_layers = [1, 3]

    def __init__(self, outputs: dict[int, Transcription]) -> None:
        self.outputs = outputs  # keyed by number of samples

    def transcribe(self, waveforms):
        return [self.outputs[len(w)] for w in waveforms]


@pytest.fixture
def clips(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, seconds in enumerate((1.0, 1.02, 1.04)):  # distinct lengths identify the clips
        path = tmp_path / f"u{i}.wav"
        sf.write(path, (0.1 * rng.normal(size=int(16000 * seconds))).astype(np.float32), 16000)
        paths.append(str(path))
    return paths


def test_summary_has_loop_share_and_boundary_scores_per_layer(clips):
    # u0 (phone times): layer 1 hits all 4 reference ends and adds one in the leading silence (frame 4);
    # layer 3 keeps 0.4 only. u1 (no phone times): one adjacent pair. u2: a loop, no phone times.
    first = [4, 9, 19, 29, 39, 49]
    outputs = {
        16000: Transcription("one two", 50, 2, boundary_frames=[first, [19, 49]]),
        16320: Transcription("one two", 51, 3, boundary_frames=[[10, 11, 50], [11, 50]]),
        16640: Transcription(LOOP, 52, 1, boundary_frames=[[51], [51]]),
    }
    utts = [
        Utterance("u0", clips[0], "one two", 1.0, "test", phones=PHONES, phone_ends=ENDS),
        Utterance("u1", clips[1], "one two", 1.02, "test"),
        Utterance("u2", clips[2], "one two", 1.04, "test"),
    ]
    summary = evaluate(FakeRecognizer(outputs), utts, batch_size=2)
    assert summary["loop_share"] == 0.3333  # rounded to 4 digits
    assert [r["looping"] for r in summary["utterances"]] == [False, False, True]
    assert [r["compression"] for r in summary["utterances"]] == [25.0, 17.0, 52.0]  # as before
    layer1, layer3 = summary["boundaries"]["1"], summary["boundaries"]["3"]
    assert (layer1["precision"], layer1["recall"], layer1["f1"]) == (
        0.8,
        1.0,
        pytest.approx(0.8889, abs=1e-4),
    )
    assert layer1["num_utterances"] == 1 and layer1["num_utterances_all"] == 3
    assert layer1["silence_share"] == 0.2  # frame 4 ends at 0.1 s, deep in the leading pau
    assert layer1["adjacent_share"] == pytest.approx(1 / 7, abs=1e-4)  # 10 -> 11 among 5 + 2 + 0 predictions
    assert (layer3["precision"], layer3["recall"]) == (1.0, 0.25)
    assert summary["boundary_f1"] == layer3["f1"] and summary["silence_share"] == 0.0  # the last predictor
    row = table_row(summary)
    assert row["loop_share"] == summary["loop_share"] and row["cer"] == summary["cer"]
    assert row["boundary_f1"] == layer3["f1"]
    line = summary_line(summary)
    assert "loops 33.3%" in line and "predictor at layer 3: boundary F1 0.4000" in line


def test_uncompressed_model_has_no_boundary_section(clips):
    outputs = {16000: Transcription("one two", 50, 50, hit_token_cap=True)}
    summary = evaluate(FakeRecognizer(outputs), [Utterance("u0", clips[0], "one two", 1.0, "test")])
    assert (
        "boundaries" not in summary and summary["boundary_f1"] is None and summary["adjacent_share"] is None
    )
    assert summary["loop_share"] == 1.0  # stopped at the token cap
    assert table_row(summary)["silence_share"] is None
    assert "boundary F1" not in summary_line(summary)


class FailingRecognizer(FakeRecognizer):
    """Fails on the clip of ``failing_length`` samples with ``error`` (in a batch or alone)."""

    def __init__(self, outputs: dict[int, Transcription], failing_length: int, error: Exception) -> None:
        super().__init__(outputs)
        self.failing_length, self.error = failing_length, error

    def transcribe(self, waveforms):
        if any(len(w) == self.failing_length for w in waveforms):
            raise self.error
        return super().transcribe(waveforms)


OUTPUTS = {n: Transcription("one two", 50, 50) for n in (16000, 16320, 16640)}


def _utts(clips):
    return [Utterance(f"u{i}", path, "one two", 1.0, "test") for i, path in enumerate(clips)]


def test_a_code_bug_in_decoding_is_raised_not_scored(clips):
    recognizer = FailingRecognizer(OUTPUTS, 16320, KeyError("a bug"))
    with pytest.raises(KeyError, match="a bug"):
        evaluate(recognizer, _utts(clips), batch_size=3)


def test_bad_audio_is_skipped_and_counted(clips, tmp_path):
    from magnet_asr.audio import AudioError

    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF....WAVEjunk" * 8)
    utts = [*_utts(clips), Utterance("corrupt", str(corrupt), "one two", 1.0, "test")]
    # one clip the recognizer finds unusable while decoding: the batch is retried one by one
    recognizer = FailingRecognizer(OUTPUTS, 16320, AudioError("u1: silent", kind="silent"))
    summary = evaluate(recognizer, utts, batch_size=3, max_skip_fraction=0.5)
    assert summary["num_utterances"] == 2 and summary["num_skipped"] == 2
    kinds = {row["id"]: row["kind"] for row in summary["skipped"]}
    assert kinds == {"corrupt": "unreadable", "u1": "decoding failed"}
    assert summary["wer"] == 0.0


def test_evaluation_that_skips_too_much_fails(clips, tmp_path):
    from magnet_asr.evaluation.evaluate import TooManySkipped

    missing = [
        Utterance(f"gone{i}", str(tmp_path / f"gone{i}.wav"), "one two", 1.0, "test") for i in range(2)
    ]
    utts = [*_utts(clips), *missing]  # 2 of 5 unreadable
    with pytest.raises(TooManySkipped, match="2 of 5 utterances skipped"):
        evaluate(FakeRecognizer(OUTPUTS), utts, data_name="asterisk", max_skip_fraction=0.1)
    assert evaluate(FakeRecognizer(OUTPUTS), utts, max_skip_fraction=0.4)["num_skipped"] == 2
    assert evaluate(FakeRecognizer(OUTPUTS), utts)["num_skipped"] == 2  # None: any share (magnet-asr eval)
