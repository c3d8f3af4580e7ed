"""Paired comparison of two recognizers over training seeds: ``magnet-asr compare --a ... --b ...``.

A 48-clip test split moves about 0.01 WER between seeds of the same recipe, the size of the gaps a
recipe change makes (issue 12: learned against fixed-rate boundaries). So a comparison pools every
seed's evaluation of each system and asks how sure the difference is, with a two-level bootstrap: each
draw resamples the seeds of each system and the utterances (the same ones for both systems, so the
comparison stays paired), as for hierarchical data (Davison & Hinkley 1997, section 3.8).

Inputs are evaluation JSONs with per-utterance rows (``magnet-asr eval --out``, or a run's
``test_*.json``): ``utterances`` with ``id``, ``reference`` and ``hypothesis``. Scores use the WER of
:mod:`magnet_asr.text` (normalized text); a system's WER is its seeds' mean edit count per utterance over
the utterances every file has, divided by their reference words.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from magnet_asr.text import error_counts

__all__ = ["Comparison", "compare", "read_errors", "write_comparison"]


@dataclass
class Comparison:
    """``wer_a - wer_b`` over ``num_utterances`` shared utterances, with its bootstrap interval.

    ``interval``: the central ``confidence`` share of the bootstrap differences; ``share_a_better``: the
    share of draws where A's WER is below B's."""

    wer_a: float
    wer_b: float
    difference: float
    interval: tuple[float, float]
    confidence: float
    share_a_better: float
    num_seeds_a: int
    num_seeds_b: int
    num_utterances: int
    num_draws: int

    def summary(self) -> str:
        low, high = self.interval
        return (
            f"A {self.wer_a:.4f} ({self.num_seeds_a} seeds) - B {self.wer_b:.4f} ({self.num_seeds_b} seeds) = "
            f"{self.difference:+.4f}, {self.confidence:.0%} interval [{low:+.4f}, {high:+.4f}], "
            f"A better in {self.share_a_better:.1%} of {self.num_draws} draws, {self.num_utterances} utterances"
        )


def read_errors(path: str | Path) -> dict[str, tuple[int, int]]:
    """``{utterance id: (word errors, reference words)}`` of one evaluation JSON."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text())["utterances"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not an evaluation JSON with per-utterance rows ({error})") from None
    return {str(row["id"]): error_counts(row["reference"], row["hypothesis"]) for row in rows}


def _matrix(files: Sequence[dict[str, tuple[int, int]]], ids: list[str]) -> np.ndarray:
    return np.array([[f[i][0] for i in ids] for f in files], dtype=np.float64)


def compare(
    a: Sequence[str | Path],
    b: Sequence[str | Path],
    num_draws: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Compare system A (one evaluation JSON per seed) with system B on their shared utterances."""
    if not a or not b:
        raise ValueError("compare needs at least one evaluation file for each system")
    if num_draws < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need num_draws >= 1 and confidence in (0, 1), got {num_draws}, {confidence}")
    files_a, files_b = [read_errors(p) for p in a], [read_errors(p) for p in b]
    shared = set.intersection(*(set(f) for f in [*files_a, *files_b]))
    ids = sorted(shared)
    if not ids:
        raise ValueError("the evaluation files share no utterance id: were they made on the same split?")
    words = np.array([files_a[0][i][1] for i in ids], dtype=np.float64)
    errors_a, errors_b = _matrix(files_a, ids), _matrix(files_b, ids)

    def rate(errors: np.ndarray, utterances: np.ndarray) -> np.ndarray:
        return errors[..., utterances].mean(-2).sum(-1) / np.maximum(words[utterances].sum(-1), 1.0)

    everything = np.arange(len(ids))
    wer_a, wer_b = float(rate(errors_a, everything)), float(rate(errors_b, everything))
    rng = np.random.default_rng(seed)
    differences = np.empty(num_draws)
    for draw in range(num_draws):
        utterances = rng.integers(0, len(ids), len(ids))
        seeds_a = rng.integers(0, len(files_a), len(files_a))
        seeds_b = rng.integers(0, len(files_b), len(files_b))
        differences[draw] = rate(errors_a[seeds_a], utterances) - rate(errors_b[seeds_b], utterances)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(differences, [tail, 1.0 - tail])
    return Comparison(
        wer_a=wer_a,
        wer_b=wer_b,
        difference=wer_a - wer_b,
        interval=(float(low), float(high)),
        confidence=confidence,
        share_a_better=float((differences < 0).mean()),
        num_seeds_a=len(files_a),
        num_seeds_b=len(files_b),
        num_utterances=len(ids),
        num_draws=num_draws,
    )


def write_comparison(comparison: Comparison, path: str | Path) -> None:
    """The comparison as JSON at ``path``."""
    Path(path).write_text(json.dumps(asdict(comparison), indent=2) + "\n")
