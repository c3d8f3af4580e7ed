import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import WhisperConfig, WhisperForConditionalGeneration

from magnet_asr.models import MagnetWhisper, MagnetWhisperConfig
from tiny import TINY_WHISPER

TINY = TINY_WHISPER
PHONEME = {"variant": "mlp", "prior": 0.3, "target": "phoneme", "loss": ["binomial"]}


def test_no_predictor_learned_positions_equals_hf_whisper(tiny_model, tiny_config):
    torch.manual_seed(0)
    hf = WhisperForConditionalGeneration(WhisperConfig(**TINY)).eval()
    ours = MagnetWhisper(tiny_config()).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(hf.state_dict())
    feats = torch.randn(2, 8, 80)  # the full window: 2 * max_source_positions mel frames
    tokens = torch.randint(3, 64, (2, 7))
    expected = hf(input_features=feats, decoder_input_ids=tokens).logits
    got = ours(input_features=feats, decoder_input_ids=tokens).logits
    assert (expected - got).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"position_encoding": "rope"},
        {"predictor_layers": [1], "predictor_settings": PHONEME},
        {"predictor_layers": [0, 2], "predictor_settings": {**PHONEME, "variant": "cosine"}},
        {
            "predictor_layers": [1],
            "predictor_settings": {**PHONEME, "pooling": "attention"},
            "position_encoding": "rope",
        },
        {"extra_conv_strides": [2]},
    ],
    ids=["plain", "rope", "mlp@1", "cosine@0,2", "attention+rope", "stride2"],
)
def test_padding_and_batch_invariance(settings, ragged_batch, tiny_model, tiny_config):
    model = tiny_model(**settings)
    feats, mask, singles, tokens = ragged_batch
    batched = model(input_features=feats, attention_mask=mask, decoder_input_ids=tokens)
    enc = model.model.encoder(feats, attention_mask=mask)
    for i, single in enumerate(singles):
        alone = model(input_features=single, decoder_input_ids=tokens[i : i + 1])
        torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=2e-5, rtol=1e-4)
        enc_alone = model.model.encoder(single)
        n = int(enc.encoder_attention_mask[i].sum())
        assert n == enc_alone.last_hidden_state.shape[1] == int(enc.frames_after[i])
        torch.testing.assert_close(
            enc.last_hidden_state[i, :n], enc_alone.last_hidden_state[0], atol=2e-5, rtol=1e-4
        )
        assert enc.last_hidden_state[i, n:].abs().max() == 0 if n < enc.last_hidden_state.shape[1] else True


@pytest.mark.parametrize("settings", [{}, {"position_encoding": "rope"}], ids=["plain", "rope"])
def test_encode_prefix_then_suffix_is_the_whole_encoder(settings, ragged_batch, tiny_model):
    encoder = tiny_model(**settings).model.encoder
    feats, mask, _, _ = ragged_batch
    whole = encoder(feats, attention_mask=mask)
    for split in range(len(encoder.layers) + 1):
        prefix = encoder.encode_prefix(feats, mask, num_layers=split)
        out = encoder.encode_suffix(prefix, split)
        torch.testing.assert_close(out.last_hidden_state, whole.last_hidden_state, atol=1e-6, rtol=1e-5)
        assert torch.equal(out.encoder_attention_mask, whole.encoder_attention_mask)
        assert torch.equal(out.frames_before, whole.frames_before)
    with pytest.raises(ValueError, match="layer must be in"):
        encoder.encode_prefix(feats, mask, num_layers=len(encoder.layers) + 1)
    with_predictor = tiny_model(predictor_layers=[1], predictor_settings=PHONEME).model.encoder
    with pytest.raises(ValueError, match="boundary predictors"):
        with_predictor.encode_prefix(feats, mask, num_layers=1)


def test_generate_is_batch_invariant(ragged_batch, tiny_model, tiny_config):
    model = tiny_model(predictor_layers=[1], predictor_settings=PHONEME)
    model.generation_config.decoder_start_token_id = 1
    model.generation_config.eos_token_id = 2
    feats, mask, singles, _ = ragged_batch
    batched = model.generate(input_features=feats, attention_mask=mask, max_new_tokens=6)
    for i, single in enumerate(singles):
        alone = model.generate(input_features=single, max_new_tokens=6)
        assert batched[i, : alone.shape[1]].tolist() == alone[0].tolist()


def test_frame_counts_and_compression(ragged_batch, tiny_model, tiny_config):
    model = tiny_model(predictor_layers=[1], predictor_settings={**PHONEME, "prior": 0.25})
    feats, mask, _, tokens = ragged_batch
    out = model(input_features=feats, attention_mask=mask, decoder_input_ids=tokens)
    assert out.frames_before.tolist() == [30, 22, 12]  # ceil(mel frames / 2)
    assert (out.frames_after <= out.frames_before).all() and (out.frames_after >= 1).all()
    assert out.encoder_attention_mask.sum(1).tolist() == out.frames_after.tolist()


