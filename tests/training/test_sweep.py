"""`magnet-asr sweep`: one run per value, a WER-vs-compression table, reuse of finished points."""

from __future__ import annotations

import json

import pytest

from magnet_asr.training.sweep import parse_sweep, run_sweep


def test_parse_sweep() -> None:
    assert parse_sweep("compressor.compression=3, 5") == ("compressor.compression", ["3", "5"])
    for bad in ("compressor.compression", "=3,5", "compressor.compression=", "a=1,1"):
        with pytest.raises(ValueError, match="--param"):
            parse_sweep(bad)


@pytest.mark.real_weights
@pytest.mark.slow
def test_sweep_trains_each_point_and_tabulates(tmp_path, tiny_whisper_dir, speech_manifest, train_args):
    overrides = train_args(
        tiny_whisper_dir,
        speech_manifest,
        tmp_path / "unused",
        **{"compressor": "phoneme", "compressor.target": "fixed", "training.max_steps": 2},
    )
    out = tmp_path / "sweep"
    rows = run_sweep(overrides, "compressor.compression=2,6", out)
    assert [r["point"] for r in rows] == ["compressor.compression=2", "compressor.compression=6"]
    for value in ("2", "6"):
        results = json.loads((out / f"compressor.compression={value}" / "results.json").read_text())
        assert results["run_name"] == f"tiny compression={value}"
    assert all(r["mean_compression"] > 1.0 and r["wer"] >= 0.0 for r in rows)
    table = json.loads((out / "sweep.json").read_text())
    assert table["param"] == "compressor.compression" and len(table["rows"]) == 2
    assert "| compressor.compression=2 |" in (out / "sweep.md").read_text()

    def must_not_train(cfg):
        raise AssertionError("a finished point was trained again")

    assert run_sweep(overrides, "compressor.compression=2,6", out, train_fn=must_not_train) == rows

    from magnet_asr.evaluation.run_report import expand_run_dirs

    assert expand_run_dirs([out]) == sorted(p.parent for p in out.glob("*/results.json"))
