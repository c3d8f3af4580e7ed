"""One decoder prompt for training and decoding (issue 14, item 5): the tokens the decoder reads before the
transcript are the same when it learns from the collator's labels and when the recognizer generates."""

from __future__ import annotations

import numpy as np
import pytest

from magnet_asr.schema import load_run_config
from magnet_asr.training.builders import setup_magnet_whisper

pytestmark = pytest.mark.real_weights  # the bundled tokenizers

TEXT = "hello world"


def _decoder_inputs(model_dir, *overrides: str):
    """``(tokenizer, what the decoder read in a training forward, what it read first in decoding)``."""
    setup = setup_magnet_whisper(load_run_config([f"encoder.name={model_dir}", *overrides]))
    model = setup.model
    seen: list[list[int]] = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(ids[0].tolist())

    model.model.decoder.register_forward_pre_hook(record, with_kwargs=True)
    audio = (0.1 * np.random.default_rng(0).normal(size=16_000)).astype(np.float32)
    batch = setup.collator([{"id": "u", "path": "u.wav", "text": TEXT, "audio": audio}])
    batch.pop("num_skipped")
    model.train()
    model(**batch)  # labels shifted right behind the start token: what the decoder learns from
    training = seen[-1]
    seen.clear()
    setup.make_recognizer(model).transcribe([audio])
    decoding = seen[0]  # generate's first decoder call reads the whole prompt
    return setup.tokenizer, model, training, decoding


@pytest.mark.parametrize(("language", "task"), [("en", "transcribe"), ("de", "translate")])
def test_multilingual_whisper_trains_and_decodes_with_one_prompt(
    tiny_multilingual_whisper_dir, language, task
):
    tokenizer, model, training, decoding = _decoder_inputs(
        tiny_multilingual_whisper_dir, f"encoder.language={language}", f"encoder.task={task}"
    )
    prompt = tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", f"<|{language}|>", f"<|{task}|>", "<|notimestamps|>"]
    )
    assert decoding == prompt
    assert training[: len(prompt)] == prompt
    assert training[len(prompt) :] == tokenizer(" " + TEXT, add_special_tokens=False).input_ids
    # saved with the model, so final/ (and transformers' pipeline on it) decodes with the same prompt
    assert (model.generation_config.language, model.generation_config.task) == (language, task)


def test_english_only_whisper_has_no_language_or_task_token(tiny_whisper_dir):
    tokenizer, _, training, decoding = _decoder_inputs(tiny_whisper_dir, "encoder.language=de")
    prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    assert decoding == prompt and training[: len(prompt)] == prompt
    assert training[len(prompt) :] == tokenizer(" " + TEXT, add_special_tokens=False).input_ids
    # the labels are what the tokenizer's own prefix gave before the prompt was configurable
    assert training[1:] + [tokenizer.eos_token_id] == tokenizer(" " + TEXT).input_ids[1:]


def test_a_language_the_model_lacks_is_a_one_line_error(tiny_multilingual_whisper_dir):
    with pytest.raises(ValueError, match="language 'xx'"):
        setup_magnet_whisper(
            load_run_config([f"encoder.name={tiny_multilingual_whisper_dir}", "encoder.language=xx"])
        )


def test_task_is_checked_by_the_schema():
    with pytest.raises(ValueError, match="encoder.task"):
        load_run_config(["encoder.task=summarize"])
