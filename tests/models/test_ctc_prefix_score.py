"""Joint CTC / LLM decoding: the prefix score against the sum over every alignment, and in ``generate``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from magnet_asr.models.ctc_prefix_score import CTCEmissions, CTCPrefixScorer

VOCAB = 4  # tokens 0-3; token 0 ends a transcript; the blank is class 4
END = 0


def emissions(lengths=(4, 3), seed: int = 0) -> CTCEmissions:
    torch.manual_seed(seed)
    audio = nn.functional.normalize(torch.randn(len(lengths), max(lengths), 6, dtype=torch.double), dim=-1)
    classes = nn.functional.normalize(torch.randn(VOCAB + 1, 6, dtype=torch.double), dim=-1)
    scale = 3.0
    log_norm = (scale * audio @ classes.T).logsumexp(-1)
    return CTCEmissions(audio, classes, scale, log_norm, torch.tensor(lengths))


def collapse(path) -> tuple[int, ...]:
    out = [c for i, c in enumerate(path) if c != VOCAB and (i == 0 or c != path[i - 1])]
    return tuple(out)


def brute_force(em: CTCEmissions, sample: int) -> dict[tuple[int, ...], float]:
    """Probability of every collapsed labeling of ``sample``, summed over all its alignments."""
    length = int(em.lengths[sample])
    classes = torch.arange(VOCAB + 1)[None].expand(1, -1)
    table = em.log_probs(torch.tensor([sample]), classes)[0, :length].exp()  # (A, V + 1)
    total: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(VOCAB + 1), repeat=length):
        p = math.prod(float(table[t, c]) for t, c in enumerate(path))
        key = collapse(path)
        total[key] = total.get(key, 0.0) + p
    return total


def prefix_probability(total, prefix) -> float:
    return sum(p for labels, p in total.items() if labels[: len(prefix)] == prefix)


@pytest.mark.parametrize("labels", [(2, 3), (2, 2), (1, 2, 1)], ids=["distinct", "repeat", "three"])
def test_prefix_and_end_scores_are_the_sums_over_every_alignment(labels):
    """With weight 1 and a flat LLM, each step adds log P_ctc(prefix + c) - log P_ctc(prefix); the end
    token adds the whole hypothesis's probability. Both are checked against enumeration of every path,
    for a full-length sample and a padded shorter one in the same batch."""
    em = emissions()
    scorer = CTCPrefixScorer(em, weight=1.0, num_beams=1, end_ids=[END], pre_beam=VOCAB)
    flat = torch.zeros(2, VOCAB, dtype=torch.double)
    totals = [brute_force(em, sample) for sample in range(2)]
    running = torch.zeros(2, dtype=torch.double)
    for step in range(len(labels) + 1):
        prefix = labels[:step]
        out = scorer(torch.tensor([list(prefix)] * 2, dtype=torch.long), flat)
        for sample in range(2):
            whole = totals[sample].get(prefix, 0.0)
            expected_end = math.log(whole) if whole > 0 else -math.inf
            assert float(running[sample] + out[sample, END]) == pytest.approx(expected_end, rel=1e-9)
            for token in range(1, VOCAB):
                expected = prefix_probability(totals[sample], (*prefix, token))
                got = float(running[sample] + out[sample, token])
                assert (
                    got == pytest.approx(math.log(expected), rel=1e-9) if expected > 0 else got == -math.inf
                )
        if step < len(labels):
            running = running + out[:, labels[step]]


def test_only_the_llm_pre_beam_is_scored_and_the_weight_mixes_the_two():
    em = emissions()
    llm = torch.tensor([[0.0, 3.0, 2.0, -1.0]] * 2, dtype=torch.double).log_softmax(-1)
    alone = CTCPrefixScorer(em, weight=1.0, num_beams=2, end_ids=[END], pre_beam=VOCAB)(
        torch.zeros(2, 0, dtype=torch.long), llm
    )
    mixed = CTCPrefixScorer(em, weight=0.25, num_beams=2, end_ids=[END], pre_beam=2)(
        torch.zeros(2, 0, dtype=torch.long), llm
    )
    assert torch.isinf(mixed[:, [0, 3]]).all()  # outside the LLM's two best next tokens
    torch.testing.assert_close(mixed[:, [1, 2]], 0.75 * llm[:, [1, 2]] + 0.25 * alone[:, [1, 2]])
    # both rows belong to sample 0 (two beams of one sample)
    torch.testing.assert_close(alone[0], alone[1])


def test_an_invalid_weight_is_refused():
    with pytest.raises(ValueError, match="ctc_weight"):
        CTCPrefixScorer(emissions(), weight=0.0, num_beams=1, end_ids=[END], pre_beam=2)
