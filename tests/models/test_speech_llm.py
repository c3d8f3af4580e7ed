"""SpeechLLM on tiny random models: prompts, invariance, trainable parts, save/load, decoding."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from magnet_asr.models.processing_speech_llm import AUDIO_TOKEN, ChatPrompt, prepare_tokenizer
from magnet_asr.models.projector import merge_ctc_spikes
from magnet_asr.models.speech_llm import ADAPTER_FOLDER, SpeechLLM, build_speech_llm, read_weights
from tiny import TINY_LLAMA
from tiny import TINY_WHISPER as TINY

TINY_WHISPER = {**TINY, "decoder_layers": 1}
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = [
    "system",
    "user",
    "assistant",
    "transcribe",
    "the",
    "audio",
    ".",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "hello",
    "world",
    "yes",
    "no",
    "one",
    "two",
]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PHONEME = {"variant": "mlp", "prior": 0.4, "target": "fixed", "loss": ["binomial"]}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>"
    )
    tokenizer.add_tokens(["<|im_start|>"], special_tokens=True)
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny random Whisper checkpoint and a tiny random Llama checkpoint (+ tokenizer) on disk."""
    root = tmp_path_factory.mktemp("speech_llm_sources")
    torch.manual_seed(0)
    WhisperForConditionalGeneration(WhisperConfig(**TINY_WHISPER)).save_pretrained(root / "whisper")
    tokenizer = tiny_tokenizer()
    llm_config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=3, **TINY_LLAMA)
    LlamaForCausalLM(llm_config).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    return str(root / "whisper"), str(root / "llm")


def build(sources, seed: int = 0, **settings) -> SpeechLLM:
    torch.manual_seed(seed)
    settings.setdefault("projector_stack", 3)
    settings.setdefault("projector_hidden_size", 48)
    settings.setdefault("lora_rank", 4)
    model, _ = build_speech_llm(*sources, tokenizer=prepare_tokenizer(tiny_tokenizer()), **settings)
    return model.eval()


