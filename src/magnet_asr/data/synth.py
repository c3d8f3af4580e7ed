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

Phone times: flite utterances carry ``phones`` and ``phone_ends`` in the manifest, flite's own timing
of what it synthesized (``flite -psdur``, same voice and settings as the audio), the ground truth the
boundary scores compare predicted segment ends with (:mod:`magnet_asr.evaluation.boundaries`). They are
kept only when the last phone ends within :data:`PHONE_END_TOLERANCE` of the wav's end; espeak-ng
utterances have none. ``build.json`` records per split how many flite utterances got them and why the
others did not (``phone_ends``).
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
from typing import Any

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
# Phone times are kept when flite's last phone end and the wav's duration differ by at most this (s):
# one encoder frame (50 frames/s), the tolerance the boundary scores use.
PHONE_END_TOLERANCE = 0.02
# Version of what a manifest row holds; build_corpus rebuilds a finished corpus whose build.json records
# an older one (2: flite phone times). A rebuild with unchanged options keeps and reuses every wav.
MANIFEST_VERSION = 2


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


def parse_phone_ends(output: str, where: str = "flite -psdur") -> tuple[list[str], list[float]]:
    """Phone labels and end times (s) from ``flite -psdur`` output: whitespace-separated ``phone:end``.

    ``"pau:0.180 hh:0.241 ax:0.280"`` -> ``(["pau", "hh", "ax"], [0.18, 0.241, 0.28])``. The times are
    returned as printed (not checked for order; see :func:`check_phone_ends`). A token that is not
    ``label:number`` raises ``ValueError`` naming ``where`` and the token.
    """
    phones: list[str] = []
    ends: list[float] = []
    for token in output.split():
        label, sep, end = token.rpartition(":")
        try:
            value = float(end)
        except ValueError:
            value = float("nan")
        if not sep or not label or value != value:  # value != value: NaN, i.e. not a number
            raise ValueError(f"{where}: {token!r} is not a phone:end_seconds token")
        phones.append(label)
        ends.append(value)
    if not phones:
        raise ValueError(f"{where}: no phone timing in the output")
    return phones, ends


def check_phone_ends(
    ends: list[float], duration: float, tolerance: float = PHONE_END_TOLERANCE
) -> str | None:
    """Why the phone ends do not fit a wav of ``duration`` s, or None when they do.

    They fit when they are positive and strictly increasing and the last one lies within ``tolerance``
    of ``duration``.
    """
    if not ends or ends[0] <= 0 or any(b <= a for a, b in zip(ends, ends[1:])):
        return "phone ends not increasing"
    if abs(ends[-1] - duration) > tolerance:
        return f"last phone end more than {tolerance * 1000:.0f} ms from the wav's end"
    return None


def _flite_cmd(job: SynthJob, out: Path) -> list[str]:
    """flite with the job's voice, rate and pitch, printing phone end times (``-psdur``) to stdout.

    ``-psdur`` only prints: the wav it writes is byte-identical to the one written without it (checked
    with ``cmp`` for kal16, awb, rms and slt with rate and pitch set; and 16 corpus wavs, 4 per voice,
    built without ``-psdur``, came out byte-identical through :func:`write_wav`), so audio and timings
    come from one run, and an existing corpus wav can be timed by a second run whose audio is dropped.
    """
    f0 = FLITE_F0.get(job.voice.name, 110.0) * job.pitch
    cmd = [FLITE, "-voice", job.voice.name, "--setf", f"duration_stretch={1 / job.rate:.3f}"]
    return cmd + ["--setf", f"int_f0_target_mean={f0:.1f}", "-psdur", "-t", job.text, "-o", str(out)]


