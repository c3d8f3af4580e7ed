"""Knowledge distillation from the uncompressed pretrained Whisper into a (compressed) MagnetWhisper.

The teacher is the best model we have on the offline data: the pretrained checkpoint run the standard
Whisper way (30 s padded input, eval mode, no gradient). Hard transcript labels through a few hundred
CPU steps teach a compressed encoder little; the teacher gives every frame and every label position a
dense target (docs/architecture.md, "Distillation"):

- **encoder frames**: the student's encoder output, one vector per segment, copied back over the frames
  each segment covers (:func:`~magnet_asr.compression.upsample`, through every predictor), is matched to
  the teacher's encoder output on the same real frames (:func:`encoder_distillation_loss`);
- **next-token distributions**: KL(teacher || student) of the decoder under teacher forcing on the label
  tokens, masked to real label positions (:func:`logits_distillation_loss`).

The teacher is frozen and deterministic, so its outputs are computed once per utterance and cached on
disk (:class:`TeacherCache`, fp16 safetensors, one file per utterance), never once per epoch. Only the
``top_k`` most likely tokens of each next-token distribution are kept (a full tiny.en distribution is
51,864 values per position); the KL is taken over those ``k`` tokens plus one bin holding the rest of the
mass, which is exact for that coarsened distribution, zero when the student equals the teacher, and a
lower bound of the full KL.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from magnet_asr.compression import upsample
from magnet_asr.data.collator import IGNORE_INDEX
from magnet_asr.data.manifest import Utterance

_TAIL_EPS = 1e-6


# ---- losses ------------------------------------------------------------------------------------------
def student_frames(last_hidden_state: Tensor, boundary_outputs: Sequence[Any] | None) -> Tensor:
    """The student's encoder output on the encoder-stem frames: ``(B, S, D)`` -> ``(B, L, D)``.

    Each predictor pooled its input frames into segments; going back through the predictors in reverse,
    every segment vector is copied to the frames it covers (``upsample``), so the result is aligned with
    the teacher's 50 frames/s output. Without predictors the output already is frame-level.
    """
    hidden = last_hidden_state
    for out in reversed(list(boundary_outputs or ())):
        hidden = upsample(hidden, out.boundaries.detach(), out.mask)
    return hidden


def encoder_distillation_loss(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Normalized MSE between student and teacher frames ``(B, L, D)`` on real frames ``mask (B, L)``.

    ``sum ||s_t - h_t||^2 / sum ||h_t||^2`` over real frames: 0 when they agree, 1 for an all-zero
    student. MSE rather than cosine because the decoder's cross-attention keys and values are linear in
    these vectors, so their norm matters as much as their direction; the normalization makes the loss
    independent of the checkpoint's activation scale (whisper-base's final LayerNorm output is not on
    tiny.en's scale), so one ``encoder_weight`` suits every size. Padding never counts.
    """
    weight = mask.to(student.dtype).unsqueeze(-1)
    diff = ((student.float() - teacher.float()) ** 2 * weight).sum()
    norm = (teacher.float() ** 2 * weight).sum().clamp_min(1e-8)
    return diff / norm


def logits_distillation_loss(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    teacher_ids: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """KL(teacher || student) of next-token distributions on real label positions, times ``T^2``.

    ``student_logits (B, N, V)``; ``teacher_logprobs (B, N, k)``: the teacher's top-``k`` log-probabilities
    at temperature ``T`` (normalized over the full vocabulary); ``teacher_ids (B, N, k)``: their tokens;
    ``mask (B, N)``: 1 on real label positions. The KL is over the ``k`` tokens plus one tail bin for the
    rest of each distribution's mass (module docstring). ``T^2`` keeps gradient sizes comparable across
    temperatures (Hinton et al., 2015). Mean over real positions.
    """
    student_logprobs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    picked = student_logprobs.gather(-1, teacher_ids.long())
    teacher_logprobs = teacher_logprobs.float()
    p = teacher_logprobs.exp()
    head = (p * (teacher_logprobs - picked)).sum(-1)
    tail_t = (1.0 - p.sum(-1)).clamp_min(_TAIL_EPS)
    tail_s = (1.0 - picked.exp().sum(-1)).clamp_min(_TAIL_EPS)
    tail = tail_t * (tail_t.log() - tail_s.log())
    weight = mask.to(head.dtype)
    return (head + tail).mul(weight).sum() / weight.sum().clamp_min(1.0) * temperature**2


# ---- the teacher's outputs, cached per utterance ----------------------------------------------------
@dataclass
class TeacherTargets:
    """One utterance's teacher outputs: per label position the top-``k`` next-token ``logprobs (N, k)``
    with their ``ids (N, k)``, and (Whisper teachers) the ``encoder (L, D)`` output on its real frames."""

    logprobs: Tensor
    ids: Tensor
    encoder: Tensor | None = None


@dataclass
class CacheReport:
    """What filling the cache cost and saved (goes into ``results.json``)."""

    utterances: int = 0
    computed: int = 0
    reused: int = 0
    skipped: int = 0
    seconds: float = 0.0
    bytes: int = 0
    skipped_reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "skipped_reasons"}
        out["seconds"] = round(self.seconds, 1)
        out["megabytes"] = round(self.bytes / 2**20, 1)
        out["seconds_per_utterance"] = round(self.seconds / self.computed, 3) if self.computed else None
        out["skipped_reasons"] = self.skipped_reasons[:10]
        return out


