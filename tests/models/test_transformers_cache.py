"""What MagnetWhisper relies on in transformers' key/value cache, pinned so an upgrade that changes it fails here.

transformers 5.24 renamed ``past_key_values`` to ``cache`` (arguments, ``create_causal_mask``, output fields and
what ``generate`` passes); a model that kept the old name got no cache back from ``generate``, decoded every
step from one token, and stopped transcripts after their first word, while every single-pass test still
passed. The RoPE attention also reads Whisper's ``EncoderDecoderCache`` bookkeeping (``is_updated``, the
cross-attention cache's ``layers[i].keys``) to reuse cross-attention keys.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.models.whisper.modeling_whisper import (
    WhisperAttention,
    WhisperDecoderLayer,
    WhisperForConditionalGeneration,
)

from magnet_asr.models.magnet_whisper import CACHE_ARGUMENT

PHONEME = {"variant": "mlp", "prior": 0.3, "target": "phoneme", "loss": ["binomial"]}
SETTINGS = {
    "learned": {},
    "rope": {"position_encoding": "rope"},
    "rope+mlp@1": {"position_encoding": "rope", "predictor_layers": [1], "predictor_settings": PHONEME},
}
STEPS = 6
# Whisper's default init (std 0.02) makes a tiny random decoder repeat one token whatever its context, so
# a decoder that lost its cache would still pass; wider weights make each token depend on the prefix.
WIDE_INIT = 0.5


def test_one_cache_name_across_the_installed_transformers():
    """Layers, masks, ``generate``'s model inputs and outputs all use the name we pass the cache by."""
    for function in (
        WhisperDecoderLayer.forward,
        WhisperAttention.forward,
        WhisperForConditionalGeneration.forward,
        WhisperForConditionalGeneration.prepare_inputs_for_generation,
        create_causal_mask,
    ):
        assert CACHE_ARGUMENT in inspect.signature(function).parameters, function.__qualname__
    assert CACHE_ARGUMENT in {field.name for field in dataclasses.fields(Seq2SeqLMOutput)}


def _reference_greedy(model, feats, mask, steps: int) -> torch.Tensor:
    """Greedy decoding that recomputes the whole prefix each step, without a cache; EOS is never
    chosen, so every row runs ``steps`` steps (``generate`` below is given ``min_new_tokens`` for that)."""
    tokens = torch.full((feats.shape[0], 1), model.generation_config.decoder_start_token_id)
    for _ in range(steps):
        logits = model(
            input_features=feats, attention_mask=mask, decoder_input_ids=tokens, use_cache=False
        ).logits[:, -1]
        logits[:, model.generation_config.eos_token_id] = float("-inf")
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
@torch.inference_mode()
def test_generate_with_the_cache_equals_decoding_without_it(settings, ragged_batch, tiny_model):
    model = tiny_model(init_std=WIDE_INIT, **settings)
    feats, mask, _, _ = ragged_batch
    expected = _reference_greedy(model, feats, mask, STEPS)
    got = model.generate(
        input_features=feats, attention_mask=mask, max_new_tokens=STEPS, min_new_tokens=STEPS
    )
    assert got[:, -STEPS:].tolist() == expected[:, -STEPS:].tolist()


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
@torch.inference_mode()
def test_step_by_step_logits_equal_one_pass_under_either_cache_name(name, settings, ragged_batch, tiny_model):
    """Our forward takes the cache by either name and hands it back in the installed output field."""
    model = tiny_model(init_std=WIDE_INIT, **settings)
    feats, mask, _, tokens = ragged_batch
    encoded = model.model.encoder(feats, attention_mask=mask)
    full = model(encoder_outputs=encoded, decoder_input_ids=tokens, use_cache=False).logits
    cache = None
    for step in range(tokens.shape[1]):
        out = model(
            encoder_outputs=encoded,
            decoder_input_ids=tokens[:, step : step + 1],
            use_cache=True,
            **{name: cache},
        )
        cache = getattr(out, CACHE_ARGUMENT)
        assert cache is not None
        torch.testing.assert_close(out.logits[:, 0], full[:, step], atol=2e-5, rtol=1e-4)
    assert cache.get_seq_length() == tokens.shape[1]


def test_both_cache_names_at_once_is_an_error(ragged_batch, tiny_model):
    model = tiny_model()
    feats, _, _, tokens = ragged_batch
    first = model(input_features=feats, decoder_input_ids=tokens[:, :1], use_cache=True)
    cache = getattr(first, CACHE_ARGUMENT)
    with pytest.raises(ValueError, match="not both"):
        model(input_features=feats, decoder_input_ids=tokens[:, 1:2], cache=cache, past_key_values=cache)


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
@torch.inference_mode()
def test_cross_attention_keys_are_computed_once_per_generate(settings, ragged_batch, tiny_model):
    """``EncoderDecoderCache.is_updated`` marks a layer's cross-attention keys as cached after the first
    step; Whisper's attention and our RoPE attention both read them back instead of recomputing."""
    model = tiny_model(init_std=WIDE_INIT, **settings)
    feats, mask, _, _ = ragged_batch
    calls = [0]

    def count(*_):
        calls[0] += 1

    hooks = [layer.encoder_attn.k_proj.register_forward_hook(count) for layer in model.model.decoder.layers]
    try:
        model.generate(input_features=feats, attention_mask=mask, max_new_tokens=STEPS, min_new_tokens=STEPS)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls[0] == len(model.model.decoder.layers)
