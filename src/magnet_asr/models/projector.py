"""``AudioProjector``: encoder frames -> LLM input embeddings (audio tokens).

Two steps, as in SLAM-ASR (Ma et al., 2024) and Ultravox, and an optional third:

1. **Frame stacking** by ``k``: ``k`` consecutive encoder frames are concatenated into one vector, so
   the 50 frames/s of Whisper become ``50 / k`` audio tokens/s (k=4: 12.5/s). Stacking loses no
   information (unlike pooling), it only moves time into channels. A sample with ``n`` real frames
   gets exactly ``ceil(n / k)`` tokens, counted from its mask and never from the padded length; its
   last group is completed with zeros, which is also what a padded batch puts there, so a sample's
   tokens do not depend on its batch.
2. **MLP**: ``RMSNorm -> Linear -> GELU -> Linear -> RMSNorm``. The output RMSNorm is the important
   one: without it the audio embeddings come out orders of magnitude smaller (or larger) than the
   LLM's token embeddings and the LLM treats them as noise (docs/architecture.md). Its gain starts at the RMS of
   the LLM's token embeddings (:func:`embedding_rms`), so audio and text tokens start on one scale.
3. Optionally (``num_layers > 0``), pre-norm Transformer layers over the audio tokens, between the MLP's
   last Linear and its output RMSNorm, so each audio token reads its neighbours (a BPE token often spans
   two 80 ms groups). Each starts as the identity (zero output projections), so the projector starts as
   the MLP alone. No position encoding is added: Whisper's outputs already carry its positions.

Optionally, :class:`EmbeddingCTCHead` scores each audio token against the LLM's own (frozen) token
embeddings and trains the projector with CTC on the transcript tokens. A new projector otherwise only
learns from the LLM's loss, and with a frozen or LoRA LLM that alignment phase is long: SLAM-ASR reports
thousands of steps before the loss drops, and on this CPU 600 steps left the LLM ignoring the audio
(issue 5). CTC against the embedding table pulls each audio token toward the direction of the token
spoken there, which the LLM can read from the first steps (the idea of LegoSLM, Ma et al., 2025, which
feeds CTC posteriors over the LLM vocabulary; here the CTC loss is only an auxiliary training signal).
The same head can also compress: :func:`merge_ctc_spikes` keeps only the audio tokens where CTC emits a
token (blanks dropped, repeats averaged), about as many as the transcript has tokens (the "CTC
compression" of Gaido et al., 2021, and of the CTC-prompt decoders of Wu et al., 2023).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from magnet_asr.models.ctc_prefix_score import CTCEmissions

__all__ = [
    "CTC_POOLING",
    "AudioProjector",
    "EmbeddingCTCHead",
    "embedding_rms",
    "merge_ctc_spikes",
    "stack_frames",
    "stacked_lengths",
]


def stacked_lengths(lengths: torch.Tensor, stack: int) -> torch.Tensor:
    """Audio tokens per sample for ``lengths (B,)`` real frames: ``ceil(lengths / stack)``."""
    return torch.div(lengths + stack - 1, stack, rounding_mode="floor")


def stack_frames(
    hidden: torch.Tensor, mask: torch.Tensor | None, stack: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``stack`` consecutive frames.

    ``hidden (B, L, D)``, ``mask (B, L)`` (1 = real; None = all real) ->
    ``(B, ceil(L / stack), stack * D)`` and its mask ``(B, ceil(L / stack))``. Padding frames are zeroed
    first, so the partial group at the end of a sample holds zeros whatever the batch padding was.
    """
    batch, length, dim = hidden.shape
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
    hidden = hidden * mask[..., None].to(hidden.dtype)
    pad = (-length) % stack
    if pad:
        hidden = nn.functional.pad(hidden, (0, 0, 0, pad))
    groups = (length + pad) // stack
    stacked = hidden.reshape(batch, groups, stack * dim)
    counts = stacked_lengths(mask.sum(1), stack)
    stacked_mask = (torch.arange(groups, device=hidden.device)[None] < counts[:, None]).long()
    return stacked, stacked_mask


def embedding_rms(embeddings: nn.Module | torch.Tensor) -> float:
    """Root-mean-square value of a token embedding table (``nn.Embedding`` or its weight)."""
    weight = embeddings if isinstance(embeddings, torch.Tensor) else cast(torch.Tensor, embeddings.weight)
    with torch.no_grad():
        return float(weight.detach().float().pow(2).mean().sqrt())


