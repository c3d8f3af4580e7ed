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
