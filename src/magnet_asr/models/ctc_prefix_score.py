"""Joint CTC / LLM decoding: the CTC head's prefix score beside the LLM's in beam search.

An LLM decoder reading audio it finds hard writes what its language prior expects ("the Soviet science
... Cold War" for "this pseudoscience ... Chaldeans", issue 15). A CTC head scores a hypothesis only by
the audio, and a wrong fluent prefix gets a low CTC score. Hybrid CTC/attention decoding (Watanabe et
al., 2017, "Hybrid CTC/Attention Architecture for End-to-End Speech Recognition", sec. 3.3 and
Algorithm 2; ESPnet's ``CTCPrefixScore``) ranks each hypothesis by

    (1 - ctc_weight) * log P_llm(prefix) + ctc_weight * log P_ctc(prefix...)

where the CTC prefix probability sums over every alignment of the prefix to a beginning of the audio,
and, for the end-of-sequence token, over every alignment of the whole hypothesis to the whole audio.
As in ESPnet, the CTC term is computed only for the ``pre_beam`` best next tokens of the LLM; the rest
are ruled out. Here the CTC head scores the LLM's own vocabulary (``EmbeddingCTCHead``), so both
terms are over the same tokens and the prefix score plugs into transformers' ``generate`` as a
:class:`~transformers.LogitsProcessor`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

__all__ = ["CTCEmissions", "CTCPrefixScorer"]

_NEG_INF = float("-inf")


@dataclass
class CTCEmissions:
    """CTC log-probabilities of audio tokens, evaluated for the classes asked for only (the full
    ``(B, A, V + 1)`` table over a 49k vocabulary is hundreds of MB per batch).

    ``log P(class c | audio token t of sample b) = scale * <audio[b, t], classes[c]> - log_norm[b, t]``:
    ``audio (B, A, H)`` and ``classes (V + 1, H)`` are unit vectors (the cosine head of
    :class:`~magnet_asr.models.projector.EmbeddingCTCHead`; the blank is the last class), ``log_norm
    (B, A)`` the log-partition over all classes, ``lengths (B,)`` the real audio tokens of each sample.
    """

    audio: torch.Tensor
    classes: torch.Tensor
    scale: float
    log_norm: torch.Tensor
    lengths: torch.Tensor

    @property
    def blank(self) -> int:
        return self.classes.shape[0] - 1

    def log_probs(self, samples: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """``samples (R,)``, ``classes (R, K)`` -> ``(R, A, K)`` log-probabilities; ``-inf`` past each
        sample's length."""
        audio = self.audio[samples]
        scores = self.scale * torch.einsum("rah,rkh->rak", audio, self.classes[classes])
        scores = scores - self.log_norm[samples][..., None]
        return scores.masked_fill(~self._valid(samples)[..., None], _NEG_INF)

    def log_blank(self, samples: torch.Tensor) -> torch.Tensor:
        """``(R, A)`` log-probabilities of the blank; 0 past each sample's length, so a prefix that has
        ended carries its probability unchanged to the last position of the padded batch."""
        blank = torch.full((len(samples), 1), self.blank, dtype=torch.long, device=samples.device)
        return self.log_probs(samples, blank)[..., 0].masked_fill(~self._valid(samples), 0.0)

    def _valid(self, samples: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(self.audio.shape[1], device=self.audio.device)
        return positions[None] < self.lengths[samples][:, None]


@dataclass
class _Prefix:
    """CTC forward variables of one hypothesis: ``log P(prefix, alignment ends at t in a non-blank /
    a blank)`` for every audio position ``t`` (``(A,)`` each), and its prefix score."""

    non_blank: torch.Tensor
    blank: torch.Tensor
    score: float


class CTCPrefixScorer(LogitsProcessor):
    """Re-scores the LLM's next-token log-probabilities with the CTC prefix score (module docstring).

    ``emissions``: the batch's CTC outputs; ``num_beams``: generation rows per sample (rows are
    sample-major, as transformers lays them out); ``end_ids``: the tokens that end a transcript
    (scored by CTC as the whole hypothesis over the whole audio); ``pre_beam``: next tokens scored per
    row. Holds the hypotheses' forward variables between steps, so one scorer serves one ``generate``.
    """

    def __init__(
        self,
        emissions: CTCEmissions,
        weight: float,
        num_beams: int,
        end_ids: Sequence[int],
        pre_beam: int,
    ) -> None:
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"ctc_weight must be in (0, 1], got {weight}")
        if pre_beam < 1:
            raise ValueError(f"pre_beam must be >= 1, got {pre_beam}")
        self.emissions = emissions
        self.weight = weight
        self.num_beams = num_beams
        self.end_ids = set(end_ids)
        self.pre_beam = pre_beam
        # the same every step: computed once per sample, not once per row and step
        self._log_blank = emissions.log_blank(
            torch.arange(len(emissions.lengths), device=emissions.audio.device)
        )
        self._prefixes: dict[tuple[int, tuple[int, ...]], _Prefix] = {}

    def _start(self, samples: torch.Tensor) -> list[_Prefix]:
        """The empty hypothesis: every position so far is blank."""
        blank = self._log_blank[samples].cumsum(-1)
        return [_Prefix(torch.full_like(row, _NEG_INF), row, 0.0) for row in blank]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, length = input_ids.shape
        device = scores.device
        samples = torch.arange(rows, device=device) // self.num_beams
        # beam search passes log-probabilities, greedy logits; the sums run in the emissions' precision
        log_probs = scores.to(self.emissions.audio.dtype).log_softmax(-1)
        vocab = min(log_probs.shape[-1], self.emissions.blank)
        pre_beam = min(self.pre_beam, vocab)
        candidates = log_probs[:, :vocab].topk(pre_beam, dim=-1).indices  # (R, K)

        keys = [(int(s), tuple(row)) for s, row in zip(samples.tolist(), input_ids.tolist())]
        if length == 0:
            prefixes: list[_Prefix | None] = list(self._start(samples))
        else:
            # a row whose prefix was never a candidate can only come from a step where every candidate
            # was ruled out (-inf); it stays ruled out
            prefixes = [self._prefixes.get(key) for key in keys]
        dead = torch.tensor([p is None for p in prefixes], device=device)
        nothing = torch.full_like(self._log_blank[0], _NEG_INF)  # a dead row's placeholder, masked below
        filled = [p if p is not None else _Prefix(nothing, nothing, 0.0) for p in prefixes]
        non_blank = torch.stack([p.non_blank for p in filled])  # (R, A)
        blank = torch.stack([p.blank for p in filled])
        previous = torch.tensor([p.score for p in filled], dtype=log_probs.dtype, device=device)
        last = torch.tensor([row[-1] if row else -1 for _, row in keys], device=device)

        x = self.emissions.log_probs(samples, candidates)  # (R, A, K)
        x_blank = self._log_blank[samples]  # (R, A)
        new_non_blank, new_blank, prefix_score = _extend(
            non_blank, blank, x, x_blank, candidates, last, length
        )
        ends = torch.tensor(
            [[int(c) in self.end_ids for c in row] for row in candidates.tolist()], device=device
        )
        whole = torch.logaddexp(non_blank[:, -1], blank[:, -1])  # (R,): the hypothesis over all the audio
        ctc = torch.where(ends, whole[:, None], prefix_score)

        # a prefix CTC cannot align (more labels than audio tokens) has -inf already; no -inf - -inf
        gain = torch.where(previous[:, None].isfinite(), ctc - previous[:, None], _NEG_INF)
        combined = (1.0 - self.weight) * log_probs.gather(1, candidates) + self.weight * gain
        combined = combined.masked_fill(dead[:, None], _NEG_INF)
        out = torch.full_like(log_probs, _NEG_INF)
        out.scatter_(1, candidates, combined)

        self._prefixes = {}
        for r, (sample, row) in enumerate(keys):
            if bool(dead[r]):
                continue
            for k, token in enumerate(candidates[r].tolist()):
                if token not in self.end_ids:
                    self._prefixes[(sample, (*row, token))] = _Prefix(
                        new_non_blank[r, :, k], new_blank[r, :, k], float(prefix_score[r, k])
                    )
        return out.to(scores.dtype)


