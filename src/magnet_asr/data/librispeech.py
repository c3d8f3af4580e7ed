"""LibriSpeech (or any audio + text dataset) through Hugging Face ``datasets``.

Online users get LibriSpeech from the hub (``openslr/librispeech_asr``, config ``clean``: ``train.100``,
``validation``, ``test``); ``streaming=True`` reads it without downloading whole splits first, which
together with ``limit`` makes a small subset cheap. The same loader takes a local source: a folder
written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or parquet file(s) or a folder of them.

Audio is read undecoded (``Audio(decode=False)``: bytes or a path) and decoded with soundfile, so no
torchcodec / torchaudio is needed; every clip is written as 16 kHz wav under ``wav/`` and listed in the
manifest. The text column is ``text`` (or ``sentence`` / ``transcription``), the id column ``id`` if present.

Data specs (``data.train`` etc., resolved by :func:`magnet_asr.data.corpora.resolve_data`; :func:`librispeech_source`):

- ``librispeech:SPLIT``: one LibriSpeech split, named as the folders (``train-clean-100``, ``dev-clean``...) or as
  the hub (``train.clean.100``, ``validation.clean``, ``test.other``; the ``clean`` config's ``train.100``,
  ``validation``, ``test``). Read from ``data.librispeech_root`` when set (a LibriSpeech folder holding
  ``train-clean-100/`` etc., or a local ``datasets`` dataset with that split), else from the hub.
- ``librispeech:PATH``: a local folder or file: a LibriSpeech split folder (``SPEAKER/CHAPTER/*.flac`` +
  ``SPEAKER-CHAPTER.trans.txt``; its name gives the split) or the folder holding such split folders, a
  ``save_to_disk`` dataset, or parquet file(s).

A folder in the LibriSpeech layout is read in place (no copies); a ``datasets`` source is copied to wav, or
streamed by :mod:`magnet_asr.data.streaming` (``data.streaming=true``).
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from magnet_asr.data.common import CorpusError, finish_build, prepare_build
from magnet_asr.data.manifest import SPLITS, Utterance

HUB_NAME = "openslr/librispeech_asr"
HUB_CONFIG = "clean"
HUB_SPLITS = {"train.100": "train", "validation": "validation", "test": "test"}
TEXT_COLUMNS = ("text", "sentence", "transcription", "transcript")
SPEC_PREFIX = "librispeech:"
# LibriSpeech's split folders -> (hub config, the split's name in that config, its name in config "all")
LIBRISPEECH_SPLITS: dict[str, tuple[str, str, str]] = {
    "train-clean-100": ("clean", "train.100", "train.clean.100"),
    "train-clean-360": ("clean", "train.360", "train.clean.360"),
    "train-other-500": ("other", "train.500", "train.other.500"),
    "dev-clean": ("clean", "validation", "validation.clean"),
    "dev-other": ("other", "validation", "validation.other"),
    "test-clean": ("clean", "test", "test.clean"),
    "test-other": ("other", "test", "test.other"),
}


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


def split_folder(name: str) -> str | None:
    """The LibriSpeech folder name (``train-clean-100``) of a split named either way (``train.clean.100``,
    ``train.100``, ``dev-clean``); ``None`` when ``name`` is none of them. The ``clean`` config's names
    (``validation``, ``test``) mean the clean splits, as on the hub."""
    for folder, (config, short, long) in LIBRISPEECH_SPLITS.items():
        if name in (folder, long) or (config == HUB_CONFIG and name == short):
            return folder
    return None


@dataclass
class LibriSource:
    """Where a ``librispeech:`` spec's utterances come from.

    ``kind``: ``folders`` (LibriSpeech layout, read in place: ``folders`` maps each split folder to our
    split), ``local`` (a ``datasets`` dataset at ``location``) or ``hub`` (``location`` is the hub name).
    ``splits`` maps the dataset's split names to ours (``None``: every split it has, by name).
    """

    spec: str
    kind: str
    location: str
    config: str | None = None
    splits: dict[str, str] | None = None
    folders: dict[Path, str] = field(default_factory=dict)


def _is_libri_folder(path: Path) -> bool:
    return path.is_dir() and next(path.glob("*/*/*.trans.txt"), None) is not None


def _local_splits(path: Path, folder: str) -> dict[str, str]:
    """The split of the local dataset ``path`` that is LibriSpeech's ``folder``, named as the dataset names it."""
    import datasets

    if path.is_dir() and (path / "dataset_dict.json").exists():
        names = list(datasets.load_from_disk(str(path)))
    else:
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        names = sorted({_parquet_split(f) for f in files} | {f.parent.name for f in files})
        if not files:
            raise CorpusError(
                f"{path}: neither LibriSpeech folders, a save_to_disk dataset nor parquet files"
            )
    config, short, long = LIBRISPEECH_SPLITS[folder]
    wanted = [folder, long] + ([short] if config == HUB_CONFIG else [])
    found = next((n for n in wanted if n in names), None)
    if found is None:
        raise CorpusError(
            f"{path}: no split {' / '.join(wanted)} in this dataset (it has {', '.join(names)})"
        )
    return {found: our_split(long)}


