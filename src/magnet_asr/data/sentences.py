"""English sentences for synthetic speech, taken from Debian's fortune cookie databases.

Source: the Debian packages ``fortunes`` and ``fortunes-min`` (``/usr/share/games/fortunes``), the
classic BSD ``fortune`` databases of quotations, proverbs, jokes and verse (public domain / BSD-licensed
collections; see ``/usr/share/doc/fortunes/copyright``). Only the non-offensive files are installed there.

A fortune is split into sentences, and a sentence is kept when it reads cleanly aloud: 3 to 25 words,
ASCII letters with ordinary punctuation only (no digits, so transcripts never disagree with how the
synthesizer reads a number), starting with a capital and ending with ``.``, ``!`` or ``?``.
Attributions (``-- Author``), dialogue layouts (``Q:``, ``Name:``), overstruck text and acronyms are skipped.
The result (about 12,500 distinct sentences) is sorted, so it does not depend on file-system order.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from magnet_asr.data.common import CorpusError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
MIN_WORDS = 3
MAX_WORDS = 25

# Files that are pictures, code, non-English or command-line jargon rather than sentences.
SKIPPED_FILES = frozenset(
    {
        "art",
        "ascii-art",
        "perl",
        "translate-me",
        "linux",
        "linuxcookie",
        "debian",
        "computers",
        "zippy",
        "definitions",
    }
)

# A sentence ends at . ! ? (maybe closed by a quote) followed by a capital; not after a title or an initial.
_SENTENCE_END = re.compile(
    r"(?<!\bMr)(?<!\bMrs)(?<!\bDr)(?<!\bSt)(?<!\bMs)(?<!\bJr)(?<!\bSr)(?<=[.!?])[\"']?\s+(?=[\"']?[A-Z])"
)
_CLEAN = re.compile(r"^[A-Z][A-Za-z ,'\-;]*[A-Za-z][.!?]$")
# Things a reader would stumble on: doubled quotes or dashes, stray quotes or hyphens, acronyms, initials.
_AWKWARD = re.compile(r"''|--|\s'|'\s|'$|\b[A-Z]{2,}\b|-\s|\s-|\b[A-HJ-Z]\.")
_ATTRIBUTION = re.compile(r"^\s*--")
_SPEAKER = re.compile(r"^\s*[A-Z][A-Za-z]*:\s")


def _fortunes(path: Path) -> list[str]:
    """The entries of one fortune file (they are separated by lines holding a single ``%``)."""
    text = path.read_text(encoding="latin-1")
    return [entry for entry in re.split(r"\n%\n", text) if entry.strip()]


def _entry_sentences(entry: str) -> list[str]:
    """Candidate sentences of one fortune: attribution dropped, lines joined, split at sentence ends."""
    if "\x08" in entry:  # overstrike (bold/underline) formatting: not plain prose
        return []
    lines: list[str] = []
    for line in entry.splitlines():
        if _ATTRIBUTION.match(line):
            break
        if _SPEAKER.match(line):  # "Q: ..." / "Kirk: ..." dialogue reads badly without the layout
            return []
        lines.append(line.strip())
    text = re.sub(r"\s+", " ", " ".join(lines)).strip()
    return [s.strip().strip('"').strip() for s in _SENTENCE_END.split(text)]


def is_clean(sentence: str) -> bool:
    """True when ``sentence`` is plain English prose of the allowed length."""
    if not _CLEAN.match(sentence) or _AWKWARD.search(sentence):
        return False
    return MIN_WORDS <= len(sentence.split()) <= MAX_WORDS


def fortune_sentences(root: Path = FORTUNES_DIR) -> list[str]:
    """All distinct clean sentences of the fortune files under ``root``, sorted."""
    return list(_fortune_sentences(Path(root)))


@lru_cache(maxsize=4)  # parsing takes about a second; a process builds from the same files repeatedly
def _fortune_sentences(root: Path) -> tuple[str, ...]:
    if not root.is_dir():
        raise CorpusError(f"{root} not found: install sentences with `apt-get install fortunes fortunes-min`")
    found: set[str] = set()
    for path in sorted(root.iterdir()):
        # Data files have no extension; .dat/.u8 are indexes and links.
        if path.suffix or path.name in SKIPPED_FILES or not path.is_file():
            continue
        for entry in _fortunes(path):
            found.update(s for s in _entry_sentences(entry) if is_clean(s))
    if not found:
        raise CorpusError(f"{root}: no usable sentences (is `fortunes` installed?)")
    return tuple(sorted(found))
