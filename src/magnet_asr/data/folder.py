"""Import a user's own audio + text into a manifest: a folder, a tsv list or a jsonl list.

- **Folder**: every audio file (wav, flac, ogg, opus, mp3, aiff) under it, recursively, whose transcript sits
  beside it in a same-name ``.txt`` file (``a/b.wav`` + ``a/b.txt``). LibriSpeech's layout works too: a
  ``*.trans.txt`` file of ``ID text`` lines names ``ID.flac`` (or any audio extension) in its folder.
- **tsv**: ``path<TAB>text`` lines, optionally a third ``split`` column; ``#`` starts a comment, a first line
  ``path<TAB>text`` is a header. Relative paths are relative to the tsv file.
- **jsonl**: one object per line with ``audio`` (or ``path``) and ``text``; ``id``, ``split`` and ``duration``
  are optional. Relative paths are relative to the jsonl file.

Durations are read from the file headers. A file libsndfile cannot read stays in the manifest with duration
0: evaluation then lists it under ``skipped`` with its reason rather than losing it silently. Splits: the
``split`` argument for everything, else the source's own split column, else a deterministic hash of the id
(80/10/10 by default). Hash-split rows are marked ``hash_split``: training uses that split, while ``eval``
scores a list without any split of its own whole unless it is given ``--split``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from magnet_asr.data.common import (
    AUDIO_EXTENSIONS,
    CorpusError,
    audio_duration,
    finish_build,
    prepare_build,
    split_by_hash,
)
from magnet_asr.data.manifest import SPLITS, Utterance, write_manifest

logger = logging.getLogger(__name__)

IMPORT_FRACTIONS = (0.8, 0.1, 0.1)
MANIFEST_VERSION = 2  # 2: rows whose split was hashed carry ``hash_split``


@dataclass
class Entry:
    id: str
    audio: Path
    text: str
    split: str | None = None


def _audio_beside(stem: Path) -> Path | None:
    return next((stem.with_suffix(ext) for ext in AUDIO_EXTENSIONS if stem.with_suffix(ext).is_file()), None)


def _id_of(path: Path, root: Path) -> str:
    """Path relative to ``root`` without extension, ``/`` as ``.`` (ids double as file names)."""
    try:
        rel = path.with_suffix("").relative_to(root)
    except ValueError:
        rel = Path(path.stem)
    return ".".join(rel.parts)


def trans_entries(trans: Path) -> Iterator[tuple[str, Path, str]]:
    """``(id, audio file, text)`` for each line of a LibriSpeech ``SPEAKER-CHAPTER.trans.txt`` (``ID text``)
    whose audio file (``ID.flac`` or any audio extension) sits beside it."""
    for line in trans.read_text(encoding="utf-8", errors="replace").splitlines():
        utt, _, text = line.strip().partition(" ")
        audio = _audio_beside(trans.parent / utt) if utt else None
        if audio is not None:
            yield utt, audio, text.strip()


def scan_folder(folder: Path) -> list[Entry]:
    """Audio files with transcripts under ``folder`` (same-name ``.txt`` or LibriSpeech ``*.trans.txt``)."""
    entries: dict[Path, Entry] = {}
    for trans in sorted(folder.rglob("*.trans.txt")):
        for _, audio, text in trans_entries(trans):
            entries[audio] = Entry(_id_of(audio, folder), audio, text)
    for audio in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()):
        transcript = audio.with_suffix(".txt")
        if audio not in entries and transcript.is_file():
            text = " ".join(transcript.read_text(encoding="utf-8", errors="replace").split())
            entries[audio] = Entry(_id_of(audio, folder), audio, text)
    if not entries:
        raise CorpusError(f"{folder}: no audio file with a same-name .txt transcript found")
    return list(entries.values())


def read_tsv(path: Path) -> list[Entry]:
    """Entries of a ``path<TAB>text[<TAB>split]`` list."""
    entries = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cols = line.split("\t")
        if lineno == 1 and cols[0].strip().lower() in ("path", "audio", "file"):
            continue
        if len(cols) < 2:
            raise CorpusError(f"{path}:{lineno}: expected path<TAB>text, got {line[:60]!r}")
        audio = _resolve(cols[0].strip(), path.parent)
        split = cols[2].strip() if len(cols) > 2 and cols[2].strip() else None
        entries.append(Entry(_id_of(audio, path.parent), audio, cols[1].strip(), split))
    return entries


def read_jsonl(path: Path) -> list[Entry]:
    """Entries of a jsonl list (``audio`` or ``path``, ``text``; optional ``id`` and ``split``)."""
    entries = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            audio = _resolve(str(row.get("audio") or row["path"]), path.parent)
            text = str(row["text"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CorpusError(
                f"{path}:{lineno}: expected a JSON object with 'audio' (or 'path') and 'text'"
            ) from None
        entries.append(Entry(str(row.get("id") or _id_of(audio, path.parent)), audio, text, row.get("split")))
    return entries


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def read_entries(source: Path) -> list[Entry]:
    """Entries of a folder, ``.tsv`` or ``.jsonl`` source."""
    if source.is_dir():
        return scan_folder(source)
    if not source.is_file():
        raise CorpusError(f"{source}: no such file or folder")
    if source.suffix.lower() in (".tsv", ".txt"):
        return read_tsv(source)
    if source.suffix.lower() in (".jsonl", ".json"):
        return read_jsonl(source)
    raise CorpusError(f"{source}: unknown list format (use a folder, a .tsv or a .jsonl)")


def _unique(entries: list[Entry]) -> None:
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if entry.id in seen:
            entry.id = f"{entry.id}-{index}"
        seen.add(entry.id)


def to_utterances(
    entries: list[Entry], split: str | None = None, fractions: tuple[float, float, float] = IMPORT_FRACTIONS
) -> list[Utterance]:
    """Utterances with absolute paths, header durations and a split (see the module docstring)."""
    if split is not None and split not in SPLITS:
        raise CorpusError(f"split {split!r}: use one of {', '.join(SPLITS)}")
    _unique(entries)
    utterances, unreadable = [], 0
    for e in entries:
        duration = audio_duration(e.audio)
        unreadable += duration is None
        own = split or (e.split if e.split in SPLITS else None)
        chosen = own or split_by_hash(e.id, fractions)
        text = re.sub(r"\s+", " ", e.text).strip()
        utterances.append(
            Utterance(e.id, str(e.audio), text, round(duration or 0.0, 3), chosen, hash_split=own is None)
        )
    if unreadable:
        logger.warning("%d of %d audio files cannot be read; kept with duration 0", unreadable, len(entries))
    return utterances


def import_source(
    source: Path | str,
    out_path: Path | str,
    split: str | None = None,
    fractions: tuple[float, float, float] = IMPORT_FRACTIONS,
    limit: int | None = None,
) -> Path:
    """Turn a folder / tsv / jsonl ``source`` into the manifest ``out_path`` (at most ``limit`` entries)."""
    entries = read_entries(Path(source).expanduser().resolve())[:limit]
    a, b, c = fractions
    return write_manifest(to_utterances(entries, split, (a, b, c)), Path(out_path))


def build_manifest(
    out_dir: Path,
    source: Path | str | None = None,
    split: str | None = None,
    fractions: tuple[float, float, float] = IMPORT_FRACTIONS,
    limit: int | None = None,
) -> Path:
    """The ``manifest`` corpus: import ``source`` into ``out_dir/manifest.jsonl`` (audio stays where it is)."""
    if source is None:
        raise CorpusError("corpus 'manifest' needs a source: a folder, a .tsv or a .jsonl list")
    source = Path(source).expanduser().resolve()
    out_dir = Path(out_dir)
    prepare_build(
        out_dir, "manifest", {"source": str(source), "split": split, "fractions": fractions, "limit": limit}
    )
    a, b, c = fractions
    return finish_build(
        out_dir,
        to_utterances(read_entries(source)[:limit], split, (a, b, c)),
        source=str(source),
        manifest_version=MANIFEST_VERSION,
    )