def randomize(model: SpeechLLM, seed: int = 1) -> SpeechLLM:
    """Give zero-initialized LoRA B matrices and the near-constant predictors real values (as after
    training), so every part affects the output and boundaries vary between frames."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
        for predictor in model.encoder.predictors.values():
            predictor.mlp[-1].weight.normal_(0, 1.0)
            predictor.mlp[-1].bias.zero_()
    return model


def ragged(lengths=(61, 44, 23), seed: int = 2):
    """Mel features of different lengths zero-padded into one batch, their mask, and each alone."""
    torch.manual_seed(seed)
    feats = torch.zeros(len(lengths), 8, max(lengths))
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    singles = []
    for i, n in enumerate(lengths):
        f = torch.randn(8, n)
        feats[i, :, :n], mask[i, :n] = f, 1
        singles.append(f[None])
    return feats, mask, singles


def response_ids(model: SpeechLLM, texts):
    tokenizer = prepare_tokenizer(tiny_tokenizer())
    return [model.prompt.response_ids(tokenizer, t) for t in texts]


def padded(rows):
    longest = max(len(r) for r in rows)
    return torch.tensor([r + [-100] * (longest - len(r)) for r in rows])


WITH_PREDICTOR = {"encoder_settings": {"predictor_layers": [1], "predictor_settings": PHONEME}}
VARIANTS = pytest.mark.parametrize("settings", [{}, WITH_PREDICTOR], ids=["stack", "predictor+stack"])


def test_chat_prompt_renders_the_template_around_one_audio_slot():
    tokenizer = prepare_tokenizer(tiny_tokenizer())
    prompt = ChatPrompt.from_tokenizer(tokenizer, "transcribe the audio .", system_prompt="hello")
    assert (
        tokenizer.decode(prompt.prefix_ids)
        == "<|im_start|> system hello <|im_end|> <|im_start|> user transcribe the audio ."
    )
    assert tokenizer.decode(prompt.suffix_ids) == "<|im_end|> <|im_start|> assistant"
    assert prompt.end_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert prompt.response_ids(tokenizer, "a cat")[-1] == prompt.end_id
    plain = tiny_tokenizer()
    plain.chat_template = None
    fallback = ChatPrompt.from_tokenizer(prepare_tokenizer(plain), "transcribe")
    assert fallback.end_id == plain.eos_token_id and fallback.audio_token_id == len(plain) - 1


@VARIANTS
def test_audio_tokens_equal_projector_output_for_each_sample(sources, settings):
    model = randomize(build(sources, **settings))
    tokenizer = prepare_tokenizer(tiny_tokenizer())
    feats, mask, singles = ragged()
    inputs = model.build_inputs(model.embed_audio(feats, mask))
    for i, single in enumerate(singles):
        alone = model.encoder(single).last_hidden_state
        expected = model.projector(alone)[0].shape[1]
        real = inputs.input_ids[i][inputs.attention_mask[i].bool()]
        assert int((real == model.prompt.audio_token_id).sum()) == expected
        assert tokenizer.decode(real).count(AUDIO_TOKEN) == expected
        if not settings:  # stacking only: ceil(ceil(T / 2) / k) for T mel frames
            assert expected == math.ceil(math.ceil(single.shape[-1] / 2) / 3)
    counts = [int((r == model.prompt.audio_token_id).sum()) for r in inputs.input_ids]
    assert len(set(counts)) > 1  # the samples really differ


def test_labels_cover_only_transcript_and_end_of_turn(sources):
    model = build(sources)
    feats, mask, _ = ragged()
    responses = response_ids(model, ["a cat sat", "hello", "one two"])
    train = model.build_inputs(model.embed_audio(feats, mask), responses)
    gen = model.build_inputs(model.embed_audio(feats, mask), padding_side="left")
    for i, response in enumerate(responses):
        labelled = train.labels[i][train.labels[i] != -100].tolist()
        assert labelled == response and labelled[-1] == model.prompt.end_id
        length = int(train.attention_mask[i].sum())
        assert (train.labels[i, length - len(response) : length] != -100).all()
        # the prompt in training is the generation prompt, token for token
        assert (
            train.input_ids[i, : length - len(response)].tolist()
            == gen.input_ids[i][gen.attention_mask[i].bool()].tolist()
        )


def test_loss_is_next_token_cross_entropy_on_response_tokens_only(sources):
    model = randomize(build(sources))
    feats, mask, _ = ragged()
    responses = response_ids(model, ["a cat sat on mat", "hello", "one two"])
    trained = model(feats, mask, labels=padded(responses))
    inputs = model.build_inputs(model.embed_audio(feats, mask), responses)
    full = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
    losses = []
    for i, response in enumerate(responses):
        end = int(trained.attention_mask[i].sum())
        start = end - len(response)  # logits at positions start-1 .. end-2 predict the response
        losses.append(
            torch.nn.functional.cross_entropy(
                full[i, start - 1 : end - 1], torch.tensor(response), reduction="sum"
            )
        )
    expected = torch.stack(losses).sum() / sum(len(r) for r in responses)
    torch.testing.assert_close(trained.asr_loss, expected, atol=1e-5, rtol=1e-5)
    assert trained.logits.shape[1] < full.shape[1]  # the LM head ran on the response window only


@VARIANTS
def test_logits_do_not_depend_on_padding_or_batch(sources, settings):
    model = randomize(build(sources, **settings))
    feats, mask, singles = ragged()
    batched = model(feats, mask)
    for i, single in enumerate(singles):
        alone = model(single)
        n = alone.logits.shape[1]
        assert int(batched.attention_mask[i].sum()) == n
        torch.testing.assert_close(batched.logits[i, :n], alone.logits[0], atol=2e-5, rtol=1e-4)


def test_frozen_parts_get_no_gradient_and_trained_parts_all_do(sources):
    model = randomize(build(sources, **WITH_PREDICTOR)).train()
    feats, mask, _ = ragged()
    out = model(feats, mask, labels=padded(response_ids(model, ["a cat", "the dog sat", "yes"])))
    assert out.boundary_loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    kinds = {"projector": "projector.", "predictor": "encoder.predictors.", "lora": "lora_"}
    assert all(any(k in n for k in kinds.values()) for n in trained)
    assert all(any(k in n for n in trained) for k in kinds.values())
    for name, param in model.named_parameters():
        if name in trained:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_finetune_modes_set_what_trains(sources):
    full = build(sources, llm_finetune="full", freeze_encoder=False)
    frozen = build(sources, llm_finetune="frozen")
    assert all(p.requires_grad for n, p in full.llm.named_parameters())
    assert all(p.requires_grad for n, p in full.encoder.named_parameters() if "embed_positions" not in n)
    assert {n.split(".")[0] for n, p in frozen.named_parameters() if p.requires_grad} == {"projector"}
    assert not any("lora_" in n for n, _ in frozen.named_parameters())


def test_full_finetune_with_frozen_embeddings_trains_all_but_the_vocabulary_tables(sources, tmp_path):
    from safetensors import safe_open

    model = randomize(build(sources, llm_finetune="full", llm_freeze_embeddings=True)).train()
    table = model.llm.get_input_embeddings().weight
    assert table is model.llm.get_output_embeddings().weight  # tied, so both names stay pretrained
    out = model(*ragged()[:2], labels=padded(response_ids(model, ["a cat", "the dog sat", "yes"])))
    out.loss.backward()
    assert not table.requires_grad and table.grad is None
    layers = [p for n, p in model.llm.named_parameters() if ".layers." in n]
    assert layers and all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in layers)
    model.eval().save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert "llm.model.layers.0.mlp.up_proj.weight" in saved
    assert not saved & {"llm.model.embed_tokens.weight", "llm.lm_head.weight"}
    loaded = SpeechLLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.llm.get_input_embeddings().weight, table)
    assert loaded.llm.get_output_embeddings().weight is loaded.llm.get_input_embeddings().weight
    feats, mask, _ = ragged()
    torch.testing.assert_close(loaded(feats, mask).logits, model(feats, mask).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    "settings",
    [WITH_PREDICTOR, {"llm_finetune": "full"}, {"projector_num_layers": 1, "projector_num_heads": 4}],
    ids=["lora+predictor", "full", "projector-layers"],
)
def test_save_load_round_trip_is_identical(sources, settings, tmp_path):
    from safetensors import safe_open

    model = randomize(build(sources, **settings))
    with torch.no_grad():
        model.projector.linear_out.bias.add_(0.5)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved and all(model.is_saved_key(k) for k in saved)
    if "llm_finetune" not in settings:
        assert not any(k.startswith("llm.") and "lora_" not in k for k in saved)
        assert not any(k.startswith("encoder.") and ".predictors." not in k for k in saved)
    loaded = SpeechLLM.from_pretrained(tmp_path)
    # local frozen parts travel with the saved model (issue 13: no absolute path in a saved file)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["encoder_name"], config["llm_name"]) == ("sources/encoder", "sources/llm")
    assert loaded.config.llm_name == str((tmp_path / "sources" / "llm").resolve())
    feats, mask, _ = ragged()
    torch.testing.assert_close(loaded(feats, mask).logits, model(feats, mask).logits, atol=0, rtol=0)
    assert torch.equal(loaded.generate(feats, mask), model.generate(feats, mask))
    # what Trainer does on resume: a non-strict load of the saved tensors reports nothing missing
    assert loaded.load_state_dict(read_weights(tmp_path), strict=False).missing_keys == []


def test_lora_is_saved_as_peft_adapter_files_that_peft_loads_on_the_base_llm(sources, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = randomize(build(sources))
    model.save_pretrained(tmp_path)
    adapter = tmp_path / ADAPTER_FOLDER
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter_config.json").exists()  # transformers would take DIR for an adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    # a local LLM is copied into the model (sources/llm), not named by this machine's path
    assert config["base_model_name_or_path"] is None and config["r"] == 4
    peft_llm = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(sources[1]), str(adapter)
    ).eval()
    ids = torch.randint(4, 20, (2, 7))
    torch.testing.assert_close(peft_llm(input_ids=ids).logits, model.llm(input_ids=ids).logits)
    # and the adapters do something: without them the logits differ
    plain = AutoModelForCausalLM.from_pretrained(sources[1]).eval()
    assert not torch.allclose(plain(input_ids=ids).logits, model.llm(input_ids=ids).logits)


def test_a_saved_model_with_local_sources_loads_after_a_move_without_them(sources, tmp_path):
    import shutil

    model = randomize(build(sources))
    model.save_pretrained(tmp_path / "saved")
    copies = tmp_path / "copies"
    shutil.copytree(tmp_path / "saved", copies / "first")
    # its sources are deleted in effect: they load from the copy, never from the old place
    shutil.move(str(copies / "first"), str(copies / "moved"))
    for path in (copies / "moved").rglob("*"):
        if path.is_file() and path.suffix in {".json", ".md", ".txt"}:
            text = path.read_text()
            assert str(tmp_path) not in text and sources[0] not in text and sources[1] not in text, path
    loaded = SpeechLLM.from_pretrained(copies / "moved")
    assert loaded.config.encoder_name.startswith(str((copies / "moved").resolve()))
    feats, mask, _ = ragged()
    torch.testing.assert_close(loaded(feats, mask).logits, model(feats, mask).logits, atol=0, rtol=0)
    # saved again elsewhere, it copies its sources again: the second directory stands alone too
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["llm_name"] == "sources/llm"
    assert (tmp_path / "again" / "sources" / "llm" / "model.safetensors").is_file()
    # and saving into the directory it was loaded from keeps its sources where they are
    loaded.save_pretrained(copies / "moved")
    assert (copies / "moved" / "sources" / "encoder" / "config.json").is_file()


def test_merged_model_gives_the_same_outputs_without_lora_and_reloads(sources, tmp_path):
    model = randomize(build(sources))
    merged = model.merged()
    assert merged.config.llm_finetune == "full"
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    feats, mask, _ = ragged()
    torch.testing.assert_close(merged(feats, mask).logits, model(feats, mask).logits, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path)
    assert not (tmp_path / ADAPTER_FOLDER).exists()
    loaded = SpeechLLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(feats, mask).logits, merged(feats, mask).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="nothing to merge"):
        loaded.merged()


def test_export_merge_command_writes_a_loadable_merged_model(sources, tmp_path, capsys):
    from magnet_asr.cli import main

    model = randomize(build(sources))
    model.save_pretrained(tmp_path / "lora")
    assert main(["export", str(tmp_path / "lora"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    merged = SpeechLLM.from_pretrained(tmp_path / "merged")
    assert merged.config.llm_finetune == "full"
    feats, mask, _ = ragged()
    torch.testing.assert_close(merged(feats, mask).logits, model(feats, mask).logits, atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    assert main(["export", sources[0], "--merge", "--out", str(tmp_path / "x")]) == 2
    assert "only a SpeechLLM" in capsys.readouterr().err


def test_greedy_generation_is_batch_invariant_and_beam_search_runs(sources):
    model = randomize(build(sources, **WITH_PREDICTOR)).double()
    feats, mask, singles = ragged()
    batched = model.generate(feats.double(), mask)
    for i, single in enumerate(singles):
        alone = model.generate(single.double())[0].tolist()
        row = batched[i].tolist()[: len(alone)]
        assert row == alone and all(t == model.prompt.pad_id for t in batched[i].tolist()[len(alone) :])
    beams = model.generate(feats.double(), mask, num_beams=3)
    assert beams.shape[0] == 3 and torch.equal(model.generate(feats.double(), mask, num_beams=1), batched)


def test_silent_or_skipped_audio_gives_empty_output_without_the_llm(sources):
    model = build(sources)
    feats, mask, _ = ragged()
    feats[1] = -1.5  # digital silence: Whisper log-mel of zeros is constant
    calls = []
    handle = model.llm.register_forward_hook(lambda m, i, o: calls.append(o.logits.shape[0]))
    tokens = model.generate(feats, mask, skip=torch.tensor([False, False, True]))
    handle.remove()
    assert (tokens[1:] == model.prompt.pad_id).all()
    assert calls and set(calls) == {1}  # only the one audible sample reached the LLM


def test_synced_generation_runs_every_row_and_still_empties_the_skipped(sources, monkeypatch):
    """Under FSDP / ZeRO-3 every rank must run ``generate`` whatever its rows hold: silent and skipped
    rows go through the LLM with the rest, and their outputs are emptied after."""
    model = build(sources)
    feats, mask, _ = ragged()
    feats[1] = -1.5
    skip = torch.tensor([False, False, True])
    plain = model.generate(feats, mask, skip=skip)
    generate, synced, rows = model.llm.generate, [], []

    def recording(**kwargs):
        synced.append(kwargs.pop("synced_gpus"))  # one process: nothing to synchronize with
        rows.append(kwargs["inputs_embeds"].shape[0])
        return generate(**kwargs)

    monkeypatch.setattr(model.llm, "generate", recording)
    tokens = model.generate(feats, mask, skip=skip, synced_gpus=True)
    assert synced == [True] and rows == [3]
    assert (tokens[1:] == model.prompt.pad_id).all() and (plain[1:] == model.prompt.pad_id).all()


def test_length_cap_and_loop_guard(sources):
    model = build(sources)
    feats, mask, _ = ragged()
    word = prepare_tokenizer(tiny_tokenizer()).convert_tokens_to_ids("cat")
    bias = torch.zeros(model.llm.config.vocab_size)
    bias[word] = 100.0  # make the LLM loop on one token
    handle = model.llm.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    guarded = model.generate(feats, mask)
    unguarded = model.generate(
        feats, mask, loop_guard=False, max_new_tokens_per_second=0, max_new_tokens_floor=5
    )
    handle.remove()
    assert guarded[:, 0].tolist() == [word] * 3 and (guarded[:, 1:] == model.prompt.pad_id).all()
    assert unguarded.tolist() == [[word] * 5] * 3


def test_no_repeat_ngram_holds_in_the_transcript_without_a_warning(sources):
    import warnings

    model = build(sources)
    feats, mask, _ = ragged()
    word = prepare_tokenizer(tiny_tokenizer()).convert_tokens_to_ids("cat")
    bias = torch.zeros(model.llm.config.vocab_size)
    bias[word] = 100.0  # the LLM would say "cat" forever
    handle = model.llm.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = model.generate(
            feats,
            mask,
            no_repeat_ngram_size=2,
            loop_guard=False,
            max_new_tokens_per_second=0,
            max_new_tokens_floor=6,
        )
    handle.remove()
    assert not [
        w for w in caught if "no_repeat_ngram_size" in str(w.message)
    ]  # `transcribe` prints only text
    for row in tokens.tolist():
        pairs = list(zip(row, row[1:]))
        assert row[:2] == [word, word] and len(set(pairs)) == len(pairs)


def test_trim_loop_keeps_one_copy_and_leaves_real_text():
    from magnet_asr.models.speech_llm_generation import loop_start, trim_loop

    assert trim_loop([1, 2, 3] + [4, 5] * 6) == [1, 2, 3, 4, 5]
    assert trim_loop([9] * 12) == [9]
    assert trim_loop([1, 2, 3, 4] * 3) == [1, 2, 3, 4]
    assert trim_loop([7, 7, 7, 1, 2, 1, 2]) == [7, 7, 7, 1, 2, 1, 2]
    assert loop_start([9] * 11) is None


def test_encoder_cache_serves_a_frozen_encoder_without_predictors(sources):
    model = build(sources).train()
    assert build(sources, **WITH_PREDICTOR).encoder_cache is None
    feats, mask, _ = ragged()
    labels = padded(response_ids(model, ["a", "b", "hello"]))
    calls = []
    model.encoder.register_forward_hook(lambda m, i, o: calls.append(1))
    keys = ["u1", "u2", "u3"]
    first = model(feats, mask, labels=labels, cache_keys=keys)
    second = model(feats[[2, 0]], mask[[2, 0]], labels=labels[[2, 0]], cache_keys=["u3", "u1"])
    assert len(calls) == 1 and len(model.encoder_cache.entries) == 3
    again = model(feats, mask, labels=labels, cache_keys=keys)
    torch.testing.assert_close(again.loss, first.loss)
    assert torch.isfinite(second.loss)


def test_top_encoder_layers_train_on_the_cached_frozen_layers(sources, tmp_path):
    """encoder_train_layers=1: the last layer and the final norm train (and are saved), the frozen
    layers below run once per utterance, and the output is the one the whole encoder gives."""
    model = randomize(build(sources, encoder_train_layers=1, lora_dropout=0.0)).train()
    last = len(model.encoder.layers) - 1
    top = (f"encoder.layers.{last}.", "encoder.layer_norm.")
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")}
    assert trained and all(n.startswith(top) for n in trained)
    assert any(n.startswith(top[0]) for n in trained) and any(n.startswith(top[1]) for n in trained)
    assert model.encoder.layers[last].training and not model.encoder.layers[0].training
    feats, mask, _ = ragged()
    labels = padded(response_ids(model, ["a cat", "the dog sat", "yes"]))
    calls = []
    model.encoder.register_forward_hook(lambda m, i, o: calls.append("whole"))
    model.encoder.layers[0].register_forward_hook(lambda m, i, o: calls.append("layer0"))
    keys = ["u1", "u2", "u3"]
    first = model(feats, mask, labels=labels, cache_keys=keys)
    first.loss.backward()
    for name, param in model.named_parameters():
        if name in trained:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        elif name.startswith("encoder."):
            assert param.grad is None, name
    again = model(feats, mask, labels=labels, cache_keys=keys)
    assert calls == ["layer0"]  # the cache served the second pass; the whole encoder never ran
    torch.testing.assert_close(again.loss, first.loss)
    model.eval()
    with torch.no_grad():
        model.encoder.layers[last].fc2.bias.add_(0.3)  # as after training: a saved, changed top layer
        direct = model.encoder(feats, attention_mask=mask).last_hidden_state
        via_cache = model._encode(feats, mask, None, keys).last_hidden_state
    torch.testing.assert_close(via_cache, direct, atol=1e-5, rtol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = SpeechLLM.from_pretrained(tmp_path)
    saved = set(read_weights(tmp_path))
    assert {n for n in saved if n.startswith("encoder.")} == trained
    torch.testing.assert_close(loaded(feats, mask).logits, model(feats, mask).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"encoder_train_layers": 1, "freeze_encoder": False}, "needs freeze_encoder"),
        ({"encoder_train_layers": 1, **WITH_PREDICTOR}, "no predictor_layers"),
        ({"encoder_train_layers": 99}, "the encoder has"),
        ({"encoder_train_layers": -1}, ">= 0"),
    ],
)
def test_encoder_train_layers_is_checked(sources, settings, message):
    with pytest.raises(ValueError, match=message):
        build(sources, **settings)


def test_collator_and_recognizer(sources):
    import numpy as np

    from magnet_asr.data.llm_collator import SpeechLLMCollator
    from magnet_asr.evaluation.decode import SpeechLLMRecognizer

    model = build(sources)
    tokenizer = prepare_tokenizer(tiny_tokenizer())
    rng = np.random.default_rng(0)
    noise = [rng.normal(0, 0.1, n).astype(np.float32) for n in (8000, 5000)]
    collator = SpeechLLMCollator(tokenizer, model.prompt, n_mels=8)
    batch = collator(
        [{"id": "a", "text": "a cat", "audio": noise[0]}, {"id": "b", "text": "x", "error": "bad"}]
    )
    assert batch["num_skipped"] == 1 and batch["cache_keys"] == ["a:8000"]
    assert batch["labels"].tolist() == [model.prompt.response_ids(tokenizer, "a cat")]
    assert torch.isfinite(model(**{k: v for k, v in batch.items() if k != "num_skipped"}).loss)

    recognizer = SpeechLLMRecognizer(model, tokenizer)
    silent, empty = np.zeros(4000, np.float32), np.zeros(0, np.float32)
    results = recognizer.transcribe([noise[0], silent, noise[1], empty])
    assert results[1].text == "" and results[3].text == "" and results[3].compressed_frames == 0
    assert [r.encoder_frames for r in results[:3]] == [25, 13, 16]
    assert [r.compressed_frames for r in results[:3]] == [9, 5, 6]
    alone = recognizer.transcribe([noise[1]])[0]
    assert alone.text == results[2].text


def test_recognizer_window_comes_from_the_decoding_settings(sources, monkeypatch):
    import numpy as np

    from magnet_asr.evaluation import decode
    from magnet_asr.evaluation.decode import SpeechLLMRecognizer, pause_windows, transcribe_long

    tokenizer = prepare_tokenizer(tiny_tokenizer())
    model = build(sources, decoding={"max_window_seconds": 0.3})
    encoder_seconds = SpeechLLMRecognizer(build(sources), tokenizer).max_seconds
    assert encoder_seconds == pytest.approx(0.8)  # 40 positions of the tiny encoder at 50 frames/s
    recognizer = SpeechLLMRecognizer(model, tokenizer)
    assert recognizer.max_seconds == pytest.approx(0.3) and recognizer.split_at_pauses
    assert SpeechLLMRecognizer(model, tokenizer, max_window_seconds=2.0).max_seconds == encoder_seconds
    clip = np.random.default_rng(0).normal(0, 0.1, 11000).astype(np.float32)  # 0.69 s: three windows
    windows = pause_windows(clip, 0.3)
    assert len(windows) == 3
    calls: list[float] = []
    monkeypatch.setattr(decode, "pause_windows", lambda *args: calls.append(args[1]) or windows)
    got = transcribe_long(recognizer, [clip])[0]
    assert calls == [pytest.approx(0.3)]  # cut where the pauses are
    parts = recognizer.transcribe([clip[start:end] for start, end in windows])
    assert got.text == " ".join(p.text for p in parts if p.text)
    assert got.compressed_frames == sum(p.compressed_frames for p in parts)
    plain = SpeechLLMRecognizer(build(sources), tokenizer)
    assert not plain.split_at_pauses
    assert transcribe_long(plain, [clip]) == plain.transcribe([clip])  # within the encoder's 0.8 s: whole
    with pytest.raises(ValueError, match="max_window_seconds"):
        build(sources, decoding={"max_window_seconds": 0})


def test_ctc_loss_is_added_with_its_weight_and_trains_only_the_projector(sources, tmp_path):
    model = randomize(build(sources, ctc_loss_weight=0.5)).train()
    feats, mask, _ = ragged()
    responses = response_ids(model, ["a cat", "hello", "yes"])
    out = model(feats, mask, labels=padded(responses))
    assert out.ctc_loss is not None and out.ctc_loss.item() > 0
    torch.testing.assert_close(out.loss, out.asr_loss + 0.5 * out.ctc_loss)
    table = model.llm.get_input_embeddings().weight
    audio = model.embed_audio(feats, mask)
    alone = model.projector.ctc_head(audio.embeds, audio.mask, table, [r[:-1] for r in responses])
    torch.testing.assert_close(out.ctc_loss, alone)  # the end-of-turn is not a CTC target
    model.zero_grad()
    out.ctc_loss.backward()
    assert all(p.grad is not None for p in model.projector.ctc_head.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("projector."))
    model.save_pretrained(tmp_path)
    loaded = SpeechLLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.projector.ctc_head.blank, model.projector.ctc_head.blank)
    assert build(sources).projector.ctc_head is None
    with pytest.raises(ValueError, match="ctc_loss_weight"):
        build(sources, ctc_loss_weight=-1.0)


def _ctc_log_likelihood(model: SpeechLLM, audio, rows) -> list[float]:
    """log P_ctc(tokens | audio) of each sample's transcript tokens, summed over alignments."""
    table = model.llm.get_input_embeddings().weight
    log_probs = model.projector.ctc_head.logits(audio.projected, table).double().log_softmax(-1)
    tokens = [[t for t in row if t != model.prompt.pad_id] for row in rows.tolist()]
    return (
        -nn.functional.ctc_loss(
            log_probs.transpose(0, 1),
            torch.tensor([t for row in tokens for t in row], dtype=torch.long),
            audio.projected_mask.sum(1),
            torch.tensor([len(row) for row in tokens]),
            blank=table.shape[0],
            reduction="none",
        )
    ).tolist()


