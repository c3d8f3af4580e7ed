"""The real asterisk prompts: transcript cleaning, the fixed split, and a full build (about 5 s)."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf

from magnet_asr.data import CorpusError, asterisk, build_corpus, read_manifest
from magnet_asr.text import normalize

HAVE_PACKAGES = asterisk.SOUNDS_DIR.is_dir() and asterisk.TRANSCRIPTS.is_file()
needs_packages = pytest.mark.skipif(
    not HAVE_PACKAGES, reason="apt-get install asterisk-core-sounds-en-wav asterisk-core-sounds-en"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_PACKAGES:
        pytest.skip("apt-get install asterisk-core-sounds-en-wav asterisk-core-sounds-en")
    return asterisk.build_asterisk(tmp_path_factory.mktemp("asterisk"), workers=2)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("press * to toggle pause, press # to enter", "press star to toggle pause, press pound to enter"),
        (
            "Please leave your message after the tone. (simple tone sound plays)",
            "Please leave your message after the tone.",
        ),
        ("[this is a simple beep tone]", ""),
        ("<beep ascending>", ""),
        ('IAX (note: does not say "2")', "IAX"),
        ("... letters of your party's first or last name.", "letters of your party's first or last name."),
        ("The last caller was...", "The last caller was"),
        ("All of our represenatives are busy.", "All of our representatives are busy."),
    ],
)
def test_clean_transcript(raw, clean):
    assert asterisk.clean_transcript(raw) == clean


def test_prompts_from_a_small_fake_package(tmp_path, tone):
    sounds = tmp_path / "sounds"
    tone(sounds / "hello-world.wav", 1.0, 8000)
    tone(sounds / "digits" / "1.wav", 0.5, 8000)
    tone(sounds / "conf-locked.wav", 1.5, 8000)
    transcripts = tmp_path / "core-sounds-en.txt.gz"
    with gzip.open(transcripts, "wt") as f:
        f.write("; comment\nhello-world: Hello there, dear world.\ndigits/1: One.\n")
        f.write("conf-locked: [beep] The conference is now locked.\nmissing-audio: This has no audio file.\n")
    found = asterisk.prompts(sounds, transcripts)
    assert [(name, text) for name, _, text in found] == [
        ("conf-locked", "The conference is now locked."),
        ("hello-world", "Hello there, dear world."),
    ]
    manifest = asterisk.build_asterisk(
        tmp_path / "out", sounds_dir=sounds, transcripts=transcripts, workers=1
    )
    utts = read_manifest(manifest)
    assert [u.id for u in utts] == ["conf-locked", "hello-world"]
    assert utts[0].duration == pytest.approx(1.5, abs=1e-3) and sf.info(utts[0].audio).samplerate == 16_000


def test_missing_package_gives_one_line_error(tmp_path):
    with pytest.raises(CorpusError, match="apt-get install asterisk-core-sounds-en-wav"):
        asterisk.prompts(tmp_path / "nope", asterisk.TRANSCRIPTS)
    with pytest.raises(CorpusError, match="apt-get install asterisk-core-sounds-en`"):
        asterisk.read_transcripts(tmp_path / "nope.txt.gz")


@needs_packages
def test_full_build_split_is_fixed_and_about_70_10_20(built):
    utts = read_manifest(built)
    assert 250 <= len(utts) <= 300
    counts = Counter(u.split for u in utts)
    for split, share in (("train", 0.7), ("validation", 0.1), ("test", 0.2)):
        assert abs(counts[split] / len(utts) - share) < 0.05, counts
    assert all(u.split == asterisk.split_of(u.text) for u in utts)  # a pure function of the transcript
    by_text: dict[str, set[str]] = {}
    for u in utts:
        by_text.setdefault(normalize(u.text), set()).add(u.split)
    assert all(len(splits) == 1 for splits in by_text.values())  # same words never in two splits


@needs_packages
def test_full_build_texts_audio_and_long_clips(built):
    utts = read_manifest(built)
    assert all(asterisk.word_count(u.text) >= 3 for u in utts)
    assert not any(ch in u.text for u in utts for ch in "[]<>()*#")
    assert not any("..." in u.text or normalize(u.text).endswith(".") for u in utts)
    longer = sorted(u.id for u in utts if u.duration > 30)
    assert longer == ["demo-congrats", "demo-instruct", "priv-callee-options"]  # kept, not dropped
    for u in utts[:: len(utts) // 10]:
        source = sf.info(str(asterisk.SOUNDS_DIR / (u.id.replace(".", "/") + ".wav")))
        target = sf.info(u.audio)
        assert source.samplerate == 8000 and target.samplerate == 16_000
        assert u.duration == pytest.approx(source.duration, abs=2e-3)
        assert u.duration == pytest.approx(target.frames / 16_000, abs=1e-3)


@needs_packages
def test_registry_reuses_the_build(built):
    stamp = built.stat().st_mtime_ns
    assert build_corpus("asterisk", out_dir=built.parent) == built
    assert built.stat().st_mtime_ns == stamp
