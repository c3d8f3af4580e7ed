"""Distillation from the uncompressed teacher: losses, gradients and the per-utterance teacher cache."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from magnet_asr.data.collator import WhisperCollator, pad_sequences
from magnet_asr.data.manifest import Utterance
from magnet_asr.models import MagnetWhisper, MagnetWhisperConfig
from magnet_asr.training.distillation import (
    Distiller,
    TeacherCache,
    WhisperTeacher,
    encoder_distillation_loss,
    logits_distillation_loss,
    student_frames,
)
from tiny import TINY_WHISPER

# the tiny model's window: max_source_positions = 40 encoder frames = 80 mel frames = 12,800 samples
WINDOW = TINY_WHISPER["max_source_positions"] * 2 * 160


def _teacher() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(WhisperConfig(**TINY_WHISPER)).eval()


def _student(teacher, **settings) -> MagnetWhisper:
    config = MagnetWhisperConfig(**{**teacher.config.to_dict(), **settings})
    student = MagnetWhisper(config)
    student.load_state_dict(teacher.state_dict(), strict=False)
    return student


def _all_boundaries(student: MagnetWhisper) -> None:
    """Make every predictor put a boundary on every frame (p ~ 1): pooling is then the identity."""
    for predictor in student.model.encoder.predictors.values():
        with torch.no_grad():
            predictor.mlp[-1].bias.fill_(30.0)


def _batch(lengths=(WINDOW, WINDOW), seed=0):
    from magnet_asr.evaluation.decode import batch_features

    rng = np.random.default_rng(seed)
    waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in lengths]
    features, mask = batch_features(waves, TINY_WHISPER["num_mel_bins"])
    labels = pad_sequences([[5, 6, 7, 8, 2], [9, 10, 2]], -100)
    return waves, features, mask, labels


def _losses(student, teacher, waves, features, mask, labels, top_k=8):
    batch = {"waveforms": waves, "labels": labels}
    targets = WhisperTeacher(teacher, n_samples=WINDOW)(batch, temperature=1.0, top_k=top_k)
    out = student(input_features=features, attention_mask=mask, labels=labels)
    frames = student_frames(out.encoder_last_hidden_state, out.boundary_outputs)
    teacher_frames = torch.nn.utils.rnn.pad_sequence([t.encoder for t in targets], batch_first=True)
    frame_mask = torch.zeros(frames.shape[:2], dtype=torch.long)
    for i, t in enumerate(targets):
        frame_mask[i, : t.encoder.shape[0]] = 1
    real = labels != -100
    logprobs = torch.zeros(*labels.shape, top_k)
    ids = torch.zeros(*labels.shape, top_k, dtype=torch.long)
    for i, t in enumerate(targets):
        logprobs[i, : t.ids.shape[0]], ids[i, : t.ids.shape[0]] = t.logprobs, t.ids
    enc = encoder_distillation_loss(frames[:, : teacher_frames.shape[1]], teacher_frames, frame_mask)
    kl = logits_distillation_loss(out.logits, logprobs, ids, real)
    return enc, kl, out


def test_zero_when_the_student_is_the_teacher_and_positive_otherwise():
    teacher = _teacher()
    waves, features, mask, labels = _batch()
    same = _student(teacher).eval()
    enc, kl, _ = _losses(same, teacher, waves, features, mask, labels)
    assert enc.item() < 1e-6 and abs(kl.item()) < 1e-5

    # a predictor at layer 1 with a boundary on every frame pools nothing away: still zero
    pooled = _student(teacher, predictor_layers=[1], predictor_settings={"loss": []})
    _all_boundaries(pooled)
    enc, kl, out = _losses(pooled.eval(), teacher, waves, features, mask, labels)
    assert int(out.frames_after[0]) == int(out.frames_before[0])
    assert enc.item() < 1e-6 and abs(kl.item()) < 1e-5

    other = copy.deepcopy(same)
    with torch.no_grad():
        for p in other.model.encoder.layers[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
        other.model.decoder.layers[1].fc2.weight.mul_(20.0)  # a random tiny decoder is near uniform
    enc, kl, _ = _losses(other, teacher, waves, features, mask, labels)
    assert enc.item() > 1e-3 and kl.item() > 1e-4


def test_compression_makes_the_loss_positive_and_its_gradient_reaches_predictor_and_later_layers():
    teacher = _teacher()
    waves, features, mask, labels = _batch()
    settings = {"loss": [], "train_sampling": "threshold", "prior": 0.3}
    student = _student(teacher, predictor_layers=[1], predictor_settings=settings).train()
    enc, kl, out = _losses(student, teacher, waves, features, mask, labels)
    assert float(out.frames_after.sum()) < float(out.frames_before.sum())  # it compresses
    assert enc.item() > 0 and kl.item() > 0
    (enc + kl).backward()
    predictor = student.model.encoder.predictors["1"]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in predictor.parameters())
    after = student.model.encoder.layers[1]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in after.fc1.parameters())


def test_logits_loss_ignores_padding_and_scales_with_temperature_squared():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    teacher = torch.log_softmax(torch.randn(2, 3, 11), -1)
    top, ids = teacher.topk(11, dim=-1)  # k = V: the coarsened KL is the exact KL
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    exact = torch.nn.functional.kl_div(
        torch.log_softmax(logits, -1), teacher, log_target=True, reduction="none"
    )
    expected = (exact.sum(-1) * mask).sum() / mask.sum()
    assert torch.allclose(logits_distillation_loss(logits, top, ids, mask), expected, atol=1e-5)
    garbage = logits.clone()
    garbage[0, 2] = 1e4  # a padded position cannot change the loss
    assert torch.allclose(logits_distillation_loss(garbage, top, ids, mask), expected, atol=1e-5)


def test_encoder_loss_counts_real_frames_only():
    student, teacher = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    base = encoder_distillation_loss(student, teacher, mask)
    student[0, 3:] += 100.0
    assert torch.allclose(encoder_distillation_loss(student, teacher, mask), base)


class _Collator(WhisperCollator):
    """The run's collator with a stand-in tokenizer (labels depend on the text only)."""

    def __init__(self) -> None:
        super().__init__(tokenizer=None, n_mels=TINY_WHISPER["num_mel_bins"], keep_ids=True)

    def label_ids(self, text: str) -> list[int]:
        return [3 + len(text) % 7, 4, 2]


