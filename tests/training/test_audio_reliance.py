"""The own-vs-rolled audio check (training/audio_reliance.py) on a tiny SpeechLLM."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from magnet_asr.data.collator import SpeechDataset
from magnet_asr.data.manifest import Utterance
from magnet_asr.training.audio_reliance import audio_loss_gap, roll_audio
from magnet_asr.training.speech_llm import setup_speech_llm


def _load_test_module(name: str):
    """A sibling test file's helpers (test files are not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = _load_test_module("test_speech_llm_setup")
sources = SETUP.sources  # the module-scoped fixture: tiny Whisper + tiny Llama checkpoints on disk


def test_roll_audio_moves_every_audio_entry_together_and_keeps_the_labels():
    batch = {
        "input_features": torch.arange(3)[:, None, None].expand(3, 2, 4).float(),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]),
        "target_counts": torch.tensor([[5, 6, 7]]),
        "cache_keys": ["a", "b", "c"],
        "labels": torch.tensor([[1], [2], [3]]),
    }
    rolled = roll_audio(batch)
    assert rolled["input_features"][:, 0, 0].tolist() == [2.0, 0.0, 1.0]
    assert rolled["attention_mask"].sum(1).tolist() == [1, 4, 2]
    assert rolled["target_counts"].tolist() == [[7, 5, 6]] and rolled["cache_keys"] == ["c", "a", "b"]
    assert torch.equal(rolled["labels"], batch["labels"]) and batch["cache_keys"] == ["a", "b", "c"]


def _equal_length_utterances(root: Path, count: int) -> list[Utterance]:
    """Clips of one length: rolled audio then changes what the audio says, not how many tokens it gets."""
    import numpy as np
    import soundfile as sf

    texts = ["a cat sat", "hello world", "the dog", "yes no one two"]
    time = np.arange(8000) / 16_000
    out = []
    for i in range(count):  # tones far apart: clips the tiny encoder tells apart
        tone = 0.5 * np.sin(2 * np.pi * 300 * (i + 1) * time) * (time < 0.1 * (i + 1))
        sf.write(root / f"u{i}.wav", tone.astype(np.float32), 16_000)
        out.append(Utterance(f"u{i}", str(root / f"u{i}.wav"), texts[i % 4], 0.5))
    return out


@pytest.fixture()
def setup(sources, tmp_path):
    torch.manual_seed(0)
    built = setup_speech_llm(SETUP._config(sources, "speech_llm_demo", "projector.ctc_warmup_steps=0"))
    return built, SpeechDataset(_equal_length_utterances(tmp_path, 6))


def test_gap_is_zero_when_the_audio_cannot_reach_the_llm_and_not_otherwise(setup):
    built, dataset = setup
    model = built.model
    with torch.no_grad():  # LoRA B starts at zero: give the adapters a say, as after training
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    reads = audio_loss_gap(model, dataset, built.collator, batch_size=3)
    assert reads["audio_loss_tokens"] > 0 and abs(reads["audio_loss_gap"]) > 1e-6
    assert reads["audio_loss_gap"] == pytest.approx(reads["audio_loss_rolled"] - reads["audio_loss_own"])
    with torch.no_grad():  # every audio embedding the same: the transcript alone decides the loss
        for param in model.projector.parameters():
            param.zero_()
    deaf = audio_loss_gap(model, dataset, built.collator, batch_size=3)
    assert deaf["audio_loss_gap"] == pytest.approx(0.0, abs=1e-9)  # exactly: same inputs
    assert deaf["audio_loss_tokens"] == reads["audio_loss_tokens"]


def test_rank_shares_joined_by_gather_cover_the_whole_set(setup):
    built, dataset = setup
    whole = audio_loss_gap(built.model, dataset, built.collator, batch_size=3)
    shares = [
        audio_loss_gap(built.model, dataset, built.collator, batch_size=3, rank=r, world_size=2)
        for r in range(2)
    ]
    sums = [(s["audio_loss_own"] * s["audio_loss_tokens"], 0.0, s["audio_loss_tokens"]) for s in shares]
    joined = audio_loss_gap(
        built.model, dataset, built.collator, batch_size=3, world_size=2, gather=lambda _mine: sums
    )
    assert joined["audio_loss_tokens"] == whole["audio_loss_tokens"] == sum(s[2] for s in sums)
    # a sample's own loss does not depend on its batch (eval mode), so the shares' mean is the whole's
    assert joined["audio_loss_own"] == pytest.approx(whole["audio_loss_own"], rel=1e-5)
