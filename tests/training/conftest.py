"""A tiny random Whisper checkpoint (real tokenizer) and a tiny speech manifest for training tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

SENTENCES = [
    "Please enter your account number.",
    "Thank you for calling.",
    "The party you are calling is not available.",
    "Press one for sales.",
    "Your call is important to us.",
    "Goodbye and have a nice day.",
    "Please hold the line.",
    "The mailbox is full.",
    "Enter your password now.",
    "Welcome to the conference.",
    "Transfer in progress.",
    "Record your message after the tone.",
]


def tiny_whisper(source_name: str, out: Path) -> Path:
    """A 2+2-layer, 32-wide random Whisper in ``out`` with the tokenizer and generation settings of the
    bundled ``source_name`` (English-only ``whisper-tiny.en`` or multilingual ``whisper-base``)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    from magnet_asr.weights import resolve_model

    source = resolve_model(source_name)
    base = WhisperConfig.from_pretrained(source).to_dict()
    dims = dict(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_target_positions=64,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**{**base, **dims}))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    generation = GenerationConfig.from_pretrained(source)
    generation.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory) -> Path:
    """A tiny random English-only Whisper with the bundled tiny.en tokenizer and generation settings."""
    return tiny_whisper("whisper-tiny.en", tmp_path_factory.mktemp("tiny_whisper"))


@pytest.fixture(scope="session")
def tiny_multilingual_whisper_dir(tmp_path_factory) -> Path:
    """A tiny random multilingual Whisper with the bundled whisper-base tokenizer and generation settings."""
    return tiny_whisper("whisper-base", tmp_path_factory.mktemp("tiny_multilingual_whisper"))


@pytest.fixture(scope="session")
def speech_manifest(tmp_path_factory) -> Path:
    """12 flite sentences (8 train, 2 validation, 2 test) plus one corrupt train file; the train rows
    have their phone times (``flite -psdur``, as the synth corpus records them)."""
    from magnet_asr.data.synth import parse_phone_ends

    if not shutil.which("flite"):
        pytest.skip("needs flite (apt-get install flite)")
    folder = tmp_path_factory.mktemp("speech")
    rows = []
    for i, text in enumerate(SENTENCES):
        wav = folder / f"u{i:02d}.wav"
        printed = subprocess.run(
            ["flite", "-psdur", "-t", text, "-o", str(wav)], check=True, capture_output=True, text=True
        ).stdout
        split = "train" if i < 8 else "validation" if i < 10 else "test"
        row = {"id": f"u{i:02d}", "audio": str(wav), "text": text, "duration": 2.0, "split": split}
        if split == "train":
            row["phones"], row["phone_ends"] = parse_phone_ends(printed)
        rows.append(row)
    corrupt = folder / "corrupt.wav"
    corrupt.write_bytes(b"RIFF....WAVEjunk" * 8)
    rows.append({"id": "corrupt", "audio": str(corrupt), "text": "broken", "duration": 1.0, "split": "train"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """The tiny random Llama (tests/tiny.py) with the bundled SmolLM2 tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from magnet_asr.weights import resolve_model
    from tiny import TINY_LLAMA

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_llm")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **TINY_LLAMA)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_overrides(model_dir: Path, manifest: Path, output_dir: Path, **extra: object) -> list[str]:
    overrides = {
        "run_name": "tiny",
        "encoder.name": str(model_dir),
        "data.train": f"[{manifest}]",
        "data.validation": f"[{manifest}]",
        "data.test": f"[{manifest}]",
        "training.output_dir": str(output_dir),
        "training.max_steps": 6,
        "training.per_device_batch_size": 4,
        "training.learning_rate": 1e-3,
        "training.eval_steps": 0,
        "training.save_steps": 2,
        "training.save_total_limit": 10,
        "training.logging_steps": 1,
        "training.report_to": "[]",
        "training.device": "cpu",
        "training.seed": 0,
    }
    overrides.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in overrides.items()]


@pytest.fixture
def train_args():
    return train_overrides


def run_train(overrides: list[str], launcher: list[str] | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [*(launcher or [sys.executable, "-m"]), "magnet_asr", "train", *overrides]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )


@pytest.fixture
def start_training():
    return run_train
