"""``build_report`` on a tiny fake run: a random MagnetWhisper checkpoint, results, TensorBoard logs, audio."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.tensorboard import SummaryWriter

from magnet_asr.evaluation import run_report
from magnet_asr.evaluation.plots import SEGMENT_GID, boundary_figure
from magnet_asr.models import MagnetWhisper, MagnetWhisperConfig

TINY = dict(
    vocab_size=64,
    num_mel_bins=8,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_source_positions=40,
    max_target_positions=24,
    decoder_start_token_id=1,
    pad_token_id=0,
    eos_token_id=2,
    bos_token_id=1,
    predictor_layers=[1],
)


def _summary(model: str, wer: float, compression: float) -> dict:
    return {
        "model": model,
        "data": "toy",
        "split": "test",
        "wer": wer,
        "cer": wer / 2,
        "rtfx": 9.0,
        "mean_compression": compression,
        "num_utterances": 2,
        "num_skipped": 0,
    }


def _write_run(path: Path, compression: float, predictors: list[int]) -> None:
    torch.manual_seed(0)
    MagnetWhisper(MagnetWhisperConfig(**{**TINY, "predictor_layers": predictors})).save_pretrained(
        path / "final"
    )
    results = {"run_name": path.name, "test": {"toy": _summary(path.name, 0.3, compression)}}
    (path / "results.json").write_text(json.dumps(results))
    writer = SummaryWriter(str(path / "logs"))
    for step in range(1, 4):
        writer.add_scalar("train/loss", 3.0 / step, step)
        writer.add_scalar("train/compression", compression, step)
        if predictors:
            writer.add_scalar("train/boundary_loss", 1.0 / step, step)
    writer.close()


def _write_corpus(root: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i, seconds in enumerate((0.5, 0.7)):  # at most 0.8 s: the tiny model has 40 learned positions
        t = np.arange(int(16000 * seconds)) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (200 + 300 * i) * t) + 0.01 * rng.normal(size=t.shape)
        sf.write(root / f"u{i}.wav", wav.astype(np.float32), 16000)
        rows.append(
            {
                "id": f"u{i}",
                "audio": f"u{i}.wav",
                "text": "one two three",
                "duration": seconds,
                "split": "test",
            }
        )
    # the shorter clip has true phone times (as flite rows do): it is picked first
    rows[0] |= {"phones": ["pau", "w", "ah", "n", "pau"], "phone_ends": [0.1, 0.2, 0.3, 0.4, 0.5]}
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    _write_run(root / "compressed", 4.0, [1])
    _write_run(root / "control", 1.0, [])
    (root / "tiny_toy.json").write_text(json.dumps(_summary("whisper-toy", 0.1, 1.0)))
    bench = root / "bench"
    bench.mkdir()
    (bench / "enc.json").write_text(
        json.dumps(
            {
                "benchmark": "toy encoder",
                "threads": 1,
                "rows": [
                    {
                        "clip_s": 5,
                        "results": {"hf": {"ms": 10.0}, "ours": {"ms": 2.5}},
                        "ratios": {"hf/ours": 4.0},
                    }
                ],
            }
        )
    )
    (bench / "flat.json").write_text(
        json.dumps({"rows": [{"name": "a|b", "rtfx": 3.0}, {"name": "c", "wer": 0.1}]})
    )
    (bench / "broken.json").write_text("[1, 2]")
    return {"root": root, "manifest": _write_corpus(root), "bench": bench}


def test_utterance_boundaries_match_the_encoder_and_the_figure(fake_runs):
    model = run_report.load_encoder_model(fake_runs["root"] / "compressed" / "final")
    b = run_report.utterance_boundaries(model, fake_runs["root"] / "u1.wav")
    assert b.frames == 35 and b.mel.shape == (8, 70)  # 0.7 s: 70 mel frames, 35 encoder frames
    assert b.frame_seconds == pytest.approx(0.02)
    assert b.ends[0][-1] == b.frames - 1  # the last real frame always ends a segment
    fig = boundary_figure(b.mel, b.ends, ["one", "two", "three"], b.duration, b.frame_seconds)
    lines = [ln for ax in fig.axes for ln in ax.lines if ln.get_gid() == SEGMENT_GID]
    assert len(lines) == b.segments == len(b.ends[0])
    assert b.compression == pytest.approx(35 / b.segments)


def test_examples_with_phone_times_come_first_and_reach_the_figure(fake_runs):
    examples = run_report.pick_examples(fake_runs["manifest"], 2)
    assert [u.id for u in examples] == ["u0", "u1"]  # u0 is shorter but has phone times
    model = run_report.load_encoder_model(fake_runs["root"] / "compressed" / "final")
    b = run_report.utterance_boundaries(model, examples[0].audio, examples[0])
    assert b.phone_ends == [0.1, 0.2, 0.3, 0.4, 0.5] and b.phones[1] == "w"
    assert run_report.utterance_boundaries(model, examples[1].audio, examples[1]).phones is None


def _image_links(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_every_image_link_points_to_a_written_figure(fake_runs, tmp_path):
    root = tmp_path / "runs"
    _write_run(root / "short", 4.0, [1])
    for events in (root / "short" / "logs").glob("events.*"):
        events.unlink()
    writer = SummaryWriter(str(root / "short" / "logs"))
    writer.add_scalar("train/loss", 1.0, 1)  # one point per series: no curve to draw
    writer.close()
    _write_run(root / "bare", 1.0, [])
    for events in (root / "bare" / "logs").glob("events.*"):
        events.unlink()  # a run without logs
    out = tmp_path / "report"
    stale = out / "figures" / "training_curves.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")  # left by an earlier build
    md = run_report.build_report(
        [root / "short", root / "bare"], out, data=fake_runs["manifest"], benchmarks_dir=None
    )
    links = _image_links(md.read_text())
    assert links and "figures/training_curves.png" not in links and not stale.exists()
    for link in links:
        assert (out / link).is_file() and (out / link).stat().st_size > 1000, link


def test_build_report_writes_markdown_and_pngs(fake_runs, tmp_path):
    root = fake_runs["root"]
    out = tmp_path / "report"
    md = run_report.build_report(
        [root / "compressed", root / "control"],
        out,
        data=fake_runs["manifest"],
        benchmarks_dir=fake_runs["bench"],
    )
    text = md.read_text()
    assert md == out / "report.md"
    images = _image_links(text)
    assert "figures/pareto.png" in images and "figures/training_curves.png" in images
    boundary_pngs = [i for i in images if i.startswith("figures/boundaries_")]
    assert sorted(boundary_pngs) == [
        "figures/boundaries_compressed_u0.png",
        "figures/boundaries_compressed_u1.png",
    ]
    for image in images:
        assert not Path(image).is_absolute() and (out / image).stat().st_size > 1000
    assert "| whisper-toy (zero-shot) | toy | test |" in text  # the reference found next to the runs
    assert "| control | toy | test |" in text
    assert "### toy encoder" in text and "- threads: 1" in text
    assert "| clip_s | results | ms |" in text  # one row per variant of the nested results
    assert "| 5 | hf | 10.0 |" in text and "| 5 | ours | 2.5000 |" in text
    assert "| clip_s | ratios.hf/ours |" in text and "| 5 | 4.0000 |" in text
    assert "a\\|b" in text and "`broken.json`: not a JSON object" in text
    assert json.loads((out / "results.json").read_text())["rows"][0]["model"] == "compressed"


def test_report_parser_registers_the_handler(fake_runs, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    run_report.add_report_parser(parser.add_subparsers(dest="command"))
    root = fake_runs["root"]
    args = parser.parse_args(
        [
            "report",
            str(root / "control"),
            "--out",
            str(tmp_path / "r"),
            "--benchmarks",
            str(tmp_path / "none"),
            "--examples",
            "0",
            "--data",
            str(fake_runs["manifest"]),
        ]
    )
    assert args.func is run_report.cmd_report
    assert args.func(args) == 0
    assert "report.md" in capsys.readouterr().out
    assert (tmp_path / "r" / "figures" / "pareto.png").is_file()
    assert not list((tmp_path / "r" / "figures").glob("boundaries_*"))  # a control has no boundaries


def test_figure_names_of_sweep_points_are_link_safe():
    name = run_report._file_name("boundaries_magnet_demo boundaries_per_unit=1.0_u(1).png")
    assert name == "boundaries_magnet_demo_boundaries_per_unit=1.0_u_1_.png"
