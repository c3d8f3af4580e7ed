"""MagnetWhisper built from the bundled whisper-tiny.en *is* Whisper: same logits, same greedy transcripts."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from magnet_asr.audio import N_SAMPLES, load_audio, log_mel_spectrogram
from magnet_asr.text import wer

os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = [pytest.mark.real_weights, pytest.mark.slow]

SENTENCES = [
    "Please leave your message after the tone.",
    "All of our agents are busy, please hold the line and your call will be answered shortly.",
]


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> torch.Tensor:
    """Two flite sentences as 30 s padded log-mel features ``(2, 80, 3000)``."""
    if not shutil.which("flite"):
        pytest.skip("needs flite (apt-get install flite)")
    folder = tmp_path_factory.mktemp("speech")
    feats = []
    for i, text in enumerate(SENTENCES):
        wav = folder / f"s{i}.wav"
        subprocess.run(["flite", "-t", text, "-o", str(wav)], check=True)
        feats.append(log_mel_spectrogram(load_audio(wav), 80, pad_to=N_SAMPLES))
    return torch.stack(feats)


@pytest.fixture(scope="module")
def models():
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    from magnet_asr.models import MagnetWhisper
    from magnet_asr.weights import resolve_model

    path = resolve_model("whisper-tiny.en")
    hf = WhisperForConditionalGeneration.from_pretrained(path).eval()
    ours = MagnetWhisper.from_whisper(path).eval()
    return hf, ours, AutoTokenizer.from_pretrained(path)


@torch.inference_mode()
def test_same_logits_as_transformers_whisper(features, models):
    hf, ours, _ = models
    prompt = torch.tensor([hf.generation_config.decoder_start_token_id, 50362, 220, 5492, 2666])[None]
    prompt = prompt.expand(features.shape[0], -1)
    expected = hf(input_features=features, decoder_input_ids=prompt).logits
    got = ours(input_features=features, decoder_input_ids=prompt).logits
    assert (got - expected).abs().max().item() <= 1e-4


@torch.inference_mode()
def test_same_greedy_transcripts_as_transformers_generate(features, models):
    """Incremental decoding with the key/value cache must match (a transformers upgrade that renames the
    cache argument once made every transcript stop after its first word)."""
    hf, ours, tokenizer = models
    expected = tokenizer.batch_decode(hf.generate(features, max_new_tokens=60), skip_special_tokens=True)
    got = tokenizer.batch_decode(
        ours.generate(input_features=features, max_new_tokens=60), skip_special_tokens=True
    )
    assert [t.strip() for t in got] == [t.strip() for t in expected]
    assert wer(SENTENCES, got) < 0.35  # tiny.en mishears flite's "All of our agents are busy"
