"""Boundary scores on hand-made cases: the matching rule, micro averages, adjacent and silence shares."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from magnet_asr.evaluation import boundaries as bd

# 1 s utterance: pau until 0.2, then a b c, trailing pau from 0.8 (50 frames)
PHONES = ["pau", "a", "b", "c", "pau"]
ENDS = [0.2, 0.4, 0.6, 0.8, 1.0]
REFERENCE = [0.2, 0.4, 0.6, 0.8]  # every phone end but the last


def frames_at(times, shift=0):
    """Frames whose segments end at ``times`` (s), shifted by ``shift`` frames, plus the forced final one."""
    return [round(t * 50) - 1 + shift for t in times] + [49]


def score(frames, phones=PHONES, ends=ENDS):
    return bd.score_utterance(frames, 50, phones, ends)


def test_reference_rule_drops_the_file_end_and_pau_pau_boundaries():
    assert bd.reference_boundaries(PHONES, ENDS) == REFERENCE
    assert bd.reference_boundaries(["pau", "pau", "a", "pau", "pau"], [0.1, 0.2, 0.5, 0.7, 0.9]) == [0.2, 0.5]
    with pytest.raises(ValueError, match="differ in length"):
        bd.reference_boundaries(["a"], [0.1, 0.2])


def test_predictions_leave_out_the_forced_final_boundary():
    assert bd.predicted_boundaries([9, 19, 49], 50) == pytest.approx([0.2, 0.4])


def test_exact_match_scores_one():
    c = score(frames_at(REFERENCE))
    assert (c.hits, c.predicted, c.reference) == (4, 4, 4)
    assert c.precision == c.recall == c.f1 == 1.0 and c.r_value == pytest.approx(1.0)


@pytest.mark.parametrize("shift", [-1, 1])
def test_one_frame_off_still_hits(shift):
    c = score(frames_at(REFERENCE, shift))
    assert c.f1 == 1.0


@pytest.mark.parametrize("shift", [-2, 2])
def test_two_frames_off_misses(shift):
    c = score(frames_at(REFERENCE, shift))
    assert c.hits == 0 and c.precision == c.recall == c.f1 == 0.0
    assert c.r_value == pytest.approx(1 - (math.sqrt(1) + abs(-1 / math.sqrt(2))) / 2)  # HR 0, OS 0


def test_extra_boundaries_lower_precision_not_recall():
    c = score(sorted(frames_at(REFERENCE) + [14, 24, 34, 44]))
    assert (c.hits, c.predicted) == (4, 8) and c.recall == 1.0 and c.precision == 0.5
    assert c.f1 == pytest.approx(2 / 3)
    hr, os_ = 1.0, 1.0  # OS = recall / precision - 1
    r1, r2 = math.sqrt((1 - hr) ** 2 + os_**2), (-os_ + hr - 1) / math.sqrt(2)
    assert c.r_value == pytest.approx(1 - (abs(r1) + abs(r2)) / 2)


def test_missing_boundaries_lower_recall_not_precision():
    c = score(frames_at([0.2, 0.6]))
    assert c.precision == 1.0 and c.recall == 0.5


def test_two_predictions_near_one_reference_count_one_hit():
    assert bd.match_boundaries([0.39, 0.41], [0.4]) == [(0, 0)]
    c = score(frames_at([0.38, 0.42]))  # both within 20 ms of 0.4, nothing else near
    assert c.hits == 1 and c.predicted == 2


def test_matching_is_a_maximum_matching():
    # closest-pair-first would take 0.42-0.43 and leave 0.45 without a partner: 1 hit; the maximum is 2
    assert bd.match_boundaries([0.42, 0.45], [0.40, 0.43]) == [(0, 0), (1, 1)]
    rng = random.Random(0)
    for _ in range(300):
        pred = sorted(round(rng.uniform(0, 0.3), 2) for _ in range(rng.randint(0, 5)))
        ref = sorted(round(rng.uniform(0, 0.3), 2) for _ in range(rng.randint(0, 5)))
        pairs = bd.match_boundaries(pred, ref)
        assert len({i for i, _ in pairs}) == len({j for _, j in pairs}) == len(pairs)
        assert all(abs(pred[i] - ref[j]) <= 0.02 + 1e-9 for i, j in pairs)
        assert len(pairs) == _brute_force_matching(pred, ref)


def _brute_force_matching(pred, ref, tol=0.02):
    best = 0
    for k in range(min(len(pred), len(ref)), 0, -1):
        for chosen in itertools.combinations(range(len(pred)), k):
            for targets in itertools.permutations(range(len(ref)), k):
                if all(abs(pred[i] - ref[j]) <= tol + 1e-9 for i, j in zip(chosen, targets)):
                    return k
    return best


def test_counts_add_up_as_micro_averages():
    perfect = score(frames_at(REFERENCE))  # 4 hits of 4
    sparse = score(frames_at([0.2]))  # 1 hit of 1, 4 references
    total = perfect + sparse
    assert (total.hits, total.predicted, total.reference, total.utterances) == (5, 5, 8, 2)
    assert total.recall == 5 / 8  # not the mean of the per-utterance recalls (1 and 1/4)


def test_adjacent_share_counts_one_frame_segments():
    # ends at frames 9, 10 (one-frame segment after 9), 30, 48 (one-frame segment 49 after it), 49 (forced)
    c = bd.score_utterance([9, 10, 30, 48, 49], 50)
    assert (c.adjacent, c.all_predicted) == (2, 4) and c.adjacent_share == 0.5
    assert c.utterances == 0 and c.precision is None and c.silence_share is None  # no phone times


def test_silence_share_counts_boundaries_deep_in_leading_or_trailing_pau():
    # 0.1 (leading silence), 0.19 (within 20 ms of the onset: not counted), 0.5 (speech),
    # 0.82 (within 20 ms of the offset), 0.9 (trailing silence)
    c = score(frames_at([0.1, 0.19, 0.5, 0.82, 0.9]))
    assert (c.in_silence, c.predicted) == (2, 5) and c.silence_share == 0.4
    assert bd.silence_span(PHONES, ENDS) == (0.2, 0.8)
    assert bd.silence_span(["a", "pau"], [0.3, 0.5]) == (None, 0.3)
    assert bd.silence_span(["pau", "pau"], [0.3, 0.5]) == (math.inf, -math.inf)


def test_a_collapsed_predictor_scores_f1_zero():
    c = score([49])  # only the forced final boundary: no prediction is scored
    assert c.predicted == 0 and c.precision is None and c.recall == 0.0 and c.f1 == 0.0
    assert c.r_value == pytest.approx(1 - (math.sqrt(2) + 0.0) / 2)  # HR 0, OS -1: r2 = 0


def test_summary_is_json_ready_and_empty_scores_are_none():
    s = bd.BoundaryCounts().summary()
    assert s["precision"] is None and s["f1"] is None and s["r_value"] is None and s["num_utterances"] == 0
    assert score(frames_at(REFERENCE)).summary()["f1"] == 1.0