class AudioProjector(nn.Module):
    """Frame stacking + ``RMSNorm -> Linear -> GELU -> Linear -> RMSNorm``.

    Args:
        input_size: encoder width ``D``.
        output_size: LLM embedding width ``H``.
        stack: frames per audio token ``k``.
        hidden_size: inner width of the MLP.
        dropout: dropout after the GELU (training only).
        output_scale: initial gain of the output RMSNorm; pass the RMS of the LLM's token embeddings.
        ctc: add an :class:`EmbeddingCTCHead` (``self.ctc_head``) for the auxiliary CTC loss.
        num_layers: Transformer layers over the audio tokens after the MLP (0 = none).
        num_heads: their attention heads; must divide ``output_size``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        stack: int = 4,
        hidden_size: int = 1024,
        dropout: float = 0.0,
        output_scale: float = 1.0,
        eps: float = 1e-6,
        ctc: bool = False,
        num_layers: int = 0,
        num_heads: int = 8,
    ) -> None:
        super().__init__()
        if stack < 1:
            raise ValueError(f"projector stack must be >= 1, got {stack}")
        if num_layers < 0:
            raise ValueError(f"projector num_layers must be >= 0, got {num_layers}")
        if num_layers and (num_heads < 1 or output_size % num_heads):
            raise ValueError(f"projector num_heads={num_heads} must divide the LLM width {output_size}")
        if not (output_scale > 0 and math.isfinite(output_scale)):
            raise ValueError(f"output_scale must be positive and finite, got {output_scale}")
        self.stack = stack
        self.input_norm = nn.RMSNorm(stack * input_size, eps=eps)
        self.linear_in = nn.Linear(stack * input_size, hidden_size)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.linear_out = nn.Linear(hidden_size, output_size)
        self.layers = nn.ModuleList(
            _identity_layer(output_size, num_heads, dropout) for _ in range(num_layers)
        )
        self.output_norm = nn.RMSNorm(output_size, eps=eps)
        with torch.no_grad():
            self.output_norm.weight.fill_(output_scale)
        self.ctc_head = EmbeddingCTCHead(output_size) if ctc else None

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Audio tokens for ``lengths (B,)`` real encoder frames."""
        return stacked_lengths(lengths, self.stack)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden (B, L, D)``, ``mask (B, L)`` -> embeddings ``(B, S, H)`` (zero on padding) and
        their mask ``(B, S)``, ``S = ceil(L / stack)``."""
        stacked, stacked_mask = stack_frames(hidden, mask, self.stack)
        x = self.activation(self.linear_in(self.input_norm(stacked)))
        x = self.linear_out(self.dropout(x))
        padding = stacked_mask == 0
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        x = self.output_norm(x)
        return x.masked_fill(padding[..., None], 0.0), stacked_mask


def _identity_layer(width: int, num_heads: int, dropout: float) -> nn.TransformerEncoderLayer:
    """A pre-norm Transformer layer whose output projections start at zero: it starts as the identity, so
    the projector starts as the MLP alone."""
    layer = nn.TransformerEncoderLayer(
        width,
        num_heads,
        dim_feedforward=4 * width,
        dropout=dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    for linear in (layer.self_attn.out_proj, layer.linear2):
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    return layer


def _scalar_log_scale(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Models saved when ``log_scale`` was a 0-d tensor load into its one-element shape."""
    key = prefix + "log_scale"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