def test_teacher_runs_once_per_utterance_with_the_cache(tmp_path):
    import soundfile as sf

    teacher = WhisperTeacher(_teacher(), n_samples=WINDOW)
    calls = []
    original = WhisperTeacher.__call__

    def counting(self, batch, *args, **kwargs):
        calls.append(len(batch["waveforms"]))
        return original(self, batch, *args, **kwargs)

    utterances = []
    for i in range(5):
        path = tmp_path / f"u{i}.wav"
        sf.write(path, np.random.default_rng(i).standard_normal(4000 + 1000 * i) * 0.1, 16_000)
        utterances.append(Utterance(f"u{i}", str(path), f"text {i}", 0.3))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    utterances.append(Utterance("bad", str(bad), "broken", 1.0))
    long = tmp_path / "long.wav"  # over max_seconds: skipped as training skips it, never fed to the teacher
    sf.write(long, np.zeros(16_000 * 2, dtype=np.float32) + 0.01, 16_000)
    utterances.append(Utterance("long", str(long), "too long", 2.0))
    cache = TeacherCache(tmp_path / "cache", "tiny", top_k=4)
    distiller = Distiller(cache, "tiny", batch_size=2, teacher=teacher)
    WhisperTeacher.__call__ = counting  # type: ignore[method-assign]
    try:
        report = distiller.prepare(utterances, _Collator(), max_seconds=1.0)
        first = (report.computed, report.reused, report.skipped)
        report = distiller.prepare(utterances, _Collator(), max_seconds=1.0)  # the report adds up
        second = (report.computed - first[0], report.reused - first[1], report.skipped - first[2])
    finally:
        WhisperTeacher.__call__ = original  # type: ignore[method-assign]
    assert sum(calls) == 5  # every good utterance once, none again
    assert first == (5, 0, 2) and second == (0, 5, 2)
    entry = cache.load(cache.key("u2", str(tmp_path / "u2.wav"), _Collator().label_ids("text 2")))
    assert entry is not None and entry.encoder.dtype == torch.float16
    assert entry.encoder.shape[0] == (6000 // 160 + 1) // 2 and entry.ids.shape == (3, 4)
    # another transcript (other labels) is another entry: never a stale read
    assert not cache.has(cache.key("u2", str(tmp_path / "u2.wav"), [9, 9, 2]))


@pytest.mark.parametrize("field,value", [("temperature", 0.0), ("top_k", 0)])
def test_cache_settings_are_checked(tmp_path, field, value):
    kwargs = {"temperature": 1.0, "top_k": 4, field: value}
    with pytest.raises(ValueError, match=field):
        TeacherCache(tmp_path, "t", **kwargs)


@pytest.mark.real_weights
@pytest.mark.slow
def test_training_fills_the_cache_lazily_once_and_logs_every_part(
    tmp_path, tiny_whisper_dir, speech_manifest, train_args, start_training
):
    import json

    cache = tmp_path / "cache"
    extra = {
        "compressor": "phoneme",
        "distillation": "whisper_teacher",
        "distillation.cache_dir": str(cache),
        "training.max_steps": 3,
        "training.save_steps": 3,
    }
    runs = []
    for name in ("first", "second"):
        proc = start_training(train_args(tiny_whisper_dir, speech_manifest, tmp_path / name, **extra))
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        runs.append(json.loads((tmp_path / name / "results.json").read_text()))
    first, second = (r["distillation"] for r in runs)
    # 8 good train utterances (the corrupt one is skipped): the first run computes each at most once ...
    assert 0 < first["cache"]["computed"] <= 8 and first["samples_without_teacher"] == 0
    assert len(list(cache.rglob("*.safetensors"))) == first["cache"]["computed"]
    # ... and the second, with the same teacher and data, only reads what it needs
    assert second["cache"] is None or second["cache"]["computed"] <= 8 - first["cache"]["computed"]
    assert second["cache_reads"] > 0
    log = runs[0]["train_log"]
    assert log["distill_encoder_loss"] > 0 and log["distill_logits_loss"] > 0 and "asr_loss" in log
