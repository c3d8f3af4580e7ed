"""Boundary quality: predicted segment ends scored against true phone ends (phone-segmentation metrics).

Times are seconds. Inputs per utterance:

- predicted segment ends as encoder-stem frame indices ``t`` (50 frames/s, 0-based). A boundary at frame
  ``t`` marks the **last** frame of a segment, so the segment ends at ``(t + 1) / 50`` s. The last real
  frame (``num_frames - 1``) is a boundary by construction (the predictor forces it) and is **not
  scored**: the predicted boundaries are the ends at frames ``t < num_frames - 1``.
- true phones and their end times (the manifest's ``phones`` / ``phone_ends``, from flite). The
  reference boundaries are the ends of every phone **except the last** (the end of the file), and except
  the end of a ``pau`` followed by another ``pau`` (a run of silence is one segment: no boundary inside
  it). So the end of the leading silence (speech onset) and the start of the trailing one (the last
  speech phone's end) are reference boundaries.

Matching (:func:`match_boundaries`): one-to-one, a prediction ``p`` may match a reference ``r`` when
``|p - r| <= tolerance`` (20 ms = one frame by default; inclusive, with 1e-9 s of slack for float
rounding). The number of matches (hits) is the **maximum** over all one-to-one matchings. Both lists are
sorted, so a linear two-pointer sweep finds it: take the earliest unmatched prediction and reference; if
the prediction lies more than ``tolerance`` before the reference it can match nothing later (drop it);
if the reference lies more than ``tolerance`` before the prediction, drop the reference; otherwise match
the two. (Exchange argument: any maximum matching can be rewritten to contain that earliest pair.)

Scores, aggregated over utterances by summing hits, predictions and references (micro average):
precision = hits / predictions, recall (hit rate HR) = hits / references, F1 their harmonic mean, and
the R-value of Räsänen et al. (2009): over-segmentation ``OS = predictions / references - 1`` (which is
``recall / precision - 1`` whenever there is a hit, and stays defined without one),
``r1 = sqrt((1 - HR)^2 + OS^2)``, ``r2 = (-OS + HR - 1) / sqrt(2)``, ``R = 1 - (|r1| + |r2|) / 2``.
A score whose denominator is zero is ``None`` (precision without predictions, recall and R-value without
references), except F1, which is 0 whenever there are references but no hit.

Two ways segments get wasted (docs/architecture.md, "Boundaries, measured"):

- **adjacent**: a scored predicted boundary whose next segment end (the forced final one included) is the
  very next frame, i.e. it is followed by a one-frame (20 ms) segment. Needs no phone times.
- **in silence**: a scored predicted boundary at time ``p`` with ``p < onset - tolerance`` or
  ``p > offset + tolerance``, where ``onset`` is the end of the leading run of ``pau`` phones and
  ``offset`` the start of the trailing run (the end of the last non-``pau`` phone). Such a boundary can
  never be a hit (no reference boundary lies that deep in the leading or trailing silence); one within the
  tolerance of onset or offset is not counted. Pauses inside the utterance are not counted. An utterance
  without a leading (trailing) ``pau`` has no leading (trailing) silence; one made only of ``pau`` is
  silence throughout.

Shares are micro averages too: adjacent / scored predictions over all utterances, in-silence / scored
predictions over the utterances with phone times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from magnet_asr.audio import ENCODER_FRAMES_PER_SECOND
from magnet_asr.compression.targets import SILENCE, reference_boundaries

TOLERANCE = 0.02  # seconds: one encoder frame at 50 frames/s, as in the phone-segmentation literature
FRAME_SECONDS = 1.0 / ENCODER_FRAMES_PER_SECOND
_SLACK = 1e-9  # float rounding: (t + 1) / 50 against times printed with 3 decimals


def predicted_boundaries(
    frames: Sequence[int], num_frames: int, frame_seconds: float = FRAME_SECONDS
) -> list[float]:
    """End times (s) of the predicted segments ending at ``frames`` (sorted frame indices), without the
    forced final boundary: frames ``t >= num_frames - 1`` are dropped; ``t`` ends at ``(t+1)*frame_seconds``."""
    return [(t + 1) * frame_seconds for t in frames if t < num_frames - 1]


def match_boundaries(
    predicted: Sequence[float], reference: Sequence[float], tolerance: float = TOLERANCE
) -> list[tuple[int, int]]:
    """A maximum one-to-one matching of sorted ``predicted`` and ``reference`` times within ``tolerance``.

    Returns ``(prediction index, reference index)`` pairs in time order (rule: module docstring). O(P + R).
    """
    pairs: list[tuple[int, int]] = []
    i = j = 0
    limit = tolerance + _SLACK
    while i < len(predicted) and j < len(reference):
        if predicted[i] < reference[j] - limit:
            i += 1  # too early for this reference, hence for every later one
        elif reference[j] < predicted[i] - limit:
            j += 1  # no prediction left can reach this reference
        else:
            pairs.append((i, j))
            i += 1
            j += 1
    return pairs


def silence_span(phones: Sequence[str], phone_ends: Sequence[float]) -> tuple[float | None, float | None]:
    """``(onset, offset)``: end of the leading ``pau`` run and start of the trailing one, in seconds.

    ``None`` where the utterance does not start (end) with ``pau``. All ``pau``: ``(inf, -inf)``, so
    every time counts as silence.
    """
    n = len(phones)
    lead = 0
    while lead < n and phones[lead] == SILENCE:
        lead += 1
    if lead == n:
        return (math.inf, -math.inf) if n else (None, None)
    trail = n
    while trail > 0 and phones[trail - 1] == SILENCE:
        trail -= 1
    onset = float(phone_ends[lead - 1]) if lead else None
    offset = float(phone_ends[trail - 1]) if trail < n else None
    return onset, offset


def adjacent_count(frames: Sequence[int], num_frames: int) -> int:
    """Scored predicted boundaries (``t < num_frames - 1``) whose next segment end in ``frames`` (sorted,
    the forced final boundary included if present) is frame ``t + 1``."""
    return sum(1 for a, b in zip(frames, frames[1:]) if a < num_frames - 1 and b == a + 1)


def silence_count(
    predicted: Sequence[float],
    phones: Sequence[str],
    phone_ends: Sequence[float],
    tolerance: float = TOLERANCE,
) -> int:
    """Predicted boundary times deeper than ``tolerance`` inside the leading or trailing silence."""
    onset, offset = silence_span(phones, phone_ends)
    limit = tolerance + _SLACK
    return sum(
        1
        for p in predicted
        if (onset is not None and p < onset - limit) or (offset is not None and p > offset + limit)
    )


@dataclass
class BoundaryCounts:
    """Summed counts of one predictor over utterances; add them up with ``+``, read the scores.

    ``hits`` / ``predicted`` / ``reference`` / ``in_silence`` / ``utterances``: over utterances with phone
    times. ``all_predicted`` / ``adjacent`` / ``all_utterances``: over every utterance.
    """

    hits: int = 0
    predicted: int = 0
    reference: int = 0
    in_silence: int = 0
    utterances: int = 0
    all_predicted: int = 0
    adjacent: int = 0
    all_utterances: int = 0

    def __add__(self, other: BoundaryCounts) -> BoundaryCounts:
        return BoundaryCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def precision(self) -> float | None:
        return self.hits / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.hits / self.reference if self.reference else None

    @property
    def f1(self) -> float | None:
        if not self.reference:
            return None
        if not self.hits:  # also without predictions: a predictor that collapsed scores 0, not "undefined"
            return 0.0
        return 2 * self.hits / (self.predicted + self.reference)  # = 2PR / (P + R)

    @property
    def r_value(self) -> float | None:
        if not self.reference:
            return None
        hit_rate = self.hits / self.reference
        over = self.predicted / self.reference - 1
        r1 = math.sqrt((1 - hit_rate) ** 2 + over**2)
        r2 = (-over + hit_rate - 1) / math.sqrt(2)
        return 1 - (abs(r1) + abs(r2)) / 2

    @property
    def adjacent_share(self) -> float | None:
        return self.adjacent / self.all_predicted if self.all_predicted else None

    @property
    def silence_share(self) -> float | None:
        return self.in_silence / self.predicted if self.predicted else None

    def summary(self, digits: int = 4) -> dict[str, Any]:
        """Scores and the counts behind them, as a JSON-ready dict (``num_utterances``: with phone times)."""

        def r(x: float | None) -> float | None:
            return None if x is None else round(x, digits)

        return {
            "precision": r(self.precision),
            "recall": r(self.recall),
            "f1": r(self.f1),
            "r_value": r(self.r_value),
            "adjacent_share": r(self.adjacent_share),
            "silence_share": r(self.silence_share),
            "num_utterances": self.utterances,
            "num_utterances_all": self.all_utterances,
            "hits": self.hits,
            "num_predicted": self.predicted,
            "num_reference": self.reference,
        }


def score_utterance(
    frames: Sequence[int],
    num_frames: int,
    phones: Sequence[str] | None = None,
    phone_ends: Sequence[float] | None = None,
    tolerance: float = TOLERANCE,
    frame_seconds: float = FRAME_SECONDS,
) -> BoundaryCounts:
    """Counts of one utterance: ``frames`` (sorted segment-end frame indices at ``frame_seconds``, the
    forced final one included or not), ``num_frames`` real frames, and the true phones if known."""
    frames = sorted(int(t) for t in frames)
    predicted = predicted_boundaries(frames, num_frames, frame_seconds)
    counts = BoundaryCounts(
        all_predicted=len(predicted), adjacent=adjacent_count(frames, num_frames), all_utterances=1
    )
    if phones is None or phone_ends is None:
        return counts
    reference = reference_boundaries(phones, phone_ends)
    counts.hits = len(match_boundaries(predicted, reference, tolerance))
    counts.predicted, counts.reference, counts.utterances = len(predicted), len(reference), 1
    counts.in_silence = silence_count(predicted, phones, phone_ends, tolerance)
    return counts
