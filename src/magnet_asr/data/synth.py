"""Synthetic speech corpus: espeak-ng and flite reading sentences from Debian's ``fortunes``.

Sentences come from :mod:`magnet_asr.data.sentences` (Debian ``fortunes`` / ``fortunes-min``; about
12,500 distinct clean sentences). Each sentence belongs to one split by a hash of its text (80/10/10 of
the pool), so validation and test sentences never occur in train, whatever the size or seed.

Voices: espeak-ng accents combined with voice variants, and flite's built-in voices. The test split is
read only by **held-out voices** (accents ``en-029`` and ``en-gb-x-gbclan`` with variants ``m6``, ``m7``,
``f5``, ``klatt3``; flite ``slt``) that train never uses; validation uses train voices on unseen
sentences (an in-domain check), test measures both unseen text and unseen speakers. Each utterance also
gets a random speaking rate (0.8-1.25x) and pitch (0.8-1.25x). Audio is resampled to 16 kHz 16-bit wav.

Output (``data_dir()/synth`` by default): ``wav/<id>.wav``, ``manifest.jsonl`` and ``details.jsonl``
(engine, voice, rate and pitch of each id). Ids read ``<split>-<index>_<engine>_<voice>``.
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magnet_asr.data.common import CorpusError, finish_build, parallel_map, prepare_build, split_by_hash
from magnet_asr.data.manifest import SPLITS, Utterance
from magnet_asr.data.sentences import FORTUNES_DIR, fortune_sentences

logger = logging.getLogger(__name__)

ESPEAK = "espeak-ng"
FLITE = "flite"
ENGINES = (ESPEAK, FLITE)
SENTENCE_FRACTIONS = (0.8, 0.1, 0.1)  # share of the sentence pool per split
RATE_RANGE = (0.8, 1.25)
PITCH_RANGE = (0.8, 1.25)

ESPEAK_ACCENTS = {
    "train": ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbcwmd"),
    "test": ("en-029", "en-gb-x-gbclan"),
}
ESPEAK_VARIANTS = {
    "train": ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "f4", "klatt"),
    "test": ("m6", "m7", "f5", "klatt3"),
}
FLITE_VOICES = {"train": ("kal16", "awb", "rms"), "test": ("slt",)}
# Mean F0 (Hz) of each flite voice, measured here, so a pitch factor can be turned into a target.
FLITE_F0 = {"kal16": 95.0, "awb": 125.0, "rms": 100.0, "slt": 165.0}


@dataclass(frozen=True)
class Voice:
    engine: str
    name: str  # espeak-ng "accent+variant", or a flite voice name


@dataclass(frozen=True)
class SynthJob:
    id: str
    split: str
    text: str
    voice: Voice
    rate: float  # speaking-rate factor, 1.0 = the engine's default
    pitch: float  # pitch factor, 1.0 = the voice's default


def voices(split: str, engines: tuple[str, ...]) -> list[Voice]:
    """Voices reading ``split``: held-out ones for test, the train ones for train and validation."""
    group = "test" if split == "test" else "train"
    found: list[Voice] = []
    if ESPEAK in engines:
        found += [Voice(ESPEAK, f"{a}+{v}") for a in ESPEAK_ACCENTS[group] for v in ESPEAK_VARIANTS[group]]
    if FLITE in engines:
        found += [Voice(FLITE, name) for name in FLITE_VOICES[group]]
    return found


def available_engines(requested: tuple[str, ...] | list[str] | None = None) -> tuple[str, ...]:
    """The requested engines (default: both) that are installed; warn about missing ones, fail if none."""
    wanted = tuple(requested) if requested else ENGINES
    unknown = [e for e in wanted if e not in ENGINES]
    if unknown:
        raise CorpusError(f"unknown synthesizer(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    found = tuple(e for e in wanted if shutil.which(e))
    missing = [e for e in wanted if e not in found]
    if not found:
        raise CorpusError(
            f"no speech synthesizer found: install them with `apt-get install {' '.join(wanted)}`"
        )
    if missing:
        names = " ".join(missing)
        logger.warning(
            "synth: %s not installed (apt-get install %s); using %s only", names, names, ", ".join(found)
        )
    return found


def split_sizes(num_utterances: int) -> dict[str, int]:
    """Train gets 10/12 of the utterances, validation and test 1/12 each (2400 -> 2000/200/200)."""
    if num_utterances < 3:
        raise CorpusError(f"synth needs at least 3 utterances (one per split), got {num_utterances}")
    held = max(1, round(num_utterances / 12))
    return {"train": num_utterances - 2 * held, "validation": held, "test": held}


def plan(sentences: list[str], num_utterances: int, engines: tuple[str, ...], seed: int) -> list[SynthJob]:
    """Decide every utterance (text, voice, rate, pitch) up front, deterministically from ``seed``."""
    pools: dict[str, list[str]] = {split: [] for split in SPLITS}
    for sentence in sentences:
        pools[split_by_hash(sentence, SENTENCE_FRACTIONS)].append(sentence)
    jobs: list[SynthJob] = []
    for split, size in split_sizes(num_utterances).items():
        rng = random.Random(f"synth-{seed}-{split}")
        pool = pools[split]
        if not pool:
            raise CorpusError(
                f"synth: no sentence left for the {split} split ({len(sentences)} sentences in all)"
            )
        rng.shuffle(pool)
        split_voices = voices(split, engines)
        by_engine = {e: [v for v in split_voices if v.engine == e] for e in engines}
        for index in range(size):
            voice = rng.choice(by_engine[rng.choice(engines)])
            rate, pitch = round(rng.uniform(*RATE_RANGE), 2), round(rng.uniform(*PITCH_RANGE), 2)
            utt_id = f"{split}-{index:05d}_{voice.engine}_{voice.name}"
            # Sentences repeat (with other voices) only when a split asks for more than its pool holds.
            jobs.append(SynthJob(utt_id, split, pool[index % len(pool)], voice, rate, pitch))
    return jobs


def _run(cmd: list[str], job: SynthJob, stdin: bytes | None = None) -> bytes:
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, check=True, timeout=120)
    except subprocess.CalledProcessError as e:
        reason = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        raise CorpusError(f"{job.voice.engine} failed on {job.id}: {reason[0] if reason else e}") from None
    except subprocess.TimeoutExpired:
        raise CorpusError(f"{job.voice.engine} timed out on {job.id}") from None
    return done.stdout


def _espeak(job: SynthJob) -> tuple[np.ndarray, int]:
    import soundfile as sf

    wpm, pitch = (
        round(175 * job.rate),
        min(99, round(50 * job.pitch)),
    )  # espeak-ng defaults: 175 wpm, pitch 50
    cmd = [ESPEAK, "-v", job.voice.name, "-s", str(wpm), "-p", str(pitch), "--stdin", "--stdout"]
    # Text goes through stdin so that nothing in a sentence can be read as an option.
    wav = _run(cmd, job, stdin=job.text.encode("utf-8"))
    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return audio, sr


def _flite(job: SynthJob) -> tuple[np.ndarray, int]:
    import soundfile as sf

    f0 = FLITE_F0.get(job.voice.name, 110.0) * job.pitch
    with tempfile.TemporaryDirectory(prefix="magnet-flite-") as tmp:
        out = Path(tmp) / "out.wav"
        cmd = [FLITE, "-voice", job.voice.name, "--setf", f"duration_stretch={1 / job.rate:.3f}"]
        cmd += ["--setf", f"int_f0_target_mean={f0:.1f}", "-t", job.text, "-o", str(out)]
        _run(cmd, job)
        audio, sr = sf.read(str(out), dtype="float32")
    return audio, sr


def synthesize(job: SynthJob) -> tuple[np.ndarray, int]:
    """Waveform and sample rate of one job, from its engine."""
    audio, sr = _espeak(job) if job.voice.engine == ESPEAK else _flite(job)
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if audio.size == 0 or float(np.abs(audio).max()) == 0.0:
        raise CorpusError(f"{job.voice.engine} produced no audio for {job.id} ({job.text!r})")
    return audio, sr


def _make(out_dir: Path, job: SynthJob) -> Utterance:
    from magnet_asr.data.common import audio_duration, write_wav

    relpath = f"wav/{job.id}.wav"
    path = out_dir / relpath
    duration = audio_duration(path) if path.exists() else None  # files are written atomically: reuse them
    if duration is None:
        duration = write_wav(path, *synthesize(job))
    return Utterance(id=job.id, audio=relpath, text=job.text, duration=round(duration, 3), split=job.split)


def _write_details(out_dir: Path, jobs: list[SynthJob]) -> None:
    with (out_dir / "details.jsonl").open("w", encoding="utf-8") as f:
        for job in jobs:
            row = {"id": job.id, "engine": job.voice.engine, "voice": job.voice.name}
            f.write(json.dumps(row | {"rate": job.rate, "pitch": job.pitch}) + "\n")


def build_synth(
    out_dir: Path,
    num_utterances: int = 2400,
    seed: int = 0,
    engines: tuple[str, ...] | list[str] | None = None,
    sentences_dir: Path | str = FORTUNES_DIR,
    workers: int = 2,
) -> Path:
    """Synthesize ``num_utterances`` (train/validation/test = 10/12, 1/12, 1/12) into ``out_dir``.

    Returns the manifest path. An interrupted build resumes: finished wav files are kept.
    """
    out_dir = Path(out_dir)
    found = available_engines(engines)
    sentences = fortune_sentences(Path(sentences_dir))
    options = {"num_utterances": num_utterances, "seed": seed, "engines": list(found)}
    prepare_build(out_dir, "synth", options | {"sentences_dir": str(sentences_dir)})
    jobs = plan(sentences, num_utterances, found, seed)
    utterances = list(parallel_map(lambda job: _make(out_dir, job), jobs, workers, desc="synth"))
    _write_details(out_dir, jobs)
    voice_sets = {
        split: sorted({f"{j.voice.engine}:{j.voice.name}" for j in jobs if j.split == split})
        for split in SPLITS
    }
    return finish_build(out_dir, utterances, sentence_pool=len(sentences), voices=voice_sets)
