"""Guarded Whisper decoding (temperature fallback, no-speech check) on a tiny random MagnetWhisper."""

from __future__ import annotations

import pytest
import torch

from magnet_asr.models import MagnetWhisper, MagnetWhisperConfig
from magnet_asr.models.whisper_generation import (
    DecodingOptions,
    _Attempt,
    _best,
    _is_silence,
    _needs_fallback,
    decode,
    decoder_prompt,
    score_hypotheses,
    select_rows,
)
from tiny import TINY_WHISPER

NO_TIMESTAMPS = 63  # the tiny vocabulary's last id; no-speech is the one before it


class _Tokenizer:
    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(str(t) for t in tokens)


def _model(seed: int = 0) -> MagnetWhisper:
    torch.manual_seed(seed)
    model = MagnetWhisper(MagnetWhisperConfig(**TINY_WHISPER)).eval()
    gen = model.generation_config
    gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id = 1, 2, 0
    gen.no_timestamps_token_id = NO_TIMESTAMPS
    return model


def _encoded(model: MagnetWhisper, batch: int = 3):
    torch.manual_seed(1)
    return model.encode(torch.randn(batch, 8, 40), torch.ones(batch, 40, dtype=torch.long))


@torch.no_grad()
def test_scores_are_the_log_probs_generate_decoded_with():
    """The teacher-forced pass with decoder_prompt reproduces generate's own raw logits: the prompt is the
    one generate starts from, and the end-of-text counts only where the hypothesis ended."""
    model = _model()
    encoded = _encoded(model, 2)
    out = model.generate(
        encoder_outputs=select_rows(encoded, [0, 1]),
        max_new_tokens=6,
        return_dict_in_generate=True,
        output_logits=True,
    )
    prompt = decoder_prompt(model.generation_config)
    assert out.sequences[:, : len(prompt)].tolist() == [prompt, prompt]
    tokens = [[t for t in row if t not in (0, 2)] for row in out.sequences[:, len(prompt) :].tolist()]
    ended = [len(t) < 6 for t in tokens]
    averages, no_speech = score_hypotheses(model, select_rows(encoded, [0, 1]), prompt, tokens, ended)
    log_probs = torch.stack(out.logits, 1).float().log_softmax(-1)
    for i, t in enumerate(tokens):
        targets = torch.tensor(t + ([2] if ended[i] else []))
        expected = log_probs[i, : len(targets)].gather(-1, targets[:, None]).sum().item() / (len(t) + 1)
        assert averages[i] == pytest.approx(expected, abs=1e-5)
    assert all(0 < p < 1 for p in no_speech)


def test_sharded_decoding_passes_synced_gpus_and_refuses_the_guards(monkeypatch):
    """Under FSDP / ZeRO-3 every rank must step ``generate`` until all are done (``synced_gpus``); the
    guards retry a different number of rows per rank, so they are refused there."""
    from magnet_asr.models.whisper_generation import GREEDY

    model = _model()
    encoded = _encoded(model, 2)
    calls = []

    def recording(**kwargs):
        calls.append(kwargs.get("synced_gpus"))
        return torch.full((2, 3), 5)

    monkeypatch.setattr(model, "generate", recording)
    decode(model, encoded, _Tokenizer(), 4, GREEDY, synced_gpus=True)
    decode(model, encoded, _Tokenizer(), 4, GREEDY)
    assert calls == [True, None]
    with pytest.raises(ValueError, match="synced_gpus"):
        decode(model, encoded, _Tokenizer(), 4, DecodingOptions(), synced_gpus=True)


def test_fallback_retries_looping_rows_at_every_temperature_and_is_reproducible(monkeypatch):
    model = _model()
    encoded = _encoded(model)
    options = DecodingOptions(temperatures=(0.0, 0.5, 1.0))
    batches = []
    generate = model.generate

    def counting(**kwargs):
        batches.append(kwargs["encoder_outputs"].last_hidden_state.shape[0])
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", counting)
    # a random model never ends: every attempt hits the 4-token cap, so every row is retried to the end
    first = decode(model, encoded, _Tokenizer(), 4, options)
    assert batches == [3, 3, 3]
    assert first.hit_token_cap == [True] * 3
    assert all(t in options.temperatures for t in first.temperature)
    assert all(len(t) == 4 for t in first.tokens)
    again = decode(model, encoded, _Tokenizer(), 4, options)
    assert again.tokens == first.tokens  # the sampling retries draw from a seeded generator
    other_seed = decode(
        model, encoded, _Tokenizer(), 4, DecodingOptions(temperatures=(0.0, 0.5, 1.0), seed=1)
    )
    assert other_seed.tokens != first.tokens
    # the guards left the global random state alone
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    decode(model, encoded, _Tokenizer(), 4, options)
    assert torch.equal(torch.rand(1), expected)


