"""The manifest format every corpus is turned into.

One JSON object per line: ``id``, ``audio`` (path, absolute or relative to the manifest),
``text``, ``duration`` (seconds) and ``split`` (``train`` / ``validation`` / ``test``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

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
            )
            if split is None or utt.split == split:
                out.append(utt)
    return out


def write_manifest(utterances: Iterable[Utterance], path: str | Path) -> Path:
    """Write a jsonl manifest atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for utt in utterances:
                f.write(json.dumps(asdict(utt), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
