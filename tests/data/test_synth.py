"""Synthetic speech corpus: sentence source, plan (splits, held-out voices) and a tiny real build."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from magnet_asr.data import CorpusError, build_corpus, read_manifest, synth
from magnet_asr.data.sentences import fortune_sentences, is_clean

needs_fortunes = pytest.mark.skipif(
    not Path("/usr/share/games/fortunes").is_dir(), reason="apt-get install fortunes fortunes-min"
)
needs_engine = pytest.mark.skipif(
    not (shutil.which("espeak-ng") or shutil.which("flite")), reason="apt-get install espeak-ng flite"
)


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    if not Path("/usr/share/games/fortunes").is_dir():
        pytest.skip("apt-get install fortunes fortunes-min")
    return fortune_sentences()


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 real utterances (20/2/2), synthesized once for the module."""
    if not Path("/usr/share/games/fortunes").is_dir() or not (
        shutil.which("espeak-ng") or shutil.which("flite")
    ):
        pytest.skip("needs fortunes and espeak-ng or flite")
    return synth.build_synth(tmp_path_factory.mktemp("synth"), num_utterances=24, workers=2)


def test_sentence_source_is_large_and_clean(sentences):
    assert len(sentences) >= 2000
    assert len(set(sentences)) == len(sentences) and sentences == sorted(sentences)
    for s in sentences:
        assert is_clean(s) and s.isascii() and 3 <= len(s.split()) <= 25


@pytest.mark.parametrize(
    "bad",
    [
        "Too short.",
        "See page 42 of the book.",
        "He said -- nothing at all.",
        "Ask the NSA about it.",
        "no capital here.",
    ],
)
def test_awkward_sentences_are_rejected(bad):
    assert not is_clean(bad)


def test_plan_holds_out_sentences_and_voices(sentences):
    jobs = synth.plan(sentences, 2400, synth.ENGINES, seed=0)
    by_split = {s: [j for j in jobs if j.split == s] for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in by_split.items()} == {"train": 2000, "validation": 200, "test": 200}
    text = {s: {j.text for j in v} for s, v in by_split.items()}
    voices = {s: {j.voice for j in v} for s, v in by_split.items()}
    assert not text["train"] & text["test"] and not text["train"] & text["validation"]
    assert not text["validation"] & text["test"]
    assert not voices["train"] & voices["test"]
    assert len(voices["train"]) > 20 and len(voices["test"]) >= 5
    assert {j.voice.engine for j in jobs} == set(synth.ENGINES)
    rates = {j.rate for j in jobs}
    assert min(rates) >= 0.8 and max(rates) <= 1.25 and len(rates) > 10
    assert len({j.id for j in jobs}) == len(jobs)


def test_plan_is_deterministic(sentences):
    assert synth.plan(sentences, 60, synth.ENGINES, seed=3) == synth.plan(
        sentences, 60, synth.ENGINES, seed=3
    )
    assert synth.plan(sentences, 60, synth.ENGINES, seed=3) != synth.plan(
        sentences, 60, synth.ENGINES, seed=4
    )


def test_split_sizes():
    assert synth.split_sizes(2400) == {"train": 2000, "validation": 200, "test": 200}
    assert synth.split_sizes(12) == {"train": 10, "validation": 1, "test": 1}
    with pytest.raises(CorpusError):
        synth.split_sizes(2)


@needs_fortunes
@needs_engine
def test_tiny_build_manifest_and_audio(tiny_build):
    utts = read_manifest(tiny_build)
    assert [sum(u.split == s for u in utts) for s in ("train", "validation", "test")] == [20, 2, 2]
    for u in utts:
        info = sf.info(u.audio)
        assert info.samplerate == 16_000 and info.channels == 1
        assert u.duration == pytest.approx(info.frames / 16_000, abs=1e-3)
        assert 0.5 < u.duration < 20 and u.text
    details = [json.loads(line) for line in (tiny_build.parent / "details.jsonl").read_text().splitlines()]
    voice = {d["id"]: (d["engine"], d["voice"]) for d in details}
    train_voices = {voice[u.id] for u in utts if u.split == "train"}
    assert not train_voices & {voice[u.id] for u in utts if u.split == "test"}
    assert not {u.text for u in utts if u.split == "train"} & {u.text for u in utts if u.split == "test"}


@needs_fortunes
@needs_engine
def test_build_corpus_is_idempotent_and_rebuilds_on_new_options(tmp_path):
    out = tmp_path / "s"
    first = build_corpus("synth", out_dir=out, num_utterances=6)
    stamp = first.stat().st_mtime_ns
    assert build_corpus("synth", out_dir=out, num_utterances=6) == first
    assert build_corpus("synth", out_dir=out) == first  # no options: whatever is built
    assert first.stat().st_mtime_ns == stamp
    build_corpus("synth", out_dir=out, num_utterances=3)
    assert len(read_manifest(first)) == 3
    assert len(list((out / "wav").glob("*.wav"))) == 3  # audio of the old build is gone