def test_guards_off_is_one_plain_generate():
    model = _model()
    encoded = _encoded(model)
    got = decode(model, encoded, _Tokenizer(), 4, DecodingOptions(guards=False))
    plain = model.generate(encoder_outputs=select_rows(encoded, range(3)), max_new_tokens=4, do_sample=False)
    assert got.tokens == [[t for t in row if t not in (0, 2)] for row in plain.tolist()]
    assert got.avg_logprob == [] and got.no_speech == []


def test_a_confident_greedy_hypothesis_is_kept():
    model = _model()
    encoded = _encoded(model)

    def sure_to_end(module, inputs, logits):  # end-of-text at once, with probability ~1
        logits[..., 2] += 50.0
        return logits

    model.proj_out.register_forward_hook(sure_to_end)
    got = decode(model, encoded, _Tokenizer(), 4, DecodingOptions())
    assert got.tokens == [[]] * 3 and got.hit_token_cap == [False] * 3
    assert got.temperature == [0.0] * 3 and got.no_speech == [False] * 3
    assert all(avg > -1e-3 for avg in got.avg_logprob)


def _attempt(avg: float, no_speech: float = 0.1, repetitive: bool = False, temperature: float = 0.0):
    return _Attempt([7], False, avg, no_speech, temperature, repetitive)


def test_fallback_and_silence_rules_follow_openai_whisper():
    options = DecodingOptions()
    assert not _needs_fallback(_attempt(-0.3), options)
    assert _needs_fallback(_attempt(-1.5), options)  # unlikely
    assert _needs_fallback(_attempt(-0.1, repetitive=True), options)  # gzip ratio > 2.4 or the token cap
    # likely no speech and an unlikely hypothesis: silence, kept (and emptied), not retried
    assert _is_silence(0.9, -1.5, options) and not _needs_fallback(_attempt(-1.5, no_speech=0.9), options)
    # a likely hypothesis overrides the no-speech probability
    assert not _is_silence(0.9, -0.5, options)
    assert not _is_silence(0.5, -1.5, options)


def test_a_row_keeps_the_first_passing_attempt_else_its_likeliest_that_does_not_loop():
    options = DecodingOptions()
    passing = _attempt(-0.5, temperature=0.4)
    assert _best([_attempt(-1.5), passing, _attempt(-0.2, temperature=0.6)], options) is passing
    likeliest = _attempt(-1.2, temperature=0.2)
    failed = [_attempt(-1.4), likeliest, _attempt(-0.3, repetitive=True), _attempt(-2.0, temperature=1.0)]
    assert _best(failed, options) is likeliest
    loops = [_attempt(-0.9, repetitive=True), _attempt(-0.4, repetitive=True)]
    assert _best(loops, options) is loops[1]


def test_select_rows_indexes_tensors_and_drops_per_predictor_tuples():
    model = MagnetWhisper(
        MagnetWhisperConfig(
            **TINY_WHISPER,
            predictor_layers=[1],
            predictor_settings={"variant": "mlp", "prior": 0.3, "target": "phoneme", "loss": ["binomial"]},
        )
    ).eval()
    encoded = _encoded(model)
    picked = select_rows(encoded, [2, 0])
    assert torch.equal(picked.last_hidden_state, encoded.last_hidden_state[[2, 0]])
    assert torch.equal(picked.encoder_attention_mask, encoded.encoder_attention_mask[[2, 0]])
    assert picked.boundary_outputs is None and encoded.boundary_outputs is not None


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="num_beams"):
        DecodingOptions(num_beams=0)
    with pytest.raises(ValueError, match="temperatures"):
        DecodingOptions(temperatures=())
    with pytest.raises(ValueError, match="no_speech_threshold"):
        DecodingOptions(no_speech_threshold=1.5)
