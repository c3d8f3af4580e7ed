"""The model card a run writes into final/: base models by hub name, results, a command without local paths."""

from __future__ import annotations

from magnet_asr.schema import load_run_config
from magnet_asr.training.model_card import base_models, model_card, portable_command

RESULTS = {"test": {"asterisk": {"wer": 0.0412, "cer": 0.02, "mean_compression": 3.01, "num_utterances": 47}}}


def test_a_speech_llm_card_names_both_base_models_by_hub_name():
    cfg = load_run_config(["+experiments=speech_llm_demo"])
    assert base_models(cfg) == ["openai/whisper-base", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    card = model_card(cfg, RESULTS, "magnet-asr train +experiments=speech_llm_demo", steps=600)
    assert card.startswith("---\nlibrary_name: magnet-asr\n")
    assert "- HuggingFaceTB/SmolLM2-135M-Instruct\n" in card and "SpeechLLM" in card
    assert "LLM fine-tuned in full" in card  # llm.finetune=full
    lora = load_run_config(["+experiments=speech_llm_demo_compressed"])
    assert "LLM with LoRA" in model_card(lora, RESULTS, None, steps=600)
    assert "| asterisk test | 0.0412 | 0.0200 | 3.0100 | 47 |" in card
    assert "- Steps: 600 " in card and "`magnet-asr train +experiments=speech_llm_demo`" in card
    assert "mean of the checkpoints" not in card


def test_a_card_says_when_its_weights_are_a_checkpoint_average():
    cfg = load_run_config(["+experiments=magnet_demo_5x"])
    card = model_card(cfg, {**RESULTS, "averaged_checkpoints": [300, 400, 500]}, None, steps=500)
    assert "weights: the mean of the checkpoints at steps 300, 400, 500\n" in card


def test_a_card_never_shows_where_files_lay():
    command = "magnet-asr train encoder.name=/home/me/ckpt 'data.train=[/data/a.jsonl,synth]' x=runs/r"
    assert portable_command(command) == (
        "magnet-asr train encoder.name=<local>/ckpt 'data.train=[<local>/a.jsonl,synth]' x=runs/r"
    )
    cfg = load_run_config(["+experiments=magnet_demo", "encoder.name=/home/me/whisper-ft"])
    card = model_card(cfg, RESULTS, None, steps=10)
    assert "/home/me" not in card and "- whisper-ft\n" in card and "../config.yaml" in card
