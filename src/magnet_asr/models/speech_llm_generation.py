"""SpeechLLM generation: ``generate`` with guards (the recognizer that drives it is in
:mod:`magnet_asr.evaluation.decode`).

Guards against what LLM decoders do on audio (docs/architecture.md, "Known traps"):

- **length**: each sample may write at most ``floor + rate * seconds`` tokens (its own audio, not the
  batch's longest, so a sample decodes the same alone and in a batch);
- **repetition loops**: :class:`LoopGuard` stops a sequence whose tail repeats a short pattern, and
  :func:`trim_loop` keeps one copy (optional ``repetition_penalty`` / ``no_repeat_ngram_size`` too);
- **empty or silent audio**: never reaches the LLM; its transcript is ``""`` instead of a hallucination.

Prompts are left-padded for generation (transformers derives positions from the attention mask), and
right-padded for training; both come from the same :class:`~magnet_asr.models.processing_speech_llm.ChatPrompt`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, cast

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from magnet_asr.data.collator import pad_sequences
from magnet_asr.models.ctc_prefix_score import CTCPrefixScorer
from magnet_asr.text import MAX_NEW_TOKENS_FLOOR, MAX_NEW_TOKENS_PER_SECOND

__all__ = [
    "DecodeSettings",
    "LoopGuard",
    "SampleLengthLimit",
    "generate_tokens",
    "trim_loop",
]


@dataclass
class DecodeSettings:
    """Decoding knobs; defaults come from the model config (:meth:`from_config`).

    ``max_window_seconds``: a clip longer than this is transcribed piece by piece, cut at its pauses
    (:func:`magnet_asr.audio.pause_windows`, no piece longer than this), the pieces' texts joined; None:
    clips up to the encoder's limit (30 s) are read whole. An LLM fine-tuned on single utterances skips,
    repeats or stops early on a long clip of several (issue 15).

    ``ctc_weight`` > 0: joint CTC / LLM decoding, each hypothesis scored ``(1 - w) * LLM + w * CTC``
    (:mod:`magnet_asr.models.ctc_prefix_score`), the CTC term for the ``ctc_pre_beam`` best next tokens
    of the LLM (None: ESPnet's 1.5 x ``num_beams``, at least 2).
    """

    num_beams: int = 1
    max_new_tokens_per_second: float = MAX_NEW_TOKENS_PER_SECOND
    max_new_tokens_floor: int = MAX_NEW_TOKENS_FLOOR
    max_new_tokens: int | None = None  # a fixed cap instead of the per-sample one
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    loop_guard: bool = True
    max_window_seconds: float | None = None
    ctc_weight: float = 0.0
    ctc_pre_beam: int | None = None

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens_floor < 1 or self.max_new_tokens_per_second < 0:
            raise ValueError(f"invalid decoding settings: {self}")
        if self.max_window_seconds is not None and self.max_window_seconds <= 0:
            raise ValueError(f"max_window_seconds must be > 0, got {self.max_window_seconds}")
        if not 0.0 <= self.ctc_weight <= 1.0 or (self.ctc_pre_beam is not None and self.ctc_pre_beam < 1):
            raise ValueError(f"ctc_weight must be in [0, 1] and ctc_pre_beam >= 1, got {self}")

    @property
    def pre_beam(self) -> int:
        """Next tokens the CTC prefix score is computed for, per hypothesis."""
        return self.ctc_pre_beam if self.ctc_pre_beam is not None else max(2, int(1.5 * self.num_beams))

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> DecodeSettings:
        """``config.decoding`` (a dict) updated with ``overrides``."""
        values = {**getattr(config, "decoding", {}), **overrides}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown decoding setting(s) {unknown}; known: {sorted(names)}")
        return cls(**values)

    def limits(self, seconds: Sequence[float]) -> list[int]:
        """Maximum new tokens per sample for its ``seconds`` of audio."""
        if self.max_new_tokens is not None:
            return [int(self.max_new_tokens)] * len(seconds)
        return [
            int(self.max_new_tokens_floor + math.ceil(self.max_new_tokens_per_second * s)) for s in seconds
        ]

    def generation_config(self, prompt: Any, max_new_tokens: int) -> GenerationConfig:
        # Every field set explicitly: an instruct LLM's own defaults (sampling, temperature) must not leak in.
        return GenerationConfig(
            do_sample=False,
            num_beams=self.num_beams,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(prompt.stop_ids),
            pad_token_id=prompt.pad_id,
            repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            use_cache=True,
        )


def loop_start(
    tokens: Sequence[int], max_period: int = 8, min_span: int = 12, min_repeats: int = 3
) -> int | None:
    """Where the redundant part of a repetition loop at the end of ``tokens`` begins, or None.

    A loop is a pattern of ``p <= max_period`` tokens repeated back to back at the end, at least
    ``max(min_repeats, ceil(min_span / p))`` times (12 identical tokens, 6 repeats of a pair, 3 of a
    4-gram): real transcripts rarely do that, looping decoders always do. Returns the index after the
    first copy.
    """
    n = len(tokens)
    for period in range(1, max_period + 1):
        needed = max(min_repeats, math.ceil(min_span / period))
        if n < period * needed:
            continue
        tail = list(tokens[n - period :])
        start = n - period
        while start - period >= 0 and list(tokens[start - period : start]) == tail:
            start -= period
        if (n - start) // period >= needed:
            return start + period
    return None


def trim_loop(tokens: Sequence[int]) -> list[int]:
    """``tokens`` with a trailing repetition loop cut down to one copy of its pattern."""
    cut = loop_start(tokens)
    return list(tokens[:cut] if cut is not None else tokens)


def _per_row(values: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeat per-sample ``values (B,)`` for the ``rows`` generation rows (beams are sample-major)."""
    return values.repeat_interleave(max(rows // len(values), 1))


class SampleLengthLimit(StoppingCriteria):
    """Stop each sample at its own token budget (``input_ids`` hold only generated tokens here)."""

    def __init__(self, limits: Sequence[int]) -> None:
        self.limits = torch.tensor(list(limits), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        limits = _per_row(self.limits.to(input_ids.device), input_ids.shape[0])
        return cast(torch.BoolTensor, input_ids.shape[1] >= limits)


class LoopGuard(StoppingCriteria):
    """Stop a sequence as soon as it ends in a repetition loop (:func:`loop_start`)."""

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = [loop_start(row) is not None for row in input_ids.tolist()]
        return cast(torch.BoolTensor, torch.tensor(done, dtype=torch.bool, device=input_ids.device))


def _clean(tokens: Sequence[int], stops: set[int], limit: int, loop_guard: bool) -> list[int]:
    out: list[int] = []
    for token in tokens[:limit]:
        if token in stops:
            break
        out.append(token)
    return trim_loop(out) if loop_guard else out


def settings_from_generation(generation_config: Any) -> dict[str, Any]:
    """The :class:`DecodeSettings` a transformers ``GenerationConfig`` sets away from its defaults."""
    from transformers import GenerationConfig

    default, shared = (
        GenerationConfig(),
        ("num_beams", "max_new_tokens", "repetition_penalty", "no_repeat_ngram_size"),
    )
    return {
        name: getattr(generation_config, name)
        for name in shared
        if getattr(generation_config, name, None) != getattr(default, name, None)
    }


def generate_tokens(
    model: Any,
    audio: Any,
    skip: torch.Tensor | None = None,
    synced_gpus: bool = False,
    **overrides: Any,
) -> torch.Tensor:
    """Greedy (``num_beams=1``) or beam-search transcripts of ``audio`` (:class:`AudioEmbeddings`).

    Returns ``(B, N)`` token ids without the end-of-turn token, filled with the pad id. Silent samples
    and those flagged in ``skip (B,)`` get an empty row, without running the LLM unless ``synced_gpus``:
    a model sharded over the ranks (FSDP, DeepSpeed ZeRO-3) needs every rank in every ``generate``
    step, so then the whole batch runs and the flagged rows are emptied afterwards.
    """
    settings = DecodeSettings.from_config(model.config, **overrides)
    active = ~audio.silent.cpu()
    if skip is not None:
        active &= ~skip.bool().cpu()
    rows = active.nonzero().flatten().tolist()
    run = list(range(audio.embeds.shape[0])) if synced_gpus else rows
    results: list[list[int]] = [[] for _ in range(audio.embeds.shape[0])]
    if run:
        subset = audio.select(run)
        limits = settings.limits(subset.seconds.tolist())
        inputs = model.build_inputs(subset, padding_side="left")
        criteria = [SampleLengthLimit(limits)] + ([LoopGuard()] if settings.loop_guard else [])
        processors = []
        if settings.ctc_weight > 0:
            processors.append(
                CTCPrefixScorer(
                    model.ctc_emissions(subset),
                    settings.ctc_weight,
                    settings.num_beams,
                    model.prompt.stop_ids,
                    settings.pre_beam,
                )
            )
        with warnings.catch_warnings():
            # n-gram constraints on the new tokens only, not the prompt of audio embeddings, is what
            # no_repeat_ngram_size means here; transformers warns about it on every call
            warnings.filterwarnings("ignore", message="Passing `no_repeat_ngram_size` with `inputs_embeds`")
            tokens = model.llm.generate(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.attention_mask,
                generation_config=settings.generation_config(model.prompt, max(limits)),
                stopping_criteria=StoppingCriteriaList(criteria),
                logits_processor=LogitsProcessorList(processors),
                synced_gpus=synced_gpus,
            )
        stops = {*model.prompt.stop_ids, model.prompt.pad_id}
        kept = set(rows)
        for row, index, limit in zip(tokens.tolist(), run, limits):
            if index in kept:
                results[index] = _clean(row, stops, limit, settings.loop_guard)
    return pad_sequences(results, model.prompt.pad_id)