def librispeech_source(spec: str, root: str | Path | None = None) -> LibriSource:
    """Resolve a ``librispeech:SPLIT`` or ``librispeech:PATH`` spec (module docstring) without reading audio.

    ``root``: ``data.librispeech_root``, where ``librispeech:SPLIT`` looks before the hub.
    """
    rest = spec[len(SPEC_PREFIX) :] if spec.startswith(SPEC_PREFIX) else spec
    folder = split_folder(rest)
    if folder is not None:
        if root is None or str(root) == "":
            config, short, _ = LIBRISPEECH_SPLITS[folder]
            return LibriSource(spec, "hub", HUB_NAME, config, {short: our_split(short)})
        base = Path(root).expanduser()
        if _is_libri_folder(base / folder):
            return LibriSource(spec, "folders", str(base), folders={base / folder: our_split(folder)})
        if base.name == folder and _is_libri_folder(base):
            return LibriSource(spec, "folders", str(base), folders={base: our_split(folder)})
        if not base.exists():
            raise CorpusError(f"data.librispeech_root: {base} does not exist")
        if _is_libri_folder(base) or any(_is_libri_folder(sub) for sub in base.iterdir()):
            raise CorpusError(f"data.librispeech_root: {base} has no {folder}/ folder")
        return LibriSource(spec, "local", str(base), splits=_local_splits(base, folder))
    path = Path(rest).expanduser()
    if not path.exists():
        names = ", ".join(LIBRISPEECH_SPLITS)
        raise CorpusError(f"{spec}: neither a LibriSpeech split ({names}) nor an existing folder or file")
    if _is_libri_folder(path):
        return LibriSource(spec, "folders", str(path), folders={path: _folder_split(path)})
    subfolders = {sub: _folder_split(sub) for sub in sorted(path.iterdir()) if _is_libri_folder(sub)}
    if subfolders:
        return LibriSource(spec, "folders", str(path), folders=subfolders)
    return LibriSource(spec, "local", str(path))


def _folder_split(path: Path) -> str:
    try:
        return our_split(path.name)
    except CorpusError:
        raise CorpusError(
            f"{path}: cannot tell the split from the folder name; name it train-*, dev-* or test-* "
            "as LibriSpeech does"
        ) from None


def import_folders(source: LibriSource, out_path: Path) -> Path:
    """The manifest of a LibriSpeech-layout source, audio read where it is; durations from the file headers."""
    from tqdm.auto import tqdm

    from magnet_asr.data.common import audio_duration
    from magnet_asr.data.folder import trans_entries
    from magnet_asr.data.manifest import write_manifest

    utterances = []
    for folder, split in source.folders.items():
        for trans in tqdm(sorted(folder.glob("*/*/*.trans.txt")), desc=folder.name, unit="chapter"):
            for utt, audio, text in trans_entries(trans):
                duration = audio_duration(audio) or 0.0  # 0: unreadable, skipped and counted when read
                utterances.append(Utterance(utt, str(audio), text, round(duration, 3), split))
    if not utterances:
        raise CorpusError(f"{source.spec}: no utterances found")
    return write_manifest(utterances, out_path)


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
