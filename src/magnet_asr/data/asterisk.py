"""Real human speech: the Asterisk PBX prompts (one female speaker, Allison Smith, US English).

Audio from the Debian package ``asterisk-core-sounds-en-wav`` (``/usr/share/asterisk/sounds/en_US_f_Allison``,
568 prompts, 8 kHz), transcripts from ``asterisk-core-sounds-en`` (``core-sounds-en.txt.gz``, lines
``name: text``; names may hold a folder, e.g. ``digits/1``).

Transcript cleaning: annotations of non-speech in ``[...]``, ``<...>`` or ``(...)`` and ellipses are removed,
the keypad symbols are written as spoken (``*`` -> star, ``#`` -> pound) and four misspellings of the
transcript file are corrected (``represenatives``, ``umute``, ``indentified``, ``witheld``). Prompts with fewer than 3 words after that are
left out (single digits, letters and tones), which leaves about 280 prompts (about 21 minutes).

Split (fixed, documented): by SHA-1 of the prompt's Whisper-normalized transcript, 70/10/20 for
train/validation/test (:func:`split_of`). Hashing the text rather than the file name puts prompts that
say the same words (e.g. ``conf-locked`` and ``confbridge-locked``) in the same split, so no test sentence
is heard in training; hashing rather than ranking keeps every prompt's split when a package version adds prompts.

Audio is resampled once to 16 kHz wav in the corpus folder (``data_dir()/asterisk/wav``), so training does not
resample every epoch. Clips longer than 30 s (three of them) stay in the manifest: evaluation transcribes them
long-form or skips and counts them.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from magnet_asr.data.common import CorpusError, finish_build, parallel_map, prepare_build, split_by_hash
from magnet_asr.data.manifest import Utterance

SOUNDS_DIR = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
MIN_WORDS = 3

_ANNOTATION = re.compile(r"\[[^\]]*\]|<[^>]*>|\([^)]*\)")
# Ellipses mark where a prompt is joined to another; they are not spoken, and Whisper's normalizer
# would leave a lone "." token behind that no hypothesis contains.
_ELLIPSIS = re.compile(r"\.{2,}|\u2026")
_SPOKEN_SYMBOLS = {"*": " star ", "#": " pound "}
# Misspellings in core-sounds-en.txt (found by looking up every word in CMUdict); the audio says the word.
_TYPOS = {
    "represenatives": "representatives",
    "umute": "unmute",
    "indentified": "identified",
    "witheld": "withheld",
}


def read_transcripts(path: Path = TRANSCRIPTS) -> dict[str, str]:
    """``name -> text`` from the ``name: text`` lines (``;`` starts a comment); gzip or plain text."""
    if not path.is_file():
        raise CorpusError(
            f"{path} not found: install transcripts with `apt-get install asterisk-core-sounds-en`"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    transcripts: dict[str, str] = {}
    for line in lines:
        if not line.strip() or line.lstrip().startswith(";") or ":" not in line:
            continue
        name, text = line.split(":", 1)
        transcripts[name.strip()] = text.strip()
    return transcripts


def clean_transcript(text: str) -> str:
    """The words actually spoken: annotations and ellipses removed, keypad symbols spelled, typos fixed."""
    text = _ELLIPSIS.sub(" ", _ANNOTATION.sub(" ", text))
    for symbol, spoken in _SPOKEN_SYMBOLS.items():
        text = text.replace(symbol, spoken)
    text = re.sub(r"[A-Za-z]+", lambda m: _TYPOS.get(m.group(0).lower(), m.group(0)), text)
    return re.sub(r"\s+", " ", text).strip()


def word_count(text: str) -> int:
    return sum(1 for token in text.split() if re.search(r"[A-Za-z0-9]", token))


def split_of(text: str) -> str:
    """The fixed split of a prompt, from its normalized transcript (see the module docstring)."""
    from magnet_asr.text import normalize

    return split_by_hash("asterisk:" + normalize(text), SPLIT_FRACTIONS)


def prompts(sounds_dir: Path = SOUNDS_DIR, transcripts: Path = TRANSCRIPTS) -> list[tuple[str, Path, str]]:
    """``(name, wav path, cleaned text)`` of every prompt with audio and at least ``MIN_WORDS`` words."""
    if not sounds_dir.is_dir():
        raise CorpusError(
            f"{sounds_dir} not found: install the recordings with `apt-get install asterisk-core-sounds-en-wav`"
        )
    found = []
    for name, raw in sorted(read_transcripts(transcripts).items()):
        wav = sounds_dir / f"{name}.wav"
        text = clean_transcript(raw)
        if wav.is_file() and word_count(text) >= MIN_WORDS:
            found.append((name, wav, text))
    if not found:
        raise CorpusError(f"{sounds_dir}: no prompt has both audio and a transcript of {MIN_WORDS}+ words")
    return found


def _convert(out_dir: Path, name: str, source: Path, text: str) -> Utterance:
    import soundfile as sf

    from magnet_asr.data.common import audio_duration, write_wav

    utt_id = name.replace("/", ".")  # ids double as file names; prompt names hold no dots
    relpath = f"wav/{utt_id}.wav"
    target = out_dir / relpath
    duration = audio_duration(target) if target.exists() else None
    if duration is None:
        try:
            audio, sr = sf.read(str(source), dtype="float32")
        except Exception as e:  # libsndfile raises several types for bad files
            raise CorpusError(f"{source}: cannot decode audio ({e})") from None
        duration = write_wav(target, audio.mean(axis=1) if audio.ndim > 1 else audio, sr)
    return Utterance(id=utt_id, audio=relpath, text=text, duration=round(duration, 3), split=split_of(text))


def build_asterisk(
    out_dir: Path,
    sounds_dir: Path | str = SOUNDS_DIR,
    transcripts: Path | str = TRANSCRIPTS,
    workers: int = 2,
) -> Path:
    """Resample the prompts into ``out_dir/wav`` and write the manifest; returns its path."""
    out_dir = Path(out_dir)
    found = prompts(Path(sounds_dir), Path(transcripts))
    prepare_build(out_dir, "asterisk", {"sounds_dir": str(sounds_dir), "transcripts": str(transcripts)})
    utterances = list(parallel_map(lambda p: _convert(out_dir, *p), found, workers, desc="asterisk"))
    longer = sorted(u.id for u in utterances if u.duration > 30.0)
    return finish_build(out_dir, utterances, longer_than_30s=longer)
