"""Tiny LibriSpeech look-alikes made from real synthesized speech (flite), for the data and training tests.

- :func:`write_librispeech_folder`: the LibriSpeech layout, ``SPLIT/SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac``
  beside ``SPEAKER-CHAPTER.trans.txt``;
- :func:`write_librispeech_dataset`: the same utterances as a ``datasets`` dataset with the hub's split names
  (``train.clean.100``, ``validation.clean``, ``test.clean``) and the flac bytes embedded, saved with
  ``save_to_disk`` or as parquet files.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

SENTENCES = [
    "PLEASE ENTER YOUR ACCOUNT NUMBER",
    "THANK YOU FOR CALLING",
    "THE PARTY YOU ARE CALLING IS NOT AVAILABLE",
    "PRESS ONE FOR SALES",
    "YOUR CALL IS IMPORTANT TO US",
    "GOODBYE AND HAVE A NICE DAY",
    "PLEASE HOLD THE LINE",
    "THE MAILBOX IS FULL",
    "ENTER YOUR PASSWORD NOW",
    "WELCOME TO THE CONFERENCE",
    "TRANSFER IN PROGRESS",
    "RECORD YOUR MESSAGE AFTER THE TONE",
]
# split folder -> [(speaker, chapter, number of utterances)]
LAYOUT = {
    "train-clean-100": [(19, 198, 2), (19, 227, 2), (26, 495, 2), (26, 496, 2)],
    "dev-clean": [(84, 121, 2)],
    "test-clean": [(61, 70968, 2)],
}
HUB_NAMES = {
    "train-clean-100": "train.clean.100",
    "dev-clean": "validation.clean",
    "test-clean": "test.clean",
}


def flac_bytes(text: str) -> bytes:
    """``text`` spoken by flite (16 kHz... as flite writes it), encoded as flac."""
    import soundfile as sf

    if not shutil.which("flite"):
        pytest.skip("needs flite (apt-get install flite)")
    with tempfile.TemporaryDirectory() as tmp:
        wav, flac = Path(tmp) / "a.wav", Path(tmp) / "a.flac"
        subprocess.run(["flite", "-t", text.lower(), "-o", str(wav)], check=True, capture_output=True)
        audio, rate = sf.read(str(wav))
        sf.write(str(flac), audio, rate, format="FLAC")
        return flac.read_bytes()


def utterances() -> dict[str, list[tuple[str, str, bytes]]]:
    """``{split folder: [(id, text, flac bytes)]}`` following :data:`LAYOUT`."""
    out: dict[str, list[tuple[str, str, bytes]]] = {}
    index = 0
    for split, chapters in LAYOUT.items():
        rows = out.setdefault(split, [])
        for speaker, chapter, count in chapters:
            for n in range(count):
                text = SENTENCES[index % len(SENTENCES)]
                rows.append((f"{speaker}-{chapter}-{n:04d}", text, flac_bytes(text)))
                index += 1
    return out


def write_librispeech_folder(root: Path, utts: dict[str, list[tuple[str, str, bytes]]]) -> Path:
    """``root`` (LibriSpeech/) with one folder per split in the LibriSpeech layout."""
    for split, rows in utts.items():
        for utt_id, text, audio in rows:
            speaker, chapter, _ = utt_id.split("-")
            folder = root / split / speaker / chapter
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{utt_id}.flac").write_bytes(audio)
            with (folder / f"{speaker}-{chapter}.trans.txt").open("a") as f:
                f.write(f"{utt_id} {text}\n")
    return root


def write_librispeech_dataset(path: Path, utts: dict[str, list[tuple[str, str, bytes]]], fmt: str) -> Path:
    """The utterances as a ``datasets`` dataset at ``path``: ``fmt`` ``disk`` (save_to_disk) or ``parquet``
    (``path/SPLIT-00000-of-00001.parquet`` per split)."""
    import datasets

    splits = {}
    for split, rows in utts.items():
        columns = {
            "audio": [{"bytes": audio, "path": f"{utt_id}.flac"} for utt_id, _, audio in rows],
            "text": [text for _, text, _ in rows],
            "id": [utt_id for utt_id, _, _ in rows],
        }
        splits[HUB_NAMES[split]] = datasets.Dataset.from_dict(columns).cast_column(
            "audio", datasets.Audio(decode=False)
        )
    if fmt == "disk":
        datasets.DatasetDict(splits).save_to_disk(str(path))
    else:
        path.mkdir(parents=True, exist_ok=True)
        for name, ds in splits.items():
            ds.to_parquet(str(path / f"{name}-00000-of-00001.parquet"))
    return path