class EmbeddingCTCHead(nn.Module):
    """CTC over the LLM vocabulary, scored by cosine similarity with the (frozen) token embeddings.

    ``logits = scale * cos(audio token, token embedding)`` for every vocabulary entry, plus a learned
    blank direction; ``scale`` is learned too (initialized as CLIP's temperature). Only the projector
    (and these two parameters) receive gradients: the embedding table is detached.

    Scoring all 49k SmolLM2 tokens for every audio token made a CPU step 2.5 s; with ``negatives``
    the loss is computed over the batch's target tokens plus that many random other tokens (sampled
    softmax, Jean et al., 2015), which still pushes each audio token away from the rest of the table.
    """

    def __init__(self, hidden_size: int, negatives: int | None = 1024, initial_scale: float = 10.0) -> None:
        super().__init__()
        if negatives is not None and negatives < 0:
            raise ValueError(f"negatives must be >= 0 or None, got {negatives}")
        self.negatives = negatives
        self.blank = nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))
        # one element, not a scalar: FSDP2's fully_shard refuses 0-d parameters
        self.log_scale = nn.Parameter(torch.tensor([math.log(initial_scale)]))
        self.register_load_state_dict_pre_hook(_scalar_log_scale)

    def logits(self, embeds: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``embeds (B, A, H)``, ``table (V, H)`` -> ``(B, A, V + 1)``; the blank is the last class."""
        classes = torch.cat([table.detach().to(embeds.dtype), self.blank[None].to(embeds.dtype)])
        cosine = nn.functional.normalize(embeds, dim=-1) @ nn.functional.normalize(classes, dim=-1).T
        return cosine * self.scale()

    def scale(self) -> torch.Tensor:
        """The learned logit scale, capped at 100 as CLIP caps its temperature."""
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def _classes(self, table: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of ``table`` to score and the targets renumbered into them."""
        vocab = table.shape[0]
        if self.negatives is None or len(flat) + self.negatives >= vocab:
            return table, flat
        extra = torch.randint(0, vocab, (self.negatives,), device=flat.device)
        ids, inverse = torch.unique(torch.cat([flat, extra]), return_inverse=True)
        return table[ids], inverse[: len(flat)]

    def forward(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        table: torch.Tensor,
        targets: list[list[int]],
    ) -> torch.Tensor:
        """Mean CTC loss (per target token) of audio tokens ``embeds (B, A, H)`` with ``mask (B, A)``
        against the token ids ``targets``. Samples whose audio is too short for their targets add 0
        (``zero_infinity``) instead of an infinite loss."""
        flat = torch.tensor([t for row in targets for t in row], dtype=torch.long, device=embeds.device)
        classes, flat = self._classes(table, flat)
        log_probs = self.logits(embeds, classes).float().log_softmax(-1)
        return nn.functional.ctc_loss(
            log_probs.transpose(0, 1),
            flat,
            mask.sum(1),
            torch.tensor([len(row) for row in targets], dtype=torch.long, device=embeds.device),
            blank=classes.shape[0],
            zero_infinity=True,
        )

    @torch.no_grad()
    def best_path(
        self, embeds: torch.Tensor, table: torch.Tensor, blank_threshold: float | None = None
    ) -> torch.Tensor:
        """The most likely class of each audio token over the whole table ``(B, A)``; blank = ``len(table)``.

        ``blank_threshold``: an audio token emits its most likely *token* wherever the blank's probability
        is below it, instead of only where the blank is not the argmax (None). Above 0.5 this keeps every
        argmax emission plus the uncertain ones, where a word CTC would drop still shows."""
        return _best_path(self.logits(embeds, table), blank_threshold)

    @torch.no_grad()
    def emissions(
        self, embeds: torch.Tensor, table: torch.Tensor, blank_threshold: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`best_path` and ``log P(blank)`` of each audio token, both ``(B, A)``."""
        logits = self.logits(embeds, table)
        log_blank = _log_blank(logits)
        return _best_path(logits, blank_threshold, log_blank), log_blank

    @torch.no_grad()
    def search_emissions(self, embeds: torch.Tensor, mask: torch.Tensor, table: torch.Tensor) -> CTCEmissions:
        """This head's log-probabilities for audio tokens ``embeds (B, A, H)`` with ``mask (B, A)``, in the
        form beam search asks them (:class:`~magnet_asr.models.ctc_prefix_score.CTCEmissions`): the
        normalizer over the whole table is computed one sample at a time, the rest per candidate."""
        classes = nn.functional.normalize(torch.cat([table, self.blank[None]]).float(), dim=-1)
        audio = nn.functional.normalize(embeds.float(), dim=-1)
        scale = float(self.scale())
        log_norm = torch.stack([(scale * row @ classes.T).logsumexp(-1) for row in audio])
        return CTCEmissions(audio, classes, scale, log_norm, mask.sum(1))

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, mask: torch.Tensor, table: torch.Tensor) -> list[list[int]]:
        """Best-path CTC decoding: token ids per sample (repeats merged, blanks dropped)."""
        best = self.best_path(embeds, table)
        blank = table.shape[0]
        out = []
        for row, n in zip(best.tolist(), mask.sum(1).tolist(), strict=True):
            ids = [t for i, t in enumerate(row[:n]) if t != blank and (i == 0 or t != row[i - 1])]
            out.append(ids)
        return out


def _log_blank(logits: torch.Tensor) -> torch.Tensor:
    """``log P(blank)`` (the last class) without materializing a softmax over the whole vocabulary."""
    return logits[..., -1].float() - logits.float().logsumexp(-1)


def _best_path(
    logits: torch.Tensor, blank_threshold: float | None, log_blank: torch.Tensor | None = None
) -> torch.Tensor:
    """:meth:`EmbeddingCTCHead.best_path` from its ``logits``; ``log_blank`` when already computed."""
    if blank_threshold is None:
        return logits.argmax(-1)
    blank = logits.shape[-1] - 1
    log_blank = _log_blank(logits) if log_blank is None else log_blank
    best_token = logits[..., :blank].argmax(-1)
    emitted = log_blank < math.log(blank_threshold)
    return torch.where(emitted, best_token, torch.full_like(best_token, blank))


CTC_POOLING = ("spikes", "segments")


def merge_ctc_spikes(
    embeds: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    blank: int,
    log_blank: torch.Tensor | None = None,
    max_tokens: torch.Tensor | None = None,
    pooling: str = "spikes",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LLM input per CTC emission. ``embeds (B, A, H)``, ``mask (B, A)``, best-path ``labels (B, A)``
    -> ``(B, G, H)`` and mask ``(B, G)``; consecutive audio tokens with the same label are one emission,
    as CTC collapses repeats. A sample where CTC emits nothing keeps one token, the mean of its audio (a
    clip with real frames always reaches the LLM); one with no frames keeps none. Each sample is reduced
    on its own, so the result does not depend on the batch.

    ``pooling``: ``spikes`` keeps the mean of each emission's own audio tokens and drops the blanks;
    ``segments`` gives every audio token to the nearest kept emission (ties to the earlier) and keeps
    the mean of each one's share weighted by ``1 - P(blank)`` (``log_blank`` needed), so a word CTC
    misses still reaches the LLM inside a neighbour, in proportion to how likely CTC found a token
    there (Gaido et al., 2021, average rather than select). A plain mean mixed so much silence in that
    ``speech_llm_demo``, untrained for it, read asterisk 0.83 WER, against 0.42 weighted and 0.37 for
    ``spikes`` at blank threshold 0.85 (issue 12).

    ``max_tokens (B,)`` needs ``log_blank (B, A)``: a sample left with more emissions than its budget keeps
    the most certain ones (lowest ``log P(blank)`` of their audio tokens), in their order.
    """
    if max_tokens is not None and log_blank is None:
        raise ValueError("merge_ctc_spikes: max_tokens needs log_blank")
    if pooling not in CTC_POOLING:
        raise ValueError(f"merge_ctc_spikes: pooling '{pooling}' is not one of {CTC_POOLING}")
    if pooling == "segments" and log_blank is None:
        raise ValueError("merge_ctc_spikes: segments pooling weighs by P(blank): pass log_blank")
    weights = -torch.expm1(log_blank) if pooling == "segments" and log_blank is not None else None
    rows: list[torch.Tensor] = []
    for index, (sample, length, best) in enumerate(zip(embeds, mask.sum(1).tolist(), labels, strict=True)):
        sample, best = sample[:length], best[:length]
        kept = (best != blank).nonzero().squeeze(1)
        if len(kept) == 0:
            rows.append(sample.mean(0, keepdim=True) if length else sample)
            continue
        spikes = best[kept]
        starts = torch.ones_like(spikes, dtype=torch.bool)
        starts[1:] = (spikes[1:] != spikes[:-1]) | (kept[1:] != kept[:-1] + 1)
        group = starts.long().cumsum(0) - 1
        groups = int(group[-1]) + 1
        chosen = torch.arange(groups, device=sample.device)
        if max_tokens is not None and log_blank is not None and groups > int(max_tokens[index]):
            certainty = log_blank.new_full((groups,), math.inf).scatter_reduce(
                0, group, log_blank[index, kept], reduce="amin"
            )
            budget = max(int(max_tokens[index]), 1)
            chosen = certainty.topk(budget, largest=False).indices.sort().values
        if weights is not None:
            first, last = kept[starts][chosen], kept[starts.roll(-1)][chosen]  # a group ends before a start
            rows.append(_mean_by(sample, _nearest(first, last, length), weights[index, :length]))
        else:
            rows.append(_mean_by(sample[kept], group)[chosen])
    width = max(1, max(len(r) for r in rows))
    out = embeds.new_zeros(len(rows), width, embeds.shape[-1])
    out_mask = torch.zeros(len(rows), width, dtype=torch.long, device=embeds.device)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
        out_mask[i, : len(row)] = 1
    return out, out_mask


def _mean_by(rows: torch.Tensor, owner: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of ``rows (N, H)`` per ``owner (N,)`` index (sorted, ``0..max``, each owning a row),
    weighted by ``weight (N,)`` if given."""
    count = int(owner[-1]) + 1
    if weight is None:
        sums = rows.new_zeros(count, rows.shape[1]).index_add(0, owner, rows)
        return sums / torch.bincount(owner, minlength=count)[:, None].to(rows.dtype)
    sums = rows.new_zeros(count, rows.shape[1]).index_add(0, owner, rows * weight[:, None])
    return sums / weight.new_zeros(count).index_add(0, owner, weight).clamp(min=1e-6)[:, None]


def _nearest(first: torch.Tensor, last: torch.Tensor, length: int) -> torch.Tensor:
    """For each of ``length`` positions, the index of the nearest span ``[first[i], last[i]]`` (sorted,
    disjoint; a tie goes to the earlier span): the cut between two spans is their gap's midpoint."""
    cuts = torch.div(last[:-1] + first[1:], 2, rounding_mode="floor")
    return torch.searchsorted(cuts, torch.arange(length, device=first.device))
