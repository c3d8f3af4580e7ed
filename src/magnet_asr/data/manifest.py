"""The manifest format every corpus is turned into.

One JSON object per line: ``id``, ``audio`` (path, absolute or relative to the manifest),
``text``, ``duration`` (seconds) and ``split`` (``train`` / ``validation`` / ``test``).

Optional: ``phones`` (labels, ``pau`` for silence) and ``phone_ends`` (the end time of each phone in
seconds, increasing, same length), the synthesizer's own timing of what it spoke (flite, see
:mod:`magnet_asr.data.synth`). Rows without them are written without these keys, so manifests of
corpora that have no phone times stay byte-identical to what they were before the fields existed.
``hash_split: true`` marks a row whose source gave no split: the importer chose one by hashing the id
(:mod:`magnet_asr.data.folder`), which training uses, while evaluation reads such a list whole
(:func:`has_own_splits`). Written only when true.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SPLITS = ("train", "validation", "test")


class ManifestError(ValueError):
    """A manifest file or one of its lines is malformed."""


@dataclass
class Utterance:
    id: str
    audio: str
    text: str
    duration: float
    split: str = "train"
    phones: list[str] | None = None  # phone labels ("pau" = silence); None when unknown
    phone_ends: list[float] | None = None  # seconds, increasing, one per phone; None when unknown
    hash_split: bool = False  # the split was drawn from a hash of the id: the source had none

    def to_row(self) -> dict[str, Any]:
        """The manifest row: every field, except ``phones`` / ``phone_ends`` when None, ``hash_split`` when
        False."""
        row = asdict(self)
        for key in OPTIONAL_FIELDS:
            if row[key] is None or row[key] is False:
                del row[key]
        return row


OPTIONAL_FIELDS = ("phones", "phone_ends", "hash_split")


def _phone_fields(row: dict[str, Any], where: str) -> tuple[list[str] | None, list[float] | None]:
    """``phones`` and ``phone_ends`` of a manifest row, checked: both or neither, same length, increasing."""
    phones, ends = row.get("phones"), row.get("phone_ends")
    if phones is None and ends is None:
        return None, None
    if phones is None or ends is None:
        given, absent = ("phones", "phone_ends") if ends is None else ("phone_ends", "phones")
        raise ManifestError(f"{where}: field {given} without {absent}")
    if not isinstance(phones, list) or not all(isinstance(p, str) for p in phones):
        raise ManifestError(f"{where}: field phones must be a list of strings")
    if not isinstance(ends, list) or not all(isinstance(t, int | float) for t in ends):
        raise ManifestError(f"{where}: field phone_ends must be a list of numbers")
    if len(phones) != len(ends):
        raise ManifestError(
            f"{where}: fields phones ({len(phones)}) and phone_ends ({len(ends)}) differ in length"
        )
    values = [float(t) for t in ends]
    if any(b <= a for a, b in zip(values, values[1:])) or (values and values[0] <= 0):
        raise ManifestError(f"{where}: field phone_ends must be positive and increasing")
    return list(phones), values


def read_manifest(path: str | Path, split: str | None = None) -> list[Utterance]:
    """Read a jsonl manifest; relative audio paths are resolved against the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    out: list[Utterance] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            missing = [k for k in ("id", "audio", "text") if k not in row]
            if missing:
                raise ManifestError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            audio = Path(row["audio"])
            if not audio.is_absolute():
                audio = path.parent / audio
            utt = Utterance(
                id=str(row["id"]),
                audio=str(audio),
                text=str(row["text"]),
                duration=float(row.get("duration", 0.0)),
                split=str(row.get("split", "train")),
                hash_split=row.get("hash_split") is True,
            )
            utt.phones, utt.phone_ends = _phone_fields(row, f"{path}:{lineno}")
            if split is None or utt.split == split:
                out.append(utt)
    return out


def has_own_splits(utterances: Iterable[Utterance]) -> bool:
    """False when every row's split was drawn by hash on import (a list or folder without a split column):
    such a list is evaluated whole rather than by its arbitrary ``test`` tenth."""
    return not all(u.hash_split for u in utterances)


def write_manifest(utterances: Iterable[Utterance], path: str | Path) -> Path:
    """Write a jsonl manifest atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for utt in utterances:
                f.write(json.dumps(utt.to_row(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