def test_training_loss_has_both_parts_and_gradients_reach_predictor(ragged_batch, tiny_model, tiny_config):
    model = tiny_model(predictor_layers=[1], predictor_settings=PHONEME).train()
    feats, mask, _, tokens = ragged_batch
    labels = tokens.clone()
    labels[2, 4:] = -100
    out = model(
        input_features=feats,
        attention_mask=mask,
        labels=labels,
        target_counts=torch.tensor([[9.0, 6.0, 3.0]]),
    )
    assert out.asr_loss is not None and out.boundary_loss is not None
    torch.testing.assert_close(out.loss, out.asr_loss + out.boundary_loss)
    out.asr_loss.backward()  # the ASR loss alone must reach the predictor (straight-through pooling)
    predictor = model.model.encoder.predictors["1"]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in predictor.parameters())


def test_save_load_round_trip_and_clear_error_on_missing_tensor(
    tmp_path, ragged_batch, tiny_model, tiny_config
):
    model = tiny_model(predictor_layers=[1], predictor_settings=PHONEME, position_encoding="rope")
    feats, mask, _, tokens = ragged_batch
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    loaded = MagnetWhisper.from_pretrained(tmp_path).eval()
    assert loaded.config.predictor_layers == [1] and loaded.config.position_encoding == "rope"
    a = model(input_features=feats, attention_mask=mask, decoder_input_ids=tokens).logits
    b = loaded(input_features=feats, attention_mask=mask, decoder_input_ids=tokens).logits
    assert torch.equal(a, b)

    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("model.encoder.predictors.1.mlp.0.weight")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing_keys: model.encoder.predictors.1.mlp.0.weight"):
        MagnetWhisper.from_pretrained(tmp_path)


def test_mismatched_tensor_is_an_error(tmp_path, tiny_model, tiny_config):
    tiny_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.encoder.layer_norm.weight"] = torch.ones(7)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match="layer_norm"):
        MagnetWhisper.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"position_encoding": "alibi"}, "position_encoding"),
        ({"predictor_layers": [5]}, "predictor_layers"),
        ({"extra_conv_strides": [1]}, "extra_conv_strides"),
    ],
)
def test_config_validation(kw, field, tiny_model, tiny_config):
    with pytest.raises(ValueError, match=field):
        MagnetWhisperConfig(**{**TINY, **kw})


def test_too_long_input_for_learned_positions_is_a_clear_error(tiny_model, tiny_config):
    model = tiny_model()
    with pytest.raises(ValueError, match="learned positions"):
        model.model.encoder(torch.randn(1, 8, 100))


def test_auto_classes_know_magnet_whisper(tmp_path, tiny_model, tiny_config):
    from transformers import AutoConfig, AutoModelForSpeechSeq2Seq

    tiny_model().save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "magnet_whisper"
    assert isinstance(AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path), MagnetWhisper)


def test_post_init_keeps_the_predictors_own_initialization(tiny_model, tiny_config):
    import math

    gumbel = tiny_model(predictor_layers=[1], predictor_settings={**PHONEME, "prior": 0.2})
    bias = gumbel.model.encoder.predictors["1"].mlp[-1].bias
    assert abs(float(bias.detach()) - math.log(0.2 / 0.8)) < 1e-6
    cosine = tiny_model(predictor_layers=[1], predictor_settings={**PHONEME, "variant": "cosine"})
    assert torch.equal(cosine.model.encoder.predictors["1"].q_proj.weight, torch.eye(32))
    strided = tiny_model(extra_conv_strides=[2])
    weight = strided.model.encoder.extra_convs[0].conv.weight
    assert torch.equal(weight[:, :, 0], torch.eye(32) / 2) and torch.equal(weight[:, :, 1], torch.eye(32) / 2)


def test_phone_boundaries_reach_the_first_predictor_only(ragged_batch, tiny_model):
    settings = {**PHONEME, "loss": ["binomial", "phones"], "loss_weights": [1.0, 1.0]}
    model = tiny_model(predictor_layers=[1, 2], predictor_settings=settings).train()
    feats, mask, _, tokens = ragged_batch
    phones = torch.full((3, 30), -1.0)  # 60 mel frames -> 30 stem frames; row 1 and 2 unknown
    phones[0] = 0.0
    phones[0, [4, 9, 17, 29]] = 1.0
    out = model(
        input_features=feats,
        attention_mask=mask,
        labels=tokens,
        target_counts=torch.tensor([[9.0, 6.0, 3.0], [5.0, 4.0, 2.0]]),
        phone_boundaries=phones,
    )
    first, second = out.boundary_outputs
    assert first.losses["phones"].item() > 0
    assert second.losses["phones"].item() == 0.0  # pooled frames: no phone times at that rate
    first.losses["phones"].backward(retain_graph=True)
    predictor = model.model.encoder.predictors["1"]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in predictor.parameters())