def _extend(
    non_blank: torch.Tensor,
    blank: torch.Tensor,
    x: torch.Tensor,
    x_blank: torch.Tensor,
    candidates: torch.Tensor,
    last: torch.Tensor,
    length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One label more on every row: Watanabe et al. (2017), Algorithm 2, vectorized over rows and
    candidates, in log space.

    ``non_blank``, ``blank (R, A)``: the prefixes' forward variables; ``x (R, A, K)``: the candidates'
    log-probabilities; ``x_blank (R, A)``; ``last (R,)``: each prefix's last token (a repeat of it needs
    a blank in between); ``length``: tokens in the prefixes (0: the empty hypothesis).
    Returns the extended prefixes' forward variables ``(R, A, K)`` twice and their prefix scores ``(R, K)``.
    """
    rows, positions, count = x.shape
    # phi(t): the prefix ends by t, so the new label may start at t + 1 (after a blank if it repeats)
    phi = torch.logaddexp(non_blank, blank)[..., None].expand(rows, positions, count)
    phi = torch.where(candidates[:, None, :] == last[:, None, None], blank[..., None], phi)
    new_non_blank = torch.full_like(x, _NEG_INF)
    new_blank = torch.full_like(x, _NEG_INF)
    if length == 0:
        new_non_blank[:, 0] = x[:, 0]
    terms = [new_non_blank[:, 0]]
    for t in range(1, positions):
        arrive = phi[:, t - 1] + x[:, t]
        terms.append(arrive)
        new_non_blank[:, t] = torch.logaddexp(new_non_blank[:, t - 1] + x[:, t], arrive)
        new_blank[:, t] = torch.logaddexp(new_blank[:, t - 1], new_non_blank[:, t - 1]) + x_blank[:, t, None]
    return new_non_blank, new_blank, torch.stack(terms).logsumexp(0)
