"""What the ``eval`` and ``transcribe`` commands do, as functions tests can call."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from magnet_asr.audio import AudioError, load_audio
from magnet_asr.data.common import split_counts
from magnet_asr.data.manifest import SPLITS, Utterance, has_own_splits, read_manifest
from magnet_asr.evaluation.decode import Recognizer, load_recognizer, transcribe_long
from magnet_asr.evaluation.evaluate import evaluate, write_json
from magnet_asr.models.whisper_generation import GREEDY, DecodingOptions

ALL_ROWS = "all"  # ``--split all``: every row, whatever its split


def select_rows(
    utterances: list[Utterance], split: str | None, limit: int | None
) -> tuple[list[Utterance], str, dict[str, int]]:
    """The rows to score, the split they stand for, and the rows left out by reason.

    ``split=None``: the ``test`` split, or every row when none of the rows has a split of its own (a user's
    list or folder without a split column, whose splits were only hashed on import for training).
    """
    if split is None:
        split = "test" if has_own_splits(utterances) else ALL_ROWS
    if split != ALL_ROWS and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join((*SPLITS, ALL_ROWS))}")
    chosen = utterances if split == ALL_ROWS else [u for u in utterances if u.split == split]
    left_out = {"in other splits": len(utterances) - len(chosen)}
    if limit is not None:
        left_out["beyond the limit"] = max(len(chosen) - limit, 0)
        chosen = chosen[:limit]
    return chosen, split, {k: v for k, v in left_out.items() if v}


def run_eval(
    model: str | Recognizer,
    data: str,
    split: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    out: str | Path | None = None,
    decoding: DecodingOptions = GREEDY,
    speech_llm_decoding: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on corpus/manifest ``data``; write JSON to ``out`` when given.

    ``decoding``: greedy by default, as every figure in the project's tables was measured;
    ``DecodingOptions()`` adds openai-whisper's guards (Whisper and MagnetWhisper models).
    ``speech_llm_decoding``: a SpeechLLM's settings over its config's (:func:`load_recognizer`).

    ``split``: ``train``, ``validation``, ``test`` or ``all``; None picks as :func:`select_rows` does.
    ``limit``: score only the first N rows of the split. Rows left out are counted in the summary.
    """
    from magnet_asr.data.corpora import resolve_data

    manifest = resolve_data(data)
    rows = read_manifest(manifest)
    utterances, split, left_out = select_rows(rows, split, limit)
    if not utterances:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(split_counts(u.split for u in rows).items()))
        raise ValueError(f"{manifest}: no utterances in split '{split}' (rows per split: {counts or 'none'})")
    recognizer = (
        load_recognizer(model, decoding=decoding, speech_llm_decoding=speech_llm_decoding)
        if isinstance(model, str)
        else model
    )
    summary = evaluate(
        recognizer, utterances, batch_size=batch_size, data_name=data, split=split, left_out=left_out
    )
    summary["manifest"] = str(manifest)
    summary["limit"] = limit
    summary["decoding"] = asdict(getattr(recognizer, "decoding", decoding))
    if out:
        write_json(summary, out)
    return summary


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the console: WER, CER, loop share, RTFx, the rows scored and those left out (how many, and
    why), and per predictor layer the boundary F1 against phone times (when the data has them) and the
    adjacent and in-silence shares."""
    line = (
        f"{summary.get('model')} on {summary.get('data')}/{summary.get('split')}: "
        f"WER {_fmt(summary.get('wer'))}  CER {_fmt(summary.get('cer'))}  "
        f"loops {_fmt(summary.get('loop_share'), '.1%')}  RTFx {_fmt(summary.get('rtfx'), '.1f')}  "
        f"utterances {summary.get('num_utterances')}"
    )
    short = summary.get("short_form")
    if short:
        line += (
            f"  (of them {short['num_utterances']} up to {short['max_seconds']:g} s: WER {_fmt(short['wer'])}"
            f"  CER {_fmt(short['cer'])})"
        )
    left_out = summary.get("left_out") or {}
    if left_out:
        reasons = ", ".join(f"{count} {reason}" for reason, count in left_out.items())
        line += f" of {summary.get('num_rows')}, left out {summary.get('num_left_out')} ({reasons})"
    for layer, b in (summary.get("boundaries") or {}).items():
        line += (
            f"\n  predictor at layer {layer}: boundary F1 {_fmt(b.get('f1'))} "
            f"(P {_fmt(b.get('precision'))} R {_fmt(b.get('recall'))}, R-value {_fmt(b.get('r_value'))}, "
            f"{b.get('num_utterances', 0)} utterances with phone times)  adjacent {_fmt(b.get('adjacent_share'), '.1%')}"
            f"  in silence {_fmt(b.get('silence_share'), '.1%')}"
        )
    return line


def transcribe_files(
    model: str | Recognizer,
    files: Sequence[str],
    decoding: DecodingOptions | None = None,
    speech_llm_decoding: dict[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield ``{"file", "text"}`` per file, or ``{"file", "error"}`` with a one-line reason.

    Clips of any length (longer ones in windows, :func:`~magnet_asr.evaluation.decode.transcribe_long`);
    silence is not an error: with the guards (``decoding``, on by default) it reads as an empty transcript.
    """
    recognizer = (
        load_recognizer(
            model, decoding=decoding or DecodingOptions(), speech_llm_decoding=speech_llm_decoding
        )
        if isinstance(model, str)
        else model
    )
    for file in files:
        try:
            audio = load_audio(file, allow_silent=True)
        except AudioError as e:
            yield {"file": file, "error": str(e)}
            continue
        yield {"file": file, "text": transcribe_long(recognizer, [audio])[0].text}