class TeacherCache:
    """Teacher outputs on disk under ``directory``, one ``<key>.safetensors`` per utterance.

    The key hashes the teacher's identity, the temperature, ``top_k``, and the utterance's id, audio
    path and label tokens, so a changed transcript, tokenizer or teacher never reads a stale entry.
    Files are written atomically (temporary name, then rename): an interrupted fill leaves no half entry.
    """

    def __init__(
        self, directory: str | Path, teacher_id: str, temperature: float = 1.0, top_k: int = 32
    ) -> None:
        if top_k < 1:
            raise ValueError(f"distillation.top_k must be >= 1, got {top_k}")
        if not temperature > 0:
            raise ValueError(f"distillation.temperature must be > 0, got {temperature}")
        self.directory = Path(directory)
        self.teacher_id = teacher_id
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.reads = 0

    def key(self, utterance_id: str, audio_path: str, label_ids: Sequence[int]) -> str:
        blob = json.dumps(
            [
                self.teacher_id,
                self.temperature,
                self.top_k,
                utterance_id,
                audio_path,
                [int(i) for i in label_ids],
            ]
        )
        return hashlib.sha1(blob.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def save(self, key: str, targets: TeacherTargets) -> int:
        from safetensors.torch import save_file

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tensors = {
            "logprobs": targets.logprobs.to(torch.float16).contiguous(),
            "ids": targets.ids.to(torch.int32).contiguous(),
        }
        if targets.encoder is not None:
            tensors["encoder"] = targets.encoder.to(torch.float16).contiguous()
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        return path.stat().st_size

    def load(self, key: str) -> TeacherTargets | None:
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        tensors = load_file(str(path))
        self.reads += 1
        return TeacherTargets(tensors["logprobs"], tensors["ids"], tensors.get("encoder"))


class WhisperTeacher:
    """A pretrained Whisper run the standard way: 30 s padded input, eval mode, no gradient."""

    def __init__(self, model: Any, n_samples: int) -> None:
        self.model = model.eval().requires_grad_(False)  # a PreTrainedModel (``config`` is used)
        self.n_samples = n_samples  # input length in samples (N_SAMPLES for a real Whisper)

    @property
    def identity(self) -> str:
        """What identifies the teacher's outputs: its config, input length and a checksum of a few weights."""
        return _identity(self.model, self.n_samples)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], temperature: float, top_k: int) -> list[TeacherTargets]:
        """Teacher outputs for a collated batch: its ``waveforms`` and ``labels (B, N)`` (-100 padded)."""
        from magnet_asr.audio import log_mel_spectrogram, num_encoder_frames

        waveforms, labels = batch["waveforms"], batch["labels"]
        device = next(self.model.parameters()).device
        n_mels = int(self.model.config.num_mel_bins)
        features = torch.stack([log_mel_spectrogram(w, n_mels, pad_to=self.n_samples) for w in waveforms])
        out = self.model(input_features=features.to(device), labels=labels.to(device))
        real = labels.to(device) != IGNORE_INDEX
        top, ids = _top_k(out.logits, temperature, top_k)
        encoder = out.encoder_last_hidden_state
        return [
            TeacherTargets(
                top[i, real[i]].cpu(), ids[i, real[i]].cpu(), encoder[i, : num_encoder_frames(len(w))].cpu()
            )
            for i, w in enumerate(waveforms)
        ]