def test_joint_ctc_decoding_follows_the_ctc_head_and_is_batch_invariant(sources):
    """Joint CTC / LLM beam search (decoding ctc_weight): with the CTC weight at 0.9 the transcripts CTC
    scores higher than plain beam search's; a sample decodes the same alone and in a padded batch."""
    model = randomize(build(sources, ctc_loss_weight=1.0)).double()
    with torch.no_grad():  # a CTC head sure of its tokens, so its scores differ from the random LLM's
        model.projector.ctc_head.log_scale.fill_(math.log(30.0))
    feats, mask, singles = ragged()
    feats = feats.double()
    audio = model.embed_audio(feats, mask)
    settings = {"num_beams": 3, "ctc_weight": 0.9, "ctc_pre_beam": len(tiny_tokenizer())}
    plain = model.generate(feats, mask, num_beams=3)
    joint = model.generate(feats, mask, **settings)
    plain_score, joint_score = (
        _ctc_log_likelihood(model, audio, plain),
        _ctc_log_likelihood(model, audio, joint),
    )
    assert all(j >= p - 1e-9 for j, p in zip(joint_score, plain_score))
    assert sum(joint_score) > sum(plain_score) + 1.0
    for i, single in enumerate(singles):
        alone = model.generate(single.double(), **settings)[0].tolist()
        assert joint[i].tolist()[: len(alone)] == alone
    with pytest.raises(ValueError, match="needs the CTC head"):
        build(sources, decoding={"ctc_weight": 0.3})