def _flite(job: SynthJob) -> tuple[np.ndarray, int, tuple[list[str], list[float]]]:
    """Audio, sample rate and ``(phones, phone_ends)`` of one flite job."""
    import soundfile as sf

    with tempfile.TemporaryDirectory(prefix="magnet-flite-") as tmp:
        out = Path(tmp) / "out.wav"
        printed = _run(_flite_cmd(job, out), job)
        audio, sr = sf.read(str(out), dtype="float32")
    try:
        timing = parse_phone_ends(
            printed.decode("utf-8", errors="replace"), where=f"flite -psdur on {job.id}"
        )
    except ValueError as e:
        raise CorpusError(str(e)) from None
    return audio, sr, timing


def _flite_timing(job: SynthJob) -> tuple[list[str], list[float]]:
    """Phone labels and ends of a flite job, without keeping its audio (the corpus wav already exists)."""
    return _flite(job)[2]


def synthesize(job: SynthJob) -> tuple[np.ndarray, int]:
    """Waveform and sample rate of one job, from its engine."""
    return _synthesize(job)[:2]


def _synthesize(job: SynthJob) -> tuple[np.ndarray, int, tuple[list[str], list[float]] | None]:
    """Waveform, sample rate and (flite only) the phone timing of one job."""
    timing = None
    if job.voice.engine == ESPEAK:
        audio, sr = _espeak(job)
    else:
        audio, sr, timing = _flite(job)
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if audio.size == 0 or float(np.abs(audio).max()) == 0.0:
        raise CorpusError(f"{job.voice.engine} produced no audio for {job.id} ({job.text!r})")
    return audio, sr, timing


def _make(out_dir: Path, job: SynthJob) -> tuple[Utterance, str | None]:
    """The job's utterance, and for a flite job without phone times the reason it has none.

    An existing wav is kept as it is (files are written atomically, and runs may be training on them):
    a flite job then runs flite once more only for the timing, whose audio is thrown away.
    """
    from magnet_asr.data.common import audio_duration, write_wav

    relpath = f"wav/{job.id}.wav"
    path = out_dir / relpath
    duration = audio_duration(path) if path.exists() else None
    timing = None
    if duration is None:
        audio, sr, timing = _synthesize(job)
        duration = write_wav(path, audio, sr)
    elif job.voice.engine == FLITE:
        timing = _flite_timing(job)
    utt = Utterance(id=job.id, audio=relpath, text=job.text, duration=round(duration, 3), split=job.split)
    if timing is None:
        return utt, None
    phones, ends = timing
    problem = check_phone_ends(ends, duration)
    if problem is None:
        utt.phones, utt.phone_ends = phones, ends
    return utt, problem


def phone_time_stats(jobs: list[SynthJob], problems: list[str | None]) -> dict[str, dict[str, Any]]:
    """Per split: flite utterances with phone times, without, and the reasons (``jobs`` and ``problems``
    in the same order, as :func:`_make` returns them)."""
    stats: dict[str, dict[str, Any]] = {}
    for job, problem in zip(jobs, problems):
        if job.voice.engine != FLITE:
            continue
        entry = stats.setdefault(job.split, {"with": 0, "without": 0, "reasons": {}})
        if problem is None:
            entry["with"] += 1
        else:
            entry["without"] += 1
            entry["reasons"][problem] = entry["reasons"].get(problem, 0) + 1
    return stats


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
    made = list(parallel_map(lambda job: _make(out_dir, job), jobs, workers, desc="synth"))
    utterances = [utt for utt, _ in made]
    phone_stats = phone_time_stats(jobs, [problem for _, problem in made])
    for split, entry in phone_stats.items():
        level = logging.WARNING if entry["without"] else logging.INFO
        logger.log(
            level,
            "synth %s: %d flite utterances with phone times, %d without %s",
            split,
            entry["with"],
            entry["without"],
            entry["reasons"] or "",
        )
    _write_details(out_dir, jobs)
    voice_sets = {
        split: sorted({f"{j.voice.engine}:{j.voice.name}" for j in jobs if j.split == split})
        for split in SPLITS
    }
    return finish_build(
        out_dir,
        utterances,
        sentence_pool=len(sentences),
        voices=voice_sets,
        phone_ends=phone_stats,
        manifest_version=MANIFEST_VERSION,
    )
