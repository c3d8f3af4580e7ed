"""Whisper decoding with openai-whisper's guards, for Whisper and MagnetWhisper alike.

openai-whisper's ``transcribe`` (Radford et al. 2022, section 4.5) decodes greedily, then retries a
hypothesis at rising temperatures (0.2, 0.4 ... 1.0, sampling) while it is too repetitive (gzip compression
ratio of its text above 2.4) or too unlikely (mean log-probability per token, end-of-text included, below
-1); and it gives an empty transcript when the model's probability of the no-speech token at the first
decoding step is above 0.6 and the hypothesis is unlikely too. We add one retry reason: decoding stopped at
the token cap (a loop whose text the gzip ratio missed), and, as faster-whisper does, a row whose every
attempt failed keeps its likeliest attempt that does not loop rather than the last one.

transformers' Whisper ``generate`` has the same options, but its fallback and no-speech check re-run the
encoder on 30 s input features: they cannot take the compressed, variable-length encoder output of a
MagnetWhisper. Here every step reads a precomputed encoder output, so one implementation serves both
families: ``generate`` for each attempt, then one teacher-forced decoder pass over the hypotheses for their
log-probabilities and no-speech probability (the model's own distribution, before ``generate``'s token
suppression). With the guards off, decoding is one plain ``generate`` call, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.modeling_outputs import ModelOutput

from magnet_asr.text import LOOP_COMPRESSION_RATIO, compression_ratio

FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # openai-whisper's transcribe defaults
LOGPROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6


@dataclass
class DecodingOptions:
    """How a Whisper-family recognizer decodes.

    guards: temperature fallback and the no-speech check (module docstring); off: one greedy (or beam)
        ``generate`` call per batch.
    temperatures: the first is the plain decode (0: greedy, or beam search with ``num_beams > 1``); each
        later one is a sampling retry for the hypotheses that failed a check.
    num_beams: beam width of the temperature-0 attempt.
    seed: the sampling retries draw from a generator seeded with this, so a transcript is reproducible.
    """

    guards: bool = True
    temperatures: tuple[float, ...] = FALLBACK_TEMPERATURES
    compression_ratio_threshold: float | None = LOOP_COMPRESSION_RATIO
    logprob_threshold: float | None = LOGPROB_THRESHOLD
    no_speech_threshold: float | None = NO_SPEECH_THRESHOLD
    num_beams: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self.temperatures = tuple(float(t) for t in self.temperatures)
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures: need one or more values >= 0, got {self.temperatures}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams: must be >= 1, got {self.num_beams}")
        if self.no_speech_threshold is not None and not 0 < self.no_speech_threshold < 1:
            raise ValueError(f"no_speech_threshold: must lie in (0, 1), got {self.no_speech_threshold}")


GREEDY = DecodingOptions(guards=False)


@dataclass
class Decoded:
    """Per row: the text tokens (no prompt, end-of-text or padding), whether decoding stopped at the token
    cap, and (guards on) the mean log-probability, the no-speech probability, the temperature of the kept
    attempt and whether the row was judged silence (its text is then empty)."""

    tokens: list[list[int]]
    hit_token_cap: list[bool]
    avg_logprob: list[float] = field(default_factory=list)
    no_speech_prob: list[float] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    no_speech: list[bool] = field(default_factory=list)


def select_rows(encoder_outputs: ModelOutput, rows: Sequence[int]) -> ModelOutput:
    """A new encoder output of the same class with only ``rows`` (batch-first tensors indexed, any
    non-tensor field such as MagnetWhisper's per-predictor ``boundary_outputs`` dropped: the decoder
    never reads it). A new object every call: ``generate`` expands its tensors in place for beams."""
    hidden = encoder_outputs["last_hidden_state"]
    index = torch.as_tensor(list(rows), dtype=torch.long, device=hidden.device)
    batch = hidden.shape[0]
    kept = {
        k: v.index_select(0, index)
        for k, v in encoder_outputs.items()
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch
    }
    return type(encoder_outputs)(**kept)


def is_multilingual(model: Any) -> bool:
    """Whether a Whisper-family model has language and task tokens (Whisper's rule: the vocabulary size)."""
    from magnet_asr.weights.whisper import MULTILINGUAL_VOCAB

    gen = model.generation_config
    return bool(getattr(gen, "is_multilingual", False)) or int(model.config.vocab_size) >= MULTILINGUAL_VOCAB


def language_and_task(
    model: Any, language: str | None = None, task: str | None = None
) -> tuple[str | None, str | None]:
    """The ``(language, task)`` a model is trained and decoded with: ``(None, None)`` for an English-only
    model (its prompt has neither token); for a multilingual one the arguments, else what its generation
    config names, else English transcription. Training labels and decoding read the same pair, so the
    decoder sees one prompt in both (:func:`decoder_prompt`)."""
    if not is_multilingual(model):
        return None, None
    gen = model.generation_config
    return (
        language or getattr(gen, "language", None) or "en",
        task or getattr(gen, "task", None) or "transcribe",
    )


def decoder_prompt(generation_config: Any, language: str | None = None, task: str | None = None) -> list[int]:
    """The tokens Whisper's ``generate`` starts the decoder with when it predicts no timestamps:
    start-of-transcript, then the language and the task when given (multilingual models,
    :func:`language_and_task`), then no-timestamps. Training labels start with the same tokens."""
    prompt = [int(generation_config.decoder_start_token_id)]
    if language is not None:
        code = language if language.startswith("<|") else f"<|{language}|>"
        languages = getattr(generation_config, "lang_to_id", None) or {}
        if code not in languages:
            raise ValueError(f"language '{language}' is not one of this Whisper's languages")
        prompt.append(int(languages[code]))
    if task is not None:
        tasks = getattr(generation_config, "task_to_id", None) or {}
        if task not in tasks:
            raise ValueError(f"task '{task}' is not one of this Whisper's tasks ({', '.join(sorted(tasks))})")
        prompt.append(int(tasks[task]))
    return [*prompt, int(generation_config.no_timestamps_token_id)]


def no_speech_token(generation_config: Any) -> int:
    """``<|nospeech|>`` (``<|nocaptions|>`` in older vocabularies): the token just before no-timestamps,
    as openai-whisper's tokenizer and transformers' no-speech detection both place it."""
    return int(generation_config.no_timestamps_token_id) - 1


def _stop_ids(generation_config: Any) -> set[int]:
    eos = generation_config.eos_token_id
    ids = {generation_config.pad_token_id, *(eos if isinstance(eos, list) else [eos])}
    return {int(i) for i in ids if i is not None}


def _generate(
    model: Any,
    encoder_outputs: ModelOutput,
    temperature: float,
    max_new_tokens: int,
    options: DecodingOptions,
    generate_kwargs: dict[str, Any],
) -> list[list[int]]:
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, **generate_kwargs}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_k=0, num_beams=1)
    else:
        kwargs["do_sample"] = False
        if options.num_beams > 1:  # else the model's generation config decides, as before
            kwargs["num_beams"] = options.num_beams
    sequences = model.generate(encoder_outputs=encoder_outputs, **kwargs)
    stops = _stop_ids(model.generation_config)
    return [[t for t in row if t not in stops] for row in sequences.tolist()]