def test_eval_and_transcribe_take_a_ctc_weight_for_a_speech_llm_with_a_ctc_head(sources, tmp_path, capsys):
    import numpy as np
    import soundfile as sf

    from magnet_asr.cli import main
    from magnet_asr.evaluation.decode import load_recognizer

    tokenizer = prepare_tokenizer(tiny_tokenizer())
    for name, settings in (("ctc", {"ctc_loss_weight": 1.0}), ("plain", {})):
        build(sources, **settings).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    recognizer = load_recognizer(str(tmp_path / "ctc"), speech_llm_decoding={"ctc_weight": 0.4})
    assert (
        recognizer.decoding.ctc_weight == 0.4
        and load_recognizer(str(tmp_path / "ctc")).decoding.ctc_weight == 0
    )
    clip = tmp_path / "clip.wav"
    sf.write(clip, np.random.default_rng(0).normal(0, 0.1, 8000).astype(np.float32), 16000)
    assert main(["transcribe", "--model", str(tmp_path / "ctc"), "--ctc-weight", "0.4", str(clip)]) == 0
    capsys.readouterr()
    with pytest.raises(ValueError, match="needs a CTC head"):
        load_recognizer(str(tmp_path / "plain"), speech_llm_decoding={"ctc_weight": 0.4})
    assert main(["transcribe", "--model", str(tmp_path / "plain"), "--ctc-weight", "0.4", str(clip)]) == 2
    assert "needs a CTC head" in capsys.readouterr().err
    with pytest.raises(ValueError, match="SpeechLLM models only"):
        load_recognizer(sources[0], speech_llm_decoding={"ctc_weight": 0.4})


