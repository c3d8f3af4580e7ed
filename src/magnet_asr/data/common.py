"""Helpers every corpus builder shares: errors, deterministic splits, 16 kHz wav output, parallel maps."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

MANIFEST_NAME = "manifest.jsonl"
BUILD_INFO_NAME = "build.json"
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")

T = TypeVar("T")
R = TypeVar("R")


class CorpusError(RuntimeError):
    """A corpus cannot be built or found; the message is one line and says what to do."""


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone (SHA-1), so splits never depend on order, seed or platform."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_hash(key: str, fractions: tuple[float, float, float]) -> str:
    """``train`` / ``validation`` / ``test`` for ``key``, in proportions ``fractions`` (they need not sum to 1)."""
    total = sum(fractions)
    if total <= 0 or min(fractions) < 0:
        raise ValueError(f"invalid split fractions {fractions}")
    x = stable_fraction(key) * total
    if x < fractions[0]:
        return "train"
    return "validation" if x < fractions[0] + fractions[1] else "test"


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> float:
    """Write ``audio`` as 16 kHz 16-bit mono wav (resampling first), atomically; returns its duration in s.

    16-bit PCM halves the disk of float32 and is what every reader handles; the rename makes an
    interrupted build leave no half-written file, so a rerun may trust files that exist.
    """
    import soundfile as sf

    from magnet_asr.audio import SAMPLE_RATE, resample  # imports torch: only when audio is written

    audio = resample(np.asarray(audio, dtype=np.float32), sample_rate, SAMPLE_RATE)
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak > 1.0:  # resampling can overshoot full scale; scale rather than clip
        audio = audio / peak
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".wav")
    os.close(fd)
    try:
        sf.write(tmp, audio, SAMPLE_RATE, subtype="PCM_16")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return audio.size / SAMPLE_RATE


def audio_duration(path: str | Path) -> float | None:
    """Duration from the file header (no decoding); ``None`` when libsndfile cannot read the file."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception:  # libsndfile raises several types for unreadable files
        return None
    return info.frames / info.samplerate if info.samplerate else None


def parallel_map(fn: Callable[[T], R], items: list[T], workers: int, desc: str) -> Iterator[R]:
    """``map(fn, items)`` in order on ``workers`` threads with a tqdm progress bar.

    Threads suffice: the heavy work happens in synthesizer subprocesses, soxr and libsndfile, which
    release the GIL; threads also avoid pickling closures for a process pool.
    """
    from tqdm.auto import tqdm

    with tqdm(total=len(items), desc=desc, unit="utt", dynamic_ncols=True) as bar:
        if workers <= 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(fn, items):
                yield result
                bar.update()


def read_build_info(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / BUILD_INFO_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_build_info(out_dir: Path, info: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / BUILD_INFO_NAME).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")


def split_counts(splits: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for split in splits:
        counts[split] = counts.get(split, 0) + 1
    return counts


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(options, sort_keys=True, default=str))


def prepare_build(out_dir: Path, corpus: str, options: dict[str, Any]) -> None:
    """Claim ``out_dir`` for a build of ``corpus`` with ``options`` (those that change the output).

    When the directory holds a build of the same corpus with other options, its audio and manifest are
    removed first: builders reuse audio files that exist (to resume an interrupted build), which is only
    right while the options that decided their content are unchanged. Nothing is removed from a
    directory that has no ``build.json`` of ours.
    """
    options = _jsonable(options)
    old = read_build_info(out_dir)
    if old is not None and old.get("corpus") == corpus and old.get("options") != options:
        shutil.rmtree(out_dir / "wav", ignore_errors=True)
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    write_build_info(out_dir, {"corpus": corpus, "options": options})


def finish_build(out_dir: Path, utterances: list[Any], **stats: Any) -> Path:
    """Write the manifest (last, atomically: its presence means the build is complete) and the stats."""
    from magnet_asr.data.manifest import write_manifest

    info = read_build_info(out_dir) or {}
    info["counts"] = split_counts(u.split for u in utterances)
    info["hours"] = round(sum(u.duration for u in utterances) / 3600, 3)
    info.update(_jsonable(stats))
    write_build_info(out_dir, info)
    return write_manifest(utterances, out_dir / MANIFEST_NAME)