class SpeechLLMTeacher:
    """A trained SpeechLLM (e.g. the uncompressed ``runs/speech_llm_demo/final``), eval, no gradient:
    its next-token distributions on the response tokens."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval().requires_grad_(False)

    @property
    def identity(self) -> str:
        return _identity(self.model, 0)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], temperature: float, top_k: int) -> list[TeacherTargets]:
        """Teacher outputs for a collated SpeechLLM batch (features, mask and response ``labels``)."""
        device = next(self.model.parameters()).device
        out = self.model(
            input_features=batch["input_features"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            labels=batch["labels"].to(device),
        )
        logits, real = response_logits(out.logits, out.labels)
        top, ids = _top_k(logits, temperature, top_k)
        return [TeacherTargets(top[i, real[i]].cpu(), ids[i, real[i]].cpu()) for i in range(len(top))]


def load_teacher(name_or_path: str) -> WhisperTeacher | SpeechLLMTeacher:
    """The teacher a name points to: a pretrained Whisper (bundled, local or hub) or a SpeechLLM run."""
    from magnet_asr.evaluation.decode import model_type_of
    from magnet_asr.weights import resolve_model

    path = resolve_model(name_or_path)
    kind = model_type_of(path)
    if kind == "whisper":
        from transformers import WhisperForConditionalGeneration

        model = WhisperForConditionalGeneration.from_pretrained(path)
        return WhisperTeacher(model, n_samples=_window_samples(model.config))
    if kind == "speech_llm":
        from magnet_asr.models.speech_llm import SpeechLLM

        return SpeechLLMTeacher(SpeechLLM.from_pretrained(path))
    raise ValueError(
        f"distillation.teacher: {name_or_path} has model_type '{kind}'; a teacher is a pretrained Whisper "
        "(MagnetWhisper students) or a trained SpeechLLM run (SpeechLLM students)"
    )


def response_logits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """A SpeechLLM's logits on its response tokens: ``(B, N, V)`` and the mask ``(B, N)`` of real ones.

    ``logits (B, K, V)`` are the last ``K`` positions of the full sequence whose ``labels (B, T)`` mark
    the response tokens (-100 elsewhere, :class:`~magnet_asr.models.speech_llm.SpeechLLMOutput`); the
    logits at position ``t`` predict token ``t + 1``. Row ``i`` keeps, in order, the positions that
    predict a response token, so a teacher and a student with different audio-token counts line up.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)[:, -logits.shape[1] :]
    real = targets != IGNORE_INDEX
    counts = real.sum(1)
    width = int(counts.max()) if len(counts) else 0
    out = logits.new_zeros(logits.shape[0], width, logits.shape[-1])
    mask = torch.zeros(logits.shape[0], width, dtype=torch.bool, device=logits.device)
    for i in range(logits.shape[0]):
        n = int(counts[i])
        out[i, :n] = logits[i, real[i]]
        mask[i, :n] = True
    return out, mask


def _top_k(logits: Tensor, temperature: float, top_k: int) -> tuple[Tensor, Tensor]:
    logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
    return logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)


def _identity(model: Any, n_samples: int) -> str:
    first = next(model.parameters()).detach().float()
    return json.dumps(
        [model.config.to_json_string(), float(first.sum()), float(first.abs().sum()), n_samples]
    )


def _window_samples(config: Any) -> int:
    """Samples in the model's input window: ``2 * max_source_positions`` mel frames (30 s for Whisper)."""
    from magnet_asr.audio import ENCODER_STRIDE, HOP_LENGTH

    return int(config.max_source_positions) * ENCODER_STRIDE * HOP_LENGTH


# keys the collator adds for distillation; the trainer takes them out of the model's inputs
BATCH_KEYS = ("utterance_ids", "audio_paths", "waveforms")