def test_ctc_compression_passes_the_llm_one_token_per_emitted_label(sources):
    model = randomize(build(sources, ctc_loss_weight=1.0, ctc_compression=True))
    feats, mask, singles = ragged()
    audio = model.embed_audio(feats, mask)
    table = model.llm.get_input_embeddings().weight
    spikes = model.projector.ctc_head.greedy(audio.projected, audio.projected_mask, table)
    assert audio.counts.tolist() == [max(len(s), 1) for s in spikes]
    assert (audio.counts <= audio.projected_mask.sum(1)).all()
    inputs = model.build_inputs(audio)
    assert (inputs.audio_mask.sum(1) == audio.counts).all()
    batched = model(feats, mask)
    for i, single in enumerate(singles):  # compression is per sample: no batch or padding effect
        alone = model(single)
        n = alone.logits.shape[1]
        torch.testing.assert_close(batched.logits[i, :n], alone.logits[0], atol=2e-5, rtol=1e-4)
    # the CTC loss scores the projector outputs before compression
    responses = response_ids(model, ["a cat", "hello", "yes"])
    out = model(feats, mask, labels=padded(responses))
    expected = model.projector.ctc_head(
        audio.projected, audio.projected_mask, table, [r[:-1] for r in responses]
    )
    torch.testing.assert_close(out.ctc_loss, expected)
    with pytest.raises(ValueError, match="ctc_compression"):
        build(sources, ctc_compression=True)