@torch.no_grad()
def score_hypotheses(
    model: Any,
    encoder_outputs: ModelOutput,
    prompt: Sequence[int],
    tokens: Sequence[Sequence[int]],
    ended: Sequence[bool],
) -> tuple[list[float], list[float]]:
    """Mean log-probability of each hypothesis and the no-speech probability at the first decoding step,
    from one teacher-forced decoder pass.

    ``tokens[i]``: row ``i``'s text tokens; ``ended[i]``: it ended with end-of-text (False: cut at the token
    cap), whose log-probability then counts too. The sum is divided by ``len(tokens[i]) + 1`` either way,
    as openai-whisper counts."""
    eos = int(model.generation_config.eos_token_id)
    rows = [[*prompt, *t, eos] for t in tokens]
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), eos, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    device = encoder_outputs["last_hidden_state"].device
    logits = model(encoder_outputs=encoder_outputs, decoder_input_ids=ids.to(device), use_cache=False).logits
    log_probs = logits.float().log_softmax(-1)
    no_speech = log_probs[:, 0, no_speech_token(model.generation_config)].exp().tolist()
    start = len(prompt)
    averages = []
    for i, (t, end) in enumerate(zip(tokens, ended)):
        targets = ids[i, start : start + len(t) + int(end)].to(device)
        picked = log_probs[i, start - 1 : start - 1 + len(targets)].gather(-1, targets[:, None])
        averages.append(float(picked.sum()) / (len(t) + 1))
    return averages, no_speech


@dataclass
class _Attempt:
    tokens: list[int]
    capped: bool
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    repetitive: bool  # gzip ratio above the threshold, or cut at the token cap: a loop


