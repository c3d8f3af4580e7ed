"""What the ``eval`` and ``transcribe`` commands do, as functions tests can call."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from magnet_asr.audio import AudioError, load_audio
from magnet_asr.data.manifest import read_manifest
from magnet_asr.evaluation.decode import Recognizer, load_recognizer
from magnet_asr.evaluation.evaluate import evaluate, write_json


def run_eval(
    model: str | Recognizer,
    data: str,
    split: str | None = "test",
    batch_size: int = 8,
    limit: int | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on corpus/manifest ``data``; write JSON to ``out`` when given."""
    from magnet_asr.data.corpora import resolve_data

    manifest = resolve_data(data)
    utterances = read_manifest(manifest, split=split)
    if not utterances:
        raise ValueError(f"{manifest}: no utterances in split '{split}'")
    if limit is not None:
        utterances = utterances[:limit]
    recognizer = load_recognizer(model) if isinstance(model, str) else model
    summary = evaluate(recognizer, utterances, batch_size=batch_size, data_name=data, split=split)
    summary["manifest"] = str(manifest)
    if out:
        write_json(summary, out)
    return summary


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the console: WER, CER, loop share, RTFx, counts, and per predictor layer the boundary
    F1 against phone times (when the data has them) and the adjacent and in-silence shares."""
    line = (
        f"{summary.get('model')} on {summary.get('data')}/{summary.get('split')}: "
        f"WER {_fmt(summary.get('wer'))}  CER {_fmt(summary.get('cer'))}  "
        f"loops {_fmt(summary.get('loop_share'), '.1%')}  RTFx {_fmt(summary.get('rtfx'), '.1f')}  "
        f"utterances {summary.get('num_utterances')}  skipped {summary.get('num_skipped')}"
    )
    for layer, b in (summary.get("boundaries") or {}).items():
        line += (
            f"\n  predictor at layer {layer}: boundary F1 {_fmt(b.get('f1'))} "
            f"(P {_fmt(b.get('precision'))} R {_fmt(b.get('recall'))}, R-value {_fmt(b.get('r_value'))}, "
            f"{b.get('num_utterances', 0)} utterances with phone times)  adjacent {_fmt(b.get('adjacent_share'), '.1%')}"
            f"  in silence {_fmt(b.get('silence_share'), '.1%')}"
        )
    return line


def transcribe_files(model: str | Recognizer, files: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Yield ``{"file", "text"}`` per file, or ``{"file", "error"}`` with a one-line reason."""
    recognizer = load_recognizer(model) if isinstance(model, str) else model
    for file in files:
        try:
            audio = load_audio(file, max_seconds=recognizer.max_seconds)
        except AudioError as e:
            yield {"file": file, "error": str(e)}
            continue
        yield {"file": file, "text": recognizer.transcribe([audio])[0].text}
