"""Score a recognizer on a manifest: WER, CER, speed (RTFx), compression, loops and boundary quality, with bad
samples skipped and counted.

Summary keys beside WER / CER: ``loop_share``, the share of hypotheses that loop (each row's ``looping``:
the hypothesis's gzip compression ratio exceeds Whisper's 2.4, :func:`magnet_asr.text.compression_ratio`,
or decoding stopped at the recognizer's token cap); and for a model with boundary predictors
``boundaries``: ``{layer: {precision, recall, f1, r_value, adjacent_share, silence_share,
num_utterances, ...}}`` per predictor (keyed by its encoder layer index, as a string in JSON), micro-averaged
over utterances (:mod:`magnet_asr.evaluation.boundaries`). Precision, recall, F1, R-value and the silence
share use the utterances whose manifest row has phone times (``num_utterances``); the adjacent share uses
every utterance (``num_utterances_all``). ``boundary_f1``, ``adjacent_share`` and ``silence_share`` at the
top level repeat the last predictor's (the one whose segments the decoder sees); None without predictors.

Clips longer than the recognizer's window are decoded in windows
(:func:`~magnet_asr.evaluation.decode.transcribe_long`) and scored with the rest; ``short_form`` repeats WER
and CER over the clips that fit in one window (None when all do) and ``num_long_form`` counts the others.

Rows left out are counted by reason in ``left_out`` (``num_left_out`` in all; ``num_rows`` = scored + left
out): those the caller dropped before decoding (``left_out=``: other splits, a limit) and those skipped
here (each also in ``skipped`` with its id, one-line ``reason`` and short ``kind``: ``missing``,
``unreadable``, ``silent``..., ``empty transcript``, ``decoding failed``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from magnet_asr.audio import SAMPLE_RATE, AudioError, load_audio
from magnet_asr.data.manifest import Utterance
from magnet_asr.evaluation.boundaries import BoundaryCounts, score_utterance
from magnet_asr.evaluation.decode import Recognizer, Transcription, transcribe_long


@dataclass
class _Loaded:
    utterance: Utterance
    audio: np.ndarray


@dataclass
class EvalResult:
    model: str
    data: str
    split: str | None
    references: list[str] = field(default_factory=list)
    hypotheses: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> rows dropped before decoding
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    encoder_frames: int = 0
    compressed_frames: int = 0
    looping: int = 0
    boundaries: dict[str, BoundaryCounts] = field(default_factory=dict)  # predictor layer -> counts
    max_seconds: float | None = None  # the recognizer's window: longer clips are decoded in windows

    def short_form(self) -> dict[str, Any] | None:
        """WER and CER of the clips that fit in one window (what a 30 s model reads whole), or None when
        every clip did."""
        from magnet_asr.text import cer, wer

        short = [r for r in self.rows if self.max_seconds is None or r["duration"] <= self.max_seconds]
        if len(short) == len(self.rows):
            return None
        refs, hyps = [r["reference"] for r in short], [r["hypothesis"] for r in short]
        return {
            "max_seconds": self.max_seconds,
            "num_utterances": len(short),
            "wer": wer(refs, hyps) if short else None,
            "cer": cer(refs, hyps) if short else None,
        }

    def summary(self) -> dict[str, Any]:
        from magnet_asr.text import cer, wer

        n = len(self.references)
        scores = {layer: counts.summary() for layer, counts in self.boundaries.items()}
        last = scores[list(scores)[-1]] if scores else {}
        short = self.short_form()
        left_out = dict(self.excluded)
        for row in self.skipped:
            left_out[row["kind"]] = left_out.get(row["kind"], 0) + 1
        return {
            "model": self.model,
            "data": self.data,
            "split": self.split,
            "wer": wer(self.references, self.hypotheses) if n else None,
            "cer": cer(self.references, self.hypotheses) if n else None,
            "loop_share": round(self.looping / n, 4) if n else None,
            "boundary_f1": last.get("f1"),
            "adjacent_share": last.get("adjacent_share"),
            "silence_share": last.get("silence_share"),
            "num_utterances": n,
            "num_long_form": n - (short["num_utterances"] if short else n),
            "short_form": short,
            "num_rows": n + sum(left_out.values()),
            "num_left_out": sum(left_out.values()),
            "left_out": left_out,
            "num_skipped": len(self.skipped),
            "skipped": self.skipped,
            "audio_seconds": round(self.audio_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3),
            "rtfx": round(self.audio_seconds / self.wall_seconds, 3) if self.wall_seconds > 0 else None,
            "encoder_frames": self.encoder_frames,
            "compressed_frames": self.compressed_frames,
            "mean_compression": round(self.encoder_frames / self.compressed_frames, 4)
            if self.compressed_frames
            else None,
            **({"boundaries": scores} if scores else {}),
            "utterances": self.rows,
        }


def _load(utterances: Sequence[Utterance], result: EvalResult) -> list[_Loaded]:
    from magnet_asr.text import normalize

    loaded = []
    for utt in tqdm(utterances, desc="loading audio", unit="utt", leave=False):
        if not normalize(utt.text):
            result.skipped.append({"id": utt.id, "reason": "empty transcript", "kind": "empty transcript"})
            continue
        try:
            audio = load_audio(utt.audio)
        except AudioError as e:
            result.skipped.append({"id": utt.id, "reason": str(e), "kind": e.kind})
            continue
        loaded.append(_Loaded(utt, audio))
    return loaded


def _decode_batch(
    recognizer: Recognizer, batch: list[_Loaded], result: EvalResult
) -> list[Transcription | None]:
    """Decode a batch; if it fails on bad input, retry one by one so a single bad sample is skipped.

    Bad input is what :class:`~magnet_asr.audio.AudioError` names (unreadable, empty, silent,
    non-finite, too short or too long audio), and nothing else: any other exception is a bug in the
    model or the code, and scoring it as a skipped sample would turn it into a quiet NaN WER, so it
    propagates. Running out of memory on a batch also retries one by one (a batch too large is not a
    sample's fault; a single sample that still does not fit propagates).
    """
    try:
        return list(transcribe_long(recognizer, [item.audio for item in batch]))
    except (AudioError, torch.OutOfMemoryError):
        pass  # find the culprit below, one sample at a time
    outputs: list[Transcription | None] = []
    for item in batch:
        try:
            outputs.append(transcribe_long(recognizer, [item.audio])[0])
        except AudioError as e:
            result.skipped.append(
                {"id": item.utterance.id, "reason": f"decoding failed: {e}", "kind": "decoding failed"}
            )
            outputs.append(None)
    return outputs


class TooManySkipped(RuntimeError):
    """An evaluation left out more of its utterances than a run allows (``max_skip_fraction``)."""


def check_skipped(num_skipped: int, num_total: int, max_fraction: float | None, what: str) -> None:
    """Raise :class:`TooManySkipped` when more than ``max_fraction`` of ``num_total`` utterances were
    skipped: a WER over what is left would look like a result while most of the data went unread.
    ``None`` allows any share (``magnet-asr eval`` reports the skips and leaves the judgement to its user).
    """
    if max_fraction is None or num_total == 0 or num_skipped <= max_fraction * num_total:
        return
    raise TooManySkipped(
        f"{what}: {num_skipped} of {num_total} utterances skipped ({num_skipped / num_total:.0%}), more "
        f"than the {max_fraction:.0%} allowed (training.max_eval_skip_fraction); the summary's "
        "'skipped' list gives each reason"
    )


def evaluate(
    recognizer: Recognizer,
    utterances: Sequence[Utterance],
    batch_size: int = 8,
    data_name: str = "",
    split: str | None = None,
    left_out: Mapping[str, int] | None = None,
    max_skip_fraction: float | None = None,
) -> dict[str, Any]:
    """Decode ``utterances`` in batches of similar length and score them.

    ``left_out``: rows of the data the caller did not pass, by reason, so the summary accounts for every
    row. ``wall_seconds`` covers feature extraction and decoding (not file loading), so ``rtfx`` is
    audio seconds per second of recognizer work. ``max_skip_fraction``: the largest share of
    ``utterances`` that may be skipped (:func:`check_skipped`); None allows any.
    """
    result = EvalResult(
        model=recognizer.name,
        data=data_name,
        split=split,
        excluded={k: v for k, v in (left_out or {}).items() if v},
        max_seconds=recognizer.max_seconds,
    )
    loaded = sorted(_load(utterances, result), key=lambda x: len(x.audio))
    progress = tqdm(total=len(loaded), desc=f"decoding {recognizer.name}", unit="utt")
    for start in range(0, len(loaded), batch_size):
        batch = loaded[start : start + batch_size]
        t0 = time.perf_counter()
        outputs = _decode_batch(recognizer, batch, result)
        result.wall_seconds += time.perf_counter() - t0
        for item, out in zip(batch, outputs):
            if out is None:
                continue
            _record(result, item, out, _layer_keys(recognizer, len(out.boundary_frames or ())))
        progress.update(len(batch))
    progress.close()
    result.rows.sort(key=lambda r: r["id"])
    check_skipped(len(result.skipped), len(utterances), max_skip_fraction, data_name or "evaluation")
    return result.summary()


def _layer_keys(recognizer: Recognizer, count: int) -> list[str]:
    """Names of the ``count`` predictors: their encoder layer indices when the recognizer tells them."""
    layers = list(getattr(recognizer, "predictor_layers", None) or [])
    return [str(k) for k in layers] if len(layers) == count else [f"predictor{i}" for i in range(count)]


def _score_boundaries(result: EvalResult, keys: list[str], item: _Loaded, frames: list[list[int]]) -> None:
    """Add one utterance's boundary counts per predictor (phone-time scores only if its row has them)."""
    from magnet_asr.audio import num_encoder_frames

    utt = item.utterance
    stem_frames = num_encoder_frames(len(item.audio))  # frames are on the stem grid, whatever the strides
    for key, ends in zip(keys, frames):
        counts = score_utterance(ends, stem_frames, utt.phones, utt.phone_ends)
        result.boundaries[key] = result.boundaries.get(key, BoundaryCounts()) + counts


def _record(result: EvalResult, item: _Loaded, out: Transcription, keys: list[str]) -> None:
    from magnet_asr.text import LOOP_COMPRESSION_RATIO, compression_ratio, wer

    seconds = len(item.audio) / SAMPLE_RATE
    looping = compression_ratio(out.text) > LOOP_COMPRESSION_RATIO or out.hit_token_cap
    result.looping += looping
    if out.boundary_frames is not None:
        _score_boundaries(result, keys, item, out.boundary_frames)
    result.references.append(item.utterance.text)
    result.hypotheses.append(out.text)
    result.audio_seconds += seconds
    result.encoder_frames += out.encoder_frames
    result.compressed_frames += out.compressed_frames
    result.rows.append(
        {
            "id": item.utterance.id,
            "reference": item.utterance.text,
            "hypothesis": out.text,
            "duration": round(seconds, 3),
            "wer": wer([item.utterance.text], [out.text]),
            "compression": round(out.compression, 4),
            "looping": bool(looping),
        }
    )


def write_json(summary: dict[str, Any], path: str | Path) -> Path:
    """Write JSON atomically."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