def _needs_fallback(attempt: _Attempt, options: DecodingOptions) -> bool:
    if _is_silence(attempt.no_speech_prob, attempt.avg_logprob, options):
        return False
    unlikely = options.logprob_threshold is not None and attempt.avg_logprob < options.logprob_threshold
    return attempt.repetitive or unlikely


def _best(attempts: Sequence[_Attempt], options: DecodingOptions) -> _Attempt:
    """The attempt a row keeps: the first that passed the checks; when none did, the likeliest attempt that
    does not loop, else the likeliest of all (faster-whisper's choice; openai-whisper keeps the last,
    which at temperature 1 is often the worst)."""
    for attempt in attempts:
        if not _needs_fallback(attempt, options):
            return attempt
    no_loop = [a for a in attempts if not a.repetitive]
    return max(no_loop or attempts, key=lambda a: a.avg_logprob)


def _is_silence(no_speech: float, avg: float, options: DecodingOptions) -> bool:
    if options.no_speech_threshold is None or no_speech <= options.no_speech_threshold:
        return False
    return options.logprob_threshold is None or avg < options.logprob_threshold


def decode(
    model: Any,
    encoder_outputs: ModelOutput,
    tokenizer: Any,
    max_new_tokens: int,
    options: DecodingOptions = GREEDY,
    language: str | None = None,
    task: str | None = None,
    attention_mask: torch.Tensor | None = None,
    synced_gpus: bool = False,
) -> Decoded:
    """Decode a batch from its encoder output (``last_hidden_state (B, S, D)``, plus MagnetWhisper's
    ``encoder_attention_mask`` and ``segment_sizes``), with the guards when ``options.guards``.

    ``language``, ``task``: the prompt's (:func:`language_and_task`; None for English-only models).
    ``synced_gpus``: every rank keeps stepping until all have finished, as a model sharded over the
    ranks (FSDP, DeepSpeed ZeRO-3) needs; the guards retry a different number of rows on each rank, so
    they cannot run that way.
    """
    if synced_gpus and options.guards:
        raise ValueError("decoding with guards under a sharded model (synced_gpus): use greedy decoding")
    generate_kwargs: dict[str, Any] = {"language": language, "task": task} if language is not None else {}
    if synced_gpus:
        generate_kwargs["synced_gpus"] = True
    batch = int(encoder_outputs["last_hidden_state"].shape[0])
    everyone = list(range(batch))

    def attempt(rows: list[int], temperature: float) -> list[list[int]]:
        kwargs = dict(generate_kwargs)
        if attention_mask is not None:  # the encoder input's mask, which generate asks for in a batch
            kwargs["attention_mask"] = attention_mask[torch.as_tensor(rows, device=attention_mask.device)]
        return _generate(
            model, select_rows(encoder_outputs, rows), temperature, max_new_tokens, options, kwargs
        )

    if not options.guards:
        tokens = attempt(everyone, options.temperatures[0])
        return Decoded(tokens, [len(t) >= max_new_tokens for t in tokens])

    prompt = decoder_prompt(model.generation_config, language, task)
    tried: list[list[_Attempt]] = [[] for _ in everyone]
    rows = everyone
    device = encoder_outputs["last_hidden_state"].device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(options.seed)
        for temperature in options.temperatures:
            tokens = attempt(rows, temperature)
            caps = [len(t) >= max_new_tokens for t in tokens]
            averages, no_speech = score_hypotheses(
                model, select_rows(encoder_outputs, rows), prompt, tokens, [not c for c in caps]
            )
            for i, t, capped, avg, nsp in zip(rows, tokens, caps, averages, no_speech):
                text = tokenizer.decode(t, skip_special_tokens=True)
                repetitive = capped or (
                    options.compression_ratio_threshold is not None
                    and compression_ratio(text) > options.compression_ratio_threshold
                )
                tried[i].append(_Attempt(t, capped, avg, nsp, temperature, repetitive))
            rows = [i for i in rows if _needs_fallback(tried[i][-1], options)]
            if not rows:
                break
    kept = [_best(attempts, options) for attempts in tried]
    return Decoded(
        tokens=[a.tokens for a in kept],
        hit_token_cap=[a.capped for a in kept],
        avg_logprob=[a.avg_logprob for a in kept],
        no_speech_prob=[a.no_speech_prob for a in kept],
        temperature=[a.temperature for a in kept],
        no_speech=[_is_silence(a.no_speech_prob, a.avg_logprob, options) for a in kept],
    )