@dataclass
class Distiller:
    """The distillation part of a training step: teacher targets from the cache, loss parts, weights.

    ``teacher`` is loaded when first needed (by :meth:`loss` on a cache miss, or :meth:`prepare`).
    """

    cache: TeacherCache
    teacher_name: str
    encoder_weight: float = 1.0  # MagnetWhisper students only (a SpeechLLM teacher has no frame targets)
    logits_weight: float = 1.0
    label_weight: float = 1.0
    batch_size: int = 8
    teacher: WhisperTeacher | SpeechLLMTeacher | None = None
    missing: int = 0  # training samples that had no teacher entry (their distillation weight is 0)
    report: CacheReport | None = None

    # --- filling the cache --------------------------------------------------------------------------
    def prepare(
        self,
        utterances: Sequence[Utterance],
        collator: Any,
        accelerator: Any = None,
        max_seconds: float | None = 30.0,
    ) -> CacheReport:
        """Fill the cache ahead of training (``distillation.prefill``) for every utterance not in it yet.

        Without it, training computes missing entries as it meets them (:meth:`loss`); filling first
        costs the teacher on utterances ``max_steps`` may never draw, but keeps step times even.
        Under several processes each rank fills its own shard, then all wait, so every rank finds every
        entry afterwards; bad audio is skipped and counted, as in training. ``collator`` is the run's
        (with ``keep_ids``), so the labels and keys are exactly those training looks up; ``max_seconds``
        is the run's ``data.max_seconds``, so clips training skips are skipped here too.
        """
        from magnet_asr.data.collator import SpeechDataset

        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        report = self.report = self.report or CacheReport()
        report.utterances += len(utterances)
        dataset = SpeechDataset(list(utterances)[rank::world], max_seconds=max_seconds)
        progress = tqdm(total=len(dataset), desc="teacher cache", unit="utt", disable=rank != 0)
        for begin in range(0, len(dataset), self.batch_size):
            items = [dataset[i] for i in range(begin, min(begin + self.batch_size, len(dataset)))]
            for item in items:
                if "error" in item:
                    report.skipped += 1
                    report.skipped_reasons.append(item["error"])
            batch = collator(items)
            if "labels" in batch:
                before = report.computed
                found = self._lookup(batch)
                report.reused += sum(t is not None for t in found) - (report.computed - before)
            progress.update(len(items))
        progress.close()
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return report

    def summary(self) -> dict[str, Any]:
        """Cache figures and the count of samples trained without a teacher entry (``results.json``)."""
        out: dict[str, Any] = {"teacher": self.teacher_name, "cache_dir": str(self.cache.directory)}
        out["encoder_weight"], out["logits_weight"] = self.encoder_weight, self.logits_weight
        out["label_weight"], out["temperature"] = self.label_weight, self.cache.temperature
        out["cache"] = self.report.as_dict() if self.report else None
        out["cache_reads"] = self.cache.reads
        out["samples_without_teacher"] = self.missing
        return out

    def _teacher(self, device: Any = None) -> WhisperTeacher | SpeechLLMTeacher:
        if self.teacher is None:
            self.teacher = load_teacher(self.teacher_name)
        if device is not None:
            self.teacher.model.to(device)
        return self.teacher

    # --- the loss -----------------------------------------------------------------------------------
    def loss(self, outputs: Any, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total loss, parts)`` for a model output on ``batch``: the collated inputs with the
        collator's ``utterance_ids``, ``audio_paths`` and ``waveforms``.

        total = ``label_weight`` x ASR loss + the model's other losses + ``encoder_weight`` x encoder part
        (MagnetWhisper) + ``logits_weight`` x logits part. Utterances not in the cache yet are run
        through the teacher here, once, and stored: only what training draws is ever computed, each
        rank computes its own batches, and a later epoch, run or resume reads the cache.
        """
        labels = batch["labels"]
        found = self._lookup(batch)
        self.missing += sum(t is None for t in found)
        have = torch.tensor([t is not None for t in found], device=labels.device)
        parts: dict[str, Tensor] = {}
        total = outputs.loss - (1.0 - self.label_weight) * outputs.asr_loss
        whisper = getattr(outputs, "encoder_last_hidden_state", None) is not None
        if self.encoder_weight and whisper:
            student = student_frames(outputs.encoder_last_hidden_state, outputs.boundary_outputs)
            teacher, mask = _pad_frames(found, student)
            parts["distill_encoder_loss"] = encoder_distillation_loss(student, teacher, mask * have[:, None])
            total = total + self.encoder_weight * parts["distill_encoder_loss"]
        if self.logits_weight:
            if whisper:
                logits, real = outputs.logits, labels != IGNORE_INDEX
            else:
                logits, real = response_logits(outputs.logits, outputs.labels)
            logprobs, token_ids = _pad_logits(found, logits, real)
            parts["distill_logits_loss"] = logits_distillation_loss(
                logits, logprobs, token_ids, real & have[:, None], self.cache.temperature
            )
            total = total + self.logits_weight * parts["distill_logits_loss"]
        return total, parts

    def _keys(self, batch: dict[str, Any]) -> list[str]:
        rows = batch["labels"]
        return [
            self.cache.key(i, p, row[row != IGNORE_INDEX].tolist())
            for i, p, row in zip(batch["utterance_ids"], batch["audio_paths"], rows)
        ]

    def _lookup(self, batch: dict[str, Any]) -> list[TeacherTargets | None]:
        keys = self._keys(batch)
        found = [self.cache.load(key) for key in keys]
        todo = [i for i, t in enumerate(found) if t is None]
        if not todo or batch.get("waveforms") is None:
            return found
        start = time.perf_counter()
        teacher = self._teacher(batch["labels"].device)
        computed = teacher(_rows(batch, todo), self.cache.temperature, self.cache.top_k)
        report = self.report = self.report or CacheReport()
        for i, targets in zip(todo, computed):
            report.bytes += self.cache.save(keys[i], targets)
            found[i] = targets
        report.computed += len(todo)
        report.seconds += time.perf_counter() - start
        return found


def _rows(batch: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """The sub-batch of ``rows`` (tensors indexed on their first dimension, lists picked)."""
    out: dict[str, Any] = {}
    index = torch.tensor(rows)
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() and value.shape[0] == len(batch["utterance_ids"]):
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list):
            out[key] = [value[i] for i in rows]
    return out


def _pad_frames(found: Sequence[TeacherTargets | None], student: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher frames ``(B, L, D)`` aligned with the student's frames, and the mask of real frames."""
    batch, length, dim = student.shape
    teacher = student.new_zeros(batch, length, dim)
    mask = torch.zeros(batch, length, dtype=torch.long, device=student.device)
    for i, targets in enumerate(found):
        if targets is None or targets.encoder is None:
            continue
        frames = targets.encoder.shape[0]
        if frames > length or targets.encoder.shape[1] != dim:
            raise RuntimeError(
                f"teacher frames {tuple(targets.encoder.shape)} do not fit the student's {(length, dim)}"
            )
        teacher[i, :frames] = targets.encoder.to(student.device, student.dtype)
        mask[i, :frames] = 1
    return teacher, mask