def test_ctc_blank_threshold_passes_the_llm_more_tokens_and_is_checked(sources):
    model = randomize(build(sources, ctc_loss_weight=1.0, ctc_compression=True))
    feats, mask, _ = ragged()
    argmax_counts = model.embed_audio(feats, mask).counts
    model.config.ctc_blank_threshold = 1.0  # every audio token emits: nothing is dropped but repeats
    audio = model.embed_audio(feats, mask)
    table = model.llm.get_input_embeddings().weight
    path = model.projector.ctc_head.best_path(audio.projected, table, 1.0)
    for i, n in enumerate(audio.projected_mask.sum(1).tolist()):
        row = path[i, :n]
        assert audio.counts[i] == 1 + int((row[1:] != row[:-1]).sum())
    assert (audio.counts >= argmax_counts).all()
    with pytest.raises(ValueError, match="ctc_blank_threshold"):
        build(sources, ctc_loss_weight=1.0, ctc_compression=True, ctc_blank_threshold=1.5)


def test_ctc_token_budget_caps_each_utterance_and_is_checked(sources):
    model = randomize(build(sources, ctc_loss_weight=1.0, ctc_compression=True, ctc_blank_threshold=1.0))
    feats, mask, _ = ragged()
    unlimited = model.embed_audio(feats, mask).counts
    model.config.ctc_max_tokens_per_second = 10.0
    audio = model.embed_audio(feats, mask)
    budget = (audio.seconds * 10.0).floor().clamp(min=1).long()
    assert (audio.counts == torch.minimum(unlimited, budget)).all()
    assert (unlimited > budget).any()  # the budget binds on some utterance
    with pytest.raises(ValueError, match="needs ctc_compression"):
        build(sources, ctc_loss_weight=1.0, ctc_max_tokens_per_second=4.0)
    with pytest.raises(ValueError, match="must be > 0"):
        build(sources, ctc_loss_weight=1.0, ctc_compression=True, ctc_max_tokens_per_second=0.0)


