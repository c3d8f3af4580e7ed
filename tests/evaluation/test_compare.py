"""Paired comparison of two systems over seeds (magnet_asr.evaluation.compare) and `magnet-asr compare`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import run_cli
from magnet_asr.evaluation.compare import compare, read_errors

REFERENCES = {f"u{i}": f"press {i} to hear the message again" for i in range(20)}


def _evaluation(path: Path, wrong: set[str], drop: set[str] = frozenset()) -> Path:
    """An evaluation JSON whose hypotheses miss one word on the utterances in ``wrong``."""
    rows = [
        {
            "id": key,
            "reference": text,
            "hypothesis": text.replace("message", "massage") if key in wrong else text,
        }
        for key, text in REFERENCES.items()
        if key not in drop
    ]
    path.write_text(json.dumps({"wer": None, "utterances": rows}))
    return path


def test_read_errors_counts_edits_and_reference_words(tmp_path):
    errors = read_errors(_evaluation(tmp_path / "a.json", wrong={"u3"}))
    assert errors["u3"] == (1, 7) and errors["u4"] == (0, 7)


def test_a_better_system_has_a_negative_difference_whose_interval_excludes_zero(tmp_path):
    good = [_evaluation(tmp_path / f"good{s}.json", wrong={f"u{s}"}) for s in range(3)]
    bad = [_evaluation(tmp_path / f"bad{s}.json", wrong={f"u{i}" for i in range(s, 20, 2)}) for s in range(2)]
    result = compare(good, bad, num_draws=500)
    assert result.wer_a == pytest.approx(1 / 140) and result.wer_b == pytest.approx(10 / 140)
    assert result.difference == pytest.approx(result.wer_a - result.wer_b)
    assert result.interval[1] < 0 and result.share_a_better == 1.0
    assert (result.num_seeds_a, result.num_seeds_b, result.num_utterances) == (3, 2, 20)


def test_the_same_files_on_both_sides_differ_by_nothing(tmp_path):
    files = [_evaluation(tmp_path / f"s{s}.json", wrong={f"u{s}", "u7"}) for s in range(3)]
    result = compare(files, files, num_draws=200)
    assert result.difference == 0.0
    assert result.interval[0] < 0 < result.interval[1]  # resampled seeds differ between the two sides


def test_only_the_utterances_every_file_has_are_scored(tmp_path):
    a = _evaluation(tmp_path / "a.json", wrong={"u0"}, drop={"u19"})
    b = _evaluation(tmp_path / "b.json", wrong={"u1"}, drop={"u0"})
    result = compare([a], [b], num_draws=50)
    assert result.num_utterances == 18 and result.wer_a == 0.0 and result.wer_b == pytest.approx(1 / 126)


def test_a_file_without_utterance_rows_is_a_clear_error(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"wer": 0.1}))
    with pytest.raises(ValueError, match="summary.json: not an evaluation JSON"):
        compare([summary], [_evaluation(tmp_path / "b.json", wrong=set())])


def test_compare_command_prints_the_difference_and_writes_json(tmp_path):
    a = _evaluation(tmp_path / "a.json", wrong=set())
    b = _evaluation(tmp_path / "b.json", wrong={"u2", "u5"})
    out = tmp_path / "comparison.json"
    proc = run_cli("compare", "--a", str(a), "--b", str(b), "--draws", "100", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "= -0.0143" in proc.stdout
    assert json.loads(out.read_text())["wer_b"] == pytest.approx(2 / 140)