@needs_fortunes
@needs_engine
def test_build_of_an_older_manifest_version_reruns_and_keeps_the_audio(tmp_path):
    out = tmp_path / "s"
    first = build_corpus("synth", out_dir=out, num_utterances=3)
    info = json.loads((out / "build.json").read_text())
    del info["manifest_version"]  # as written before phone times existed
    (out / "build.json").write_text(json.dumps(info))
    wavs = {p.name: p.stat().st_mtime_ns for p in (out / "wav").glob("*.wav")}
    stamp = first.stat().st_mtime_ns
    assert build_corpus("synth", out_dir=out) == first  # no options: the recorded ones, not the defaults
    assert first.stat().st_mtime_ns != stamp and len(read_manifest(first)) == 3  # written again...
    assert {p.name: p.stat().st_mtime_ns for p in (out / "wav").glob("*.wav")} == wavs  # ...the audio was not
    assert json.loads((out / "build.json").read_text())["manifest_version"] == synth.MANIFEST_VERSION


def test_missing_engine_is_reported(monkeypatch, caplog):
    monkeypatch.setattr(synth.shutil, "which", lambda cmd: None if cmd == "flite" else f"/usr/bin/{cmd}")
    with caplog.at_level(logging.WARNING):
        assert synth.available_engines() == ("espeak-ng",)
    assert "apt-get install flite" in caplog.text
    monkeypatch.setattr(synth.shutil, "which", lambda cmd: None)
    with pytest.raises(CorpusError, match="apt-get install espeak-ng flite"):
        synth.available_engines()
    with pytest.raises(CorpusError, match="unknown synthesizer"):
        synth.available_engines(["festival"])


@needs_fortunes
def test_only_available_engine_voices_are_planned(sentences):
    jobs = synth.plan(sentences, 30, ("flite",), seed=0)
    assert {j.voice.engine for j in jobs} == {"flite"}
    assert {j.voice.name for j in jobs if j.split == "test"} == {"slt"}


needs_flite = pytest.mark.skipif(not shutil.which("flite"), reason="apt-get install flite")


def test_parse_phone_ends_reads_flite_tokens():
    phones, ends = synth.parse_phone_ends("pau:0.180 hh:0.241 ax:0.280 \n")
    assert phones == ["pau", "hh", "ax"] and ends == [0.18, 0.241, 0.28]
    with pytest.raises(ValueError, match="on u1: 'hh0.241'"):
        synth.parse_phone_ends("pau:0.180 hh0.241", where="on u1")
    with pytest.raises(ValueError, match="'ax:x'"):
        synth.parse_phone_ends("ax:x")
    with pytest.raises(ValueError, match="no phone timing"):
        synth.parse_phone_ends("  \n")


def test_check_phone_ends_needs_increasing_times_that_end_with_the_wav():
    assert synth.check_phone_ends([0.1, 0.3, 1.0], 1.015) is None
    assert "20 ms" in synth.check_phone_ends([0.1, 0.3, 1.0], 1.03)
    assert "increasing" in synth.check_phone_ends([0.1, 0.1, 1.0], 1.0)
    assert "increasing" in synth.check_phone_ends([], 1.0)


@needs_flite
def test_flite_phone_ends_agree_with_its_wav():
    job = synth.SynthJob("u", "test", "Hello there, world.", synth.Voice("flite", "slt"), 1.1, 0.9)
    audio, sr, (phones, ends) = synth._flite(job)
    duration = len(audio) / sr
    assert phones[0] == phones[-1] == "pau" and "hh" in phones and len(phones) == len(ends)
    assert all(b > a for a, b in zip(ends, ends[1:])) and ends[0] > 0
    assert ends[-1] == pytest.approx(duration, abs=0.02)
    assert synth.check_phone_ends(ends, duration) is None


@needs_flite
def test_existing_flite_wav_is_kept_and_gets_phone_times(tmp_path):
    job = synth.SynthJob("u", "test", "Good morning.", synth.Voice("flite", "awb"), 1.0, 1.0)
    first, problem = synth._make(tmp_path, job)
    wav = tmp_path / first.audio
    assert problem is None and first.phone_ends and first.phones
    before = (wav.read_bytes(), wav.stat().st_mtime_ns)
    again, problem = synth._make(tmp_path, job)
    assert (wav.read_bytes(), wav.stat().st_mtime_ns) == before  # timed, not rewritten
    assert problem is None and again.phone_ends == first.phone_ends


@needs_flite
def test_flite_timing_that_misses_the_wav_end_is_dropped(tmp_path, monkeypatch):
    job = synth.SynthJob("u", "test", "Good morning.", synth.Voice("flite", "awb"), 1.0, 1.0)
    synth._make(tmp_path, job)
    monkeypatch.setattr(synth, "_flite_timing", lambda job: (["pau", "g"], [0.1, 9.0]))
    utt, problem = synth._make(tmp_path, job)
    assert utt.phone_ends is None and utt.phones is None and "20 ms" in problem
    stats = synth.phone_time_stats([job, job], [problem, None])
    assert stats == {"test": {"with": 1, "without": 1, "reasons": {problem: 1}}}


@needs_fortunes
@needs_engine
def test_tiny_build_records_phone_times_of_flite_utterances(tiny_build):
    utts = read_manifest(tiny_build)
    info = json.loads((tiny_build.parent / "build.json").read_text())
    assert info["manifest_version"] == synth.MANIFEST_VERSION
    flite = [u for u in utts if "_flite_" in u.id]
    assert sum(
        info["phone_ends"][s]["with"] + info["phone_ends"][s]["without"] for s in info["phone_ends"]
    ) == len(flite)
    for u in utts:
        if u.phone_ends is not None:
            assert "_flite_" in u.id and abs(u.phone_ends[-1] - u.duration) <= 0.02
        elif "_espeak-ng_" in u.id:
            assert u.phones is None