def test_ctc_segment_pooling_keeps_the_count_and_reads_every_audio_token(sources):
    model = randomize(build(sources, ctc_loss_weight=1.0, ctc_compression=True))
    feats, mask, _ = ragged()
    table = model.llm.get_input_embeddings().weight
    head = model.projector.ctc_head
    with torch.no_grad():  # the blank along an audio token's direction wins everywhere in this tiny model
        projected = model.embed_audio(feats, mask, compress=False)
        head.blank.copy_(projected.projected[0, 0])
        _, log_blank = head.emissions(projected.projected, table)
    # a threshold at the median blank probability: about half the audio tokens emit
    model.config.ctc_blank_threshold = float(log_blank[projected.projected_mask.bool()].exp().median())
    spikes = model.embed_audio(feats, mask)
    model.config.ctc_pooling = "segments"
    segments = model.embed_audio(feats, mask)
    assert torch.equal(segments.counts, spikes.counts)
    best, log_blank = head.emissions(segments.projected, table, model.config.ctc_blank_threshold)
    assert (best[0] == table.shape[0]).any() and (best[0] != table.shape[0]).any()
    expected, _ = merge_ctc_spikes(
        segments.projected, segments.projected_mask, best, table.shape[0], log_blank, pooling="segments"
    )
    torch.testing.assert_close(segments.embeds, expected)
    assert not torch.allclose(segments.embeds, spikes.embeds)  # the blanks' audio tokens count here
    with pytest.raises(ValueError, match="ctc_pooling"):
        build(sources, ctc_loss_weight=1.0, ctc_compression=True, ctc_pooling="mean")
