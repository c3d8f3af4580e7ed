"""LibriSpeech (or any audio + text dataset) through Hugging Face ``datasets``.

Online users get LibriSpeech from the hub (``openslr/librispeech_asr``, config ``clean``: ``train.100``,
``validation``, ``test``); ``streaming=True`` reads it without downloading whole splits first, which
together with ``limit`` makes a small subset cheap. The same loader takes a local source: a folder
written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or parquet file(s) or a folder of them.

Audio is read undecoded (``Audio(decode=False)``: bytes or a path) and decoded with soundfile, so no
torchcodec / torchaudio is needed; every clip is written as 16 kHz wav under ``wav/`` and listed in the
manifest. The text column is ``text`` (or ``sentence`` / ``transcription``), the id column ``id`` if present.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from magnet_asr.data.common import CorpusError, finish_build, prepare_build
from magnet_asr.data.manifest import SPLITS, Utterance

HUB_NAME = "openslr/librispeech_asr"
HUB_CONFIG = "clean"
HUB_SPLITS = {"train.100": "train", "validation": "validation", "test": "test"}
TEXT_COLUMNS = ("text", "sentence", "transcription", "transcript")


def our_split(name: str) -> str:
    """Map a dataset's split name onto train / validation / test (``train.100`` -> train, ``dev`` -> validation)."""
    lowered = name.lower()
    if lowered.startswith("train"):
        return "train"
    if lowered.startswith(("valid", "dev", "eval")):
        return "validation"
    if lowered.startswith("test"):
        return "test"
    raise CorpusError(
        f"split {name!r}: cannot tell whether it is train, validation or test; pass splits={{...}}"
    )


def _open_local(path: Path, streaming: bool) -> dict[str, Iterable[dict[str, Any]]]:
    """A local dataset as ``{split name: rows}``."""
    import datasets

    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"test": loaded}
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".parquet" for f in files):
        raise CorpusError(f"{path}: not a saved dataset (save_to_disk) nor parquet file(s)")
    by_split: dict[str, list[str]] = {}
    for f in files:
        by_split.setdefault(_parquet_split(f), []).append(str(f))
    return dict(datasets.load_dataset("parquet", data_files=by_split, streaming=streaming))


def _parquet_split(path: Path) -> str:
    """Split named by the file (``test-00000-of-00001.parquet``) or its folder (``test/0.parquet``); else test."""
    for candidate in (path.stem.split("-")[0], path.parent.name):
        try:
            our_split(candidate)
        except CorpusError:
            continue
        return candidate
    return "test"  # an unlabeled file is most likely something to evaluate on


def _open_hub(name: str, config: str | None, splits: dict[str, str], streaming: bool) -> dict[str, Iterable]:
    import datasets

    try:
        return {s: datasets.load_dataset(name, config, split=s, streaming=streaming) for s in splits}
    except Exception as e:  # network, authentication or a wrong name: one line is enough
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorpusError(f"{name}: cannot load from the hub ({first})") from None


def _undecoded(rows: Any) -> Any:
    """Rows whose audio stays encoded (bytes / path): decoding would need torchcodec, which we avoid."""
    import datasets

    if hasattr(rows, "cast_column") and "audio" in (rows.features or {}):
        return rows.cast_column("audio", datasets.Audio(decode=False))
    if isinstance(rows, datasets.IterableDataset) and hasattr(rows, "decode"):
        return rows.decode(False)  # a stream whose features are not known up front
    return rows


def _decode(audio: dict[str, Any], base: Path | None) -> tuple[Any, int]:
    import numpy as np
    import soundfile as sf

    if "array" in audio and audio.get("sampling_rate"):  # already decoded upstream
        return np.asarray(audio["array"], dtype=np.float32), int(audio["sampling_rate"])
    if audio.get("bytes"):
        return sf.read(io.BytesIO(audio["bytes"]), dtype="float32")
    path = Path(audio.get("path") or "")
    if not path.is_absolute() and base is not None:
        path = base / path
    return sf.read(str(path), dtype="float32")


