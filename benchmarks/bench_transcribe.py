"""Benchmark: end-to-end transcription speed (RTFx) and WER of every recognizer, on the same audio.

Systems, each decoding the same utterances greedily, one system after another in one run:

- ``hf-generate``: transformers' ``WhisperForConditionalGeneration.generate`` with the pretrained
  weights the trained models start from (30 s padded input, as transformers does).
- ``faster-whisper int8`` / ``float32``: CTranslate2 with the same weights in their original format
  (the bundled faster-whisper directory; optional ``bench`` extra: ``pip install 'magnet-asr[bench]'``).
- ``magnet control`` / ``magnet compressed`` / ``magnet fixed-rate`` / ``magnet compressed+grpo`` /
  ``magnet 5x``: our MagnetWhisper runs ``magnet_demo_control``, ``magnet_demo``, ``magnet_demo_fixed``,
  ``magnet_demo_grpo`` and ``magnet_demo_5x`` (variable-length input; the compressed ones pool at their
  predictor).
- ``speech-llm stack4`` / ``speech-llm learned`` / ``speech-llm ctc``: the SpeechLLM runs
  ``speech_llm_demo`` (stacking only), ``speech_llm_demo_compressed`` (boundary predictor) and
  ``speech_llm_demo_ctc`` (CTC compression); their goal is <= 6 audio tokens/s at no worse WER than
  stacking.

Same audio (the test splits, loaded once per worker before timing), same normalization (Whisper's
English normalizer, ``magnet_asr.text``), same threads (``torch.set_num_threads`` and CTranslate2's
``cpu_threads``), same batch size (faster-whisper's ``WhisperModel`` decodes one clip at a time, so the
default is 1 for everyone). Each system runs in a fresh subprocess, warms up on one clip, then decodes
the split: RTFx = audio seconds / seconds of feature extraction + decoding (model loading and file
reading are not timed). Trained systems whose run directory is missing are listed as skipped.

Usage: ``python benchmarks/bench_transcribe.py [--runs-dir runs] [--synth-limit 100] [--asterisk-limit N]
[--systems "hf-generate,speech-llm stack4"] [--threads 2] [--batch-size 1]``.
Writes ``benchmarks/results/bench_transcribe.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, environment, run_worker, write_json

BASE_WEIGHTS = "whisper-tiny.en"  # what magnet_demo and speech_llm_demo start from
# (system, kind, run directory under --runs-dir or None for pretrained weights)
SYSTEMS: tuple[tuple[str, str, str | None], ...] = (
    ("hf-generate", "hf", None),
    ("faster-whisper int8", "ct2-int8", None),
    ("faster-whisper float32", "ct2-float32", None),
    ("magnet control", "ours", "magnet_demo_control"),
    ("magnet compressed", "ours", "magnet_demo"),
    ("magnet fixed-rate", "ours", "magnet_demo_fixed"),
    ("magnet compressed+grpo", "ours", "magnet_demo_grpo"),
    ("magnet 5x", "ours", "magnet_demo_5x"),
    ("speech-llm stack4", "ours", "speech_llm_demo"),
    ("speech-llm learned", "ours", "speech_llm_demo_compressed"),
    ("speech-llm ctc", "ours", "speech_llm_demo_ctc"),
)
DATA = ("asterisk", "synth")  # test splits


class FasterWhisperRecognizer:
    """faster-whisper behind our ``Recognizer`` interface: greedy, no timestamps, English, one clip a time."""

    max_seconds = 30.0

    def __init__(self, model_dir: str, compute_type: str, threads: int) -> None:
        from faster_whisper import WhisperModel

        self.model = WhisperModel(model_dir, device="cpu", compute_type=compute_type, cpu_threads=threads)
        self.name = f"faster-whisper {compute_type}"

    def transcribe(self, waveforms: list) -> list:
        from magnet_asr.audio import num_encoder_frames
        from magnet_asr.evaluation.decode import Transcription

        out = []
        for w in waveforms:
            segments, _ = self.model.transcribe(
                w,
                language="en",
                beam_size=1,
                without_timestamps=True,
                condition_on_previous_text=False,
                vad_filter=False,
            )
            text = " ".join(s.text.strip() for s in segments).strip()
            out.append(Transcription(text, num_encoder_frames(len(w)), num_encoder_frames(len(w))))
        return out


def _original_weights_dir() -> str:
    """The faster-whisper directory the bundled weights ship in (model.bin, config, tokenizer)."""
    from magnet_asr.weights.bundled import get_bundled
    from magnet_asr.weights.packages import require

    model = get_bundled(BASE_WEIGHTS)
    if len(model.weights) != 1:
        raise RuntimeError(f"{BASE_WEIGHTS}: split weights need joining before faster-whisper can read them")
    return str(require(model.weights[0], BASE_WEIGHTS).parent)


def _recognizer(kind: str, path: str | None, threads: int) -> Any:
    from magnet_asr.evaluation.decode import load_recognizer

    if kind == "hf":
        return load_recognizer(BASE_WEIGHTS)
    if kind.startswith("ct2-"):
        return FasterWhisperRecognizer(_original_weights_dir(), kind.removeprefix("ct2-"), threads)
    assert path is not None
    return load_recognizer(path)


def worker(job: dict) -> list[dict]:
    """Decode every split with one system; runs in its own interpreter."""
    import torch

    from magnet_asr.audio import load_audio
    from magnet_asr.data.corpora import resolve_data
    from magnet_asr.data.manifest import read_manifest
    from magnet_asr.evaluation.evaluate import evaluate

    torch.set_num_threads(job["threads"])
    recognizer = _recognizer(job["kind"], job["path"], job["threads"])
    results = []
    for corpus, limit in job["data"]:
        utterances = read_manifest(resolve_data(corpus), split="test")[:limit]
        recognizer.transcribe([load_audio(utterances[0].audio)] * job["batch_size"])  # warm-up, not timed
        summary = evaluate(
            recognizer, utterances, batch_size=job["batch_size"], data_name=corpus, split="test"
        )
        audio_s = summary["audio_seconds"]
        results.append(
            {
                **{
                    k: summary[k]
                    for k in ("wer", "cer", "rtfx", "num_utterances", "num_skipped", "audio_seconds")
                },
                "data": corpus,
                "mean_compression": summary["mean_compression"],
                # audio frames (or tokens) after compression, per second of audio
                "frames_per_second": round(summary["compressed_frames"] / audio_s, 3) if audio_s else None,
            }
        )
    return results


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def checks(rows: list[dict]) -> list[str]:
    """The targets of the issue for each compressed MagnetWhisper: RTFx vs hf-generate and faster-whisper
    int8, WER vs the uncompressed control."""
    lines = []
    for corpus in sorted({r["data"] for r in rows}):
        by = {r["system"]: r for r in rows if r["data"] == corpus}
        control = by.get("magnet control")
        for name in (n for n in by if n.startswith("magnet compressed")):
            comp = by[name]
            for ref, goal in (("hf-generate", 2.0), ("faster-whisper int8", 1.0)):
                if ref in by:
                    ratio = _ratio(comp["rtfx"], by[ref]["rtfx"])
                    short = f"short by {goal - (ratio or 0):.2f}x"
                    verdict = "met" if ratio is not None and ratio >= goal else short
                    lines.append(f"{corpus}: {name} RTFx / {ref} RTFx = {ratio} (goal >= {goal}): {verdict}")
            if control is not None:
                gap = round(comp["wer"] - control["wer"], 4)
                verdict = "met" if gap <= 0.02 else f"short by {gap - 0.02:.4f}"
                lines.append(f"{corpus}: {name} WER - control WER = {gap} (goal <= 0.02): {verdict}")
        stacking = by.get("speech-llm stack4")
        for name in (n for n in by if n.startswith("speech-llm") and n != "speech-llm stack4"):
            row, rate = by[name], by[name]["frames_per_second"]
            if rate is None:
                continue
            verdict = "met" if rate <= 6.0 else f"short by {rate - 6.0:.2f}/s"
            lines.append(f"{corpus}: {name} audio tokens/s = {rate} (goal <= 6): {verdict}")
            if stacking is not None:
                gap = round(row["wer"] - stacking["wer"], 4)
                verdict = "met" if gap <= 0 else f"short by {gap:.4f}"
                lines.append(f"{corpus}: {name} WER - stack4 WER = {gap} (goal <= 0): {verdict}")
    return lines


def table(rows: list[dict]) -> str:
    header = "| data | system | WER | RTFx | RTFx / hf-generate | RTFx / fw int8 | compression | frames/s |"
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        by = {x["system"]: x for x in rows if x["data"] == r["data"]}
        hf, fw = by.get("hf-generate", {}).get("rtfx"), by.get("faster-whisper int8", {}).get("rtfx")
        lines.append(
            f"| {r['data']} | {r['system']} | {r['wer']:.4f} | {r['rtfx']:.2f} | {_ratio(r['rtfx'], hf)} | "
            f"{_ratio(r['rtfx'], fw)} | {r['mean_compression']} | {r['frames_per_second']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--runs-dir", default="runs", help="where the trained runs are (default: runs)")
    parser.add_argument(
        "--synth-limit", type=int, default=100, help="synthetic test utterances (default 100)"
    )
    parser.add_argument(
        "--asterisk-limit", type=int, default=None, help="asterisk test utterances (default all)"
    )
    parser.add_argument("--grpo-run", default="magnet_demo_grpo", help="run directory of the GRPO model")
    parser.add_argument(
        "--systems", default=None, help="comma-separated system names to run (default: all of them)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS_DIR / "bench_transcribe.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    script = str(Path(__file__).resolve())
    limits = {"asterisk": args.asterisk_limit, "synth": args.synth_limit}
    data = [(corpus, limits[corpus]) for corpus in DATA]
    names = [name for name, _, _ in SYSTEMS]
    chosen = [n.strip() for n in args.systems.split(",")] if args.systems else names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"--systems: unknown {unknown}; choose from {names}")
    rows, skipped = [], []
    for system, kind, run in (entry for entry in SYSTEMS if entry[0] in chosen):
        run = args.grpo_run if run == "magnet_demo_grpo" else run
        path = str(Path(args.runs_dir) / run / "final") if run else None
        if path is not None and not (Path(path) / "config.json").is_file():
            skipped.append({"system": system, "reason": f"no trained run at {path}"})
            continue
        if kind.startswith("ct2-"):
            try:
                import faster_whisper  # noqa: F401
            except ImportError:
                skipped.append({"system": system, "reason": "faster-whisper not installed (bench extra)"})
                continue
        job = {
            "kind": kind,
            "path": path,
            "threads": args.threads,
            "batch_size": args.batch_size,
            "data": data,
        }
        start = time.perf_counter()
        for result in run_worker(script, job, "time"):
            rows.append({"system": system, "path": path or BASE_WEIGHTS, **result})
        print(f"{system}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(table(rows))
    verdicts = checks(rows)
    print("\n".join(verdicts))
    for s in skipped:
        print(f"skipped {s['system']}: {s['reason']}")
    report = {
        "environment": environment(args.threads),
        "batch_size": args.batch_size,
        "base_weights": BASE_WEIGHTS,
        "rows": rows,
        "checks": verdicts,
        "skipped": skipped,
    }
    write_json(Path(args.out), report)


if __name__ == "__main__":
    main()