def _pad_logits(
    found: Sequence[TeacherTargets | None], logits: Tensor, real: Tensor
) -> tuple[Tensor, Tensor]:
    """Teacher top-k ``(B, N, k)`` log-probabilities and ids laid out on the label positions."""
    batch, positions = real.shape
    k = next((t.ids.shape[1] for t in found if t is not None), 1)
    # rows without a teacher entry keep zeros: finite values that the caller's mask weights by 0
    logprobs = torch.zeros(batch, positions, k, dtype=torch.float32, device=logits.device)
    ids = torch.zeros(batch, positions, k, dtype=torch.long, device=logits.device)
    for i, targets in enumerate(found):
        if targets is None:
            continue
        n = int(real[i].sum())
        if targets.ids.shape[0] != n:
            raise RuntimeError(f"teacher has {targets.ids.shape[0]} label positions, the batch row {n}")
        logprobs[i, :n] = targets.logprobs.to(logits.device, torch.float32)
        ids[i, :n] = targets.ids.to(logits.device, torch.long)
    return logprobs, ids


def build_distiller(cfg: Any) -> Distiller:
    """A :class:`Distiller` from the ``distillation`` config group of a MagnetWhisper or SpeechLLM run.

    MagnetWhisper students default to the Whisper they start from as teacher; a SpeechLLM student needs
    ``distillation.teacher`` (a trained SpeechLLM run, e.g. the uncompressed ``speech_llm_demo``)."""
    d = cfg.distillation
    if cfg.model == "speech_llm" and not d.teacher:
        raise ValueError("distillation.teacher: a SpeechLLM student needs a trained SpeechLLM teacher run")
    if cfg.training.grpo:
        raise ValueError("distillation.enabled and training.grpo: GRPO trains on its own reward; choose one")
    if list(cfg.encoder.extra_conv_strides) and d.encoder_weight:
        raise ValueError(
            "distillation.encoder_weight needs frames aligned with the teacher's; encoder.extra_conv_strides "
            "changes the frame rate (use a fixed-rate predictor, compressor.variant=uniform, instead)"
        )
    teacher_name = d.teacher or cfg.encoder.name
    teacher = load_teacher(teacher_name)
    expected = SpeechLLMTeacher if cfg.model == "speech_llm" else WhisperTeacher
    if not isinstance(teacher, expected):
        raise ValueError(
            f"distillation.teacher: {teacher_name} cannot teach a {cfg.model} student; "
            + (
                "name a trained SpeechLLM run (runs/NAME/final)"
                if cfg.model == "speech_llm"
                else "name a Whisper"
            )
        )
    cache_dir = d.cache_dir or str(Path(cfg.training.output_dir) / "teacher_cache")
    cache = TeacherCache(cache_dir, teacher.identity, temperature=d.temperature, top_k=d.top_k)
    return Distiller(
        cache,
        teacher_name,
        encoder_weight=d.encoder_weight,
        logits_weight=d.logits_weight,
        label_weight=d.label_weight,
        batch_size=d.batch_size,
        teacher=teacher,
    )