def _row_id(row: dict[str, Any], index: int, split: str, seen: set[str]) -> str:
    """The row's own id (made file-name safe), unique within the corpus."""
    utt_id = str(row.get("id") or f"{split}-{index:07d}").replace("/", ".").strip(".")
    if not utt_id or utt_id in seen:  # e.g. the same id in two splits of a local dataset: keep both
        utt_id = f"{utt_id or split}-{index:07d}"
    seen.add(utt_id)
    return utt_id


def _utterance(out_dir: Path, row: dict[str, Any], utt_id: str, split: str, base: Path | None) -> Utterance:
    from magnet_asr.data.common import write_wav

    text_column = next((c for c in TEXT_COLUMNS if c in row), None)
    if text_column is None or "audio" not in row:
        raise CorpusError(
            f"dataset rows need an 'audio' and a text column ({', '.join(TEXT_COLUMNS)}); got {sorted(row)}"
        )
    try:
        audio, sr = _decode(row["audio"], base)
    except Exception as e:  # libsndfile raises several types for bad or missing audio
        raise CorpusError(
            f"{utt_id}: cannot decode audio ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    relpath = f"wav/{split}/{utt_id}.wav"
    duration = write_wav(out_dir / relpath, audio.mean(axis=1) if audio.ndim > 1 else audio, sr)
    return Utterance(
        id=utt_id, audio=relpath, text=str(row[text_column]), duration=round(duration, 3), split=split
    )


def _rows(
    sources: dict[str, Iterable], splits: dict[str, str] | None, limit: int | None
) -> Iterator[tuple[str, dict]]:
    for name, rows in sources.items():
        split = splits[name] if splits and name in splits else our_split(name)
        if split not in SPLITS:
            raise CorpusError(f"split {name!r} mapped to {split!r}; use one of {', '.join(SPLITS)}")
        for row in itertools.islice(_undecoded(rows), limit):
            yield split, row


def build_librispeech(
    out_dir: Path,
    source: str | Path = HUB_NAME,
    config: str | None = HUB_CONFIG,
    splits: dict[str, str] | None = None,
    split: str | None = None,
    streaming: bool = False,
    limit: int | None = None,
) -> Path:
    """Write ``source`` (a hub dataset name or a local path) as wav files + manifest into ``out_dir``.

    ``splits`` maps the dataset's split names to ours (default for the hub: :data:`HUB_SPLITS`; for a local
    source every split it has, by name); ``split`` is a shorthand for it: comma-separated dataset split names
    (``test``, ``validation,test``; LibriSpeech's ``test.clean``-style names select the hub config ``all``).
    ``limit`` caps the utterances taken from each split.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if split:
        splits = {name.strip(): our_split(name.strip()) for name in split.split(",") if name.strip()}
        if config == HUB_CONFIG and any(".clean" in n or ".other" in n for n in splits):
            config = (
                "all"  # openslr/librispeech_asr names its splits train.clean.100, test.other... only there
            )
    local = Path(source).expanduser()
    if local.exists():
        sources, base = _open_local(local, streaming), (local if local.is_dir() else local.parent)
        if splits:
            sources = {k: v for k, v in sources.items() if k in splits}
    else:
        splits = splits or HUB_SPLITS
        sources, base = _open_hub(str(source), config, splits, streaming), None
    prepare_build(
        out_dir, "librispeech", {"source": str(source), "config": config, "splits": splits, "limit": limit}
    )
    utterances: list[Utterance] = []
    seen: set[str] = set()
    for index, (split, row) in enumerate(tqdm(_rows(sources, splits, limit), desc="librispeech", unit="utt")):
        utterances.append(_utterance(out_dir, row, _row_id(row, index, split, seen), split, base))
    if not utterances:
        raise CorpusError(f"{source}: no utterances found")
    return finish_build(out_dir, utterances)
