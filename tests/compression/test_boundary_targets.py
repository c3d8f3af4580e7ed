"""Target counts: fixed rate from real frames, transcripts through magnet_asr.text, curriculum counts."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from magnet_asr.compression import fixed_rate_counts, scheduled_counts, target_counts, transcript_counts


def test_fixed_rate_uses_real_frames_and_clamps() -> None:
    counts = fixed_rate_counts(torch.tensor([100, 12, 3, 0]), 5.0)
    # 100/5 = 20; 12/5 = 2.4; 3/5 -> at least the forced final segment; no frames -> no segment
    assert counts.tolist() == pytest.approx([20.0, 2.4, 1.0, 0.0])
    assert fixed_rate_counts([7, 7], 1.0).tolist() == [7.0, 7.0]
    with pytest.raises(ValueError, match="compression_factor"):
        fixed_rate_counts([10], 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        fixed_rate_counts([-1], 2.0)


@pytest.fixture
def fake_text(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    # transcript_counts imports magnet_asr.text lazily; a stand-in module pins the plumbing exactly.
    module = types.ModuleType("magnet_asr.text")
    module.count_phonemes = lambda text: 3 * len(text.split())  # type: ignore[attr-defined]
    module.count_syllables = lambda text: len(text.split())  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "magnet_asr.text", module)
    return module


def test_transcript_counts_by_unit(fake_text: types.ModuleType) -> None:
    texts = ["hello world", "a", ""]
    assert transcript_counts(texts, "phoneme").tolist() == [6.0, 3.0, 0.0]
    assert transcript_counts(texts, "syllable").tolist() == [2.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="unit"):
        transcript_counts(texts, "word")
    with pytest.raises(TypeError, match="sequence of transcripts"):
        transcript_counts("hello world", "phoneme")


def test_target_counts_dispatch_and_clamping(fake_text: types.ModuleType) -> None:
    frames = torch.tensor([50, 4, 10])
    texts = ["one two three", "one two three", ""]
    # 9 phonemes; 9 > 4 frames -> 4; empty transcript -> the forced final segment
    assert target_counts("phoneme", frames, texts).tolist() == [9.0, 4.0, 1.0]
    assert target_counts("syllable", frames, texts).tolist() == [3.0, 3.0, 1.0]
    assert target_counts("fixed", frames, compression_factor=5.0).tolist() == pytest.approx([10.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="needs the transcripts"):
        target_counts("phoneme", frames)
    with pytest.raises(ValueError, match="3 samples"):
        target_counts("phoneme", frames, texts[:2])
    with pytest.raises(ValueError, match="compression_factor"):
        target_counts("fixed", frames)


def test_real_text_module_is_used_when_present() -> None:
    text = pytest.importorskip("magnet_asr.text")
    sentence = "the quick brown fox"
    assert transcript_counts([sentence], "phoneme").item() == float(text.count_phonemes(sentence))
    assert transcript_counts([sentence], "syllable").item() == float(text.count_syllables(sentence))


def test_scheduled_counts_go_from_every_frame_to_the_final_counts() -> None:
    frames = torch.tensor([100, 30])
    final = torch.tensor([20.0, 10.0])  # factors 5 and 3
    assert scheduled_counts(frames, final, 0.0).tolist() == [100.0, 30.0]
    assert scheduled_counts(frames, final, 1.0).tolist() == pytest.approx([20.0, 10.0])
    # halfway in the factor: 3x and 2x
    assert scheduled_counts(frames, final, 0.5).tolist() == pytest.approx([100 / 3, 15.0])
    with pytest.raises(ValueError, match="fraction"):
        scheduled_counts(frames, final, 1.5)


def test_phone_boundary_frames_round_to_the_frame_that_ends_nearest() -> None:
    from magnet_asr.compression.targets import phone_boundary_frames

    # frame t ends at (t + 1) * 20 ms: 0.06 s -> frame 2; 0.101 s -> 0.1 s -> frame 4; duplicates merge;
    # times past the end clamp to the last frame, which is always included
    assert phone_boundary_frames([0.06, 0.101, 0.099, 5.0], 10, 0.02) == [2, 4, 9]
    assert phone_boundary_frames([], 3, 0.02) == [2]
    assert phone_boundary_frames([0.5], 0, 0.02) == []


def test_supervised_boundaries_keep_phone_ends_and_halve_the_longest_segments() -> None:
    from magnet_asr.compression.targets import supervised_boundaries

    # segments [0..3] (4 frames) and [4..9] (6 frames): the 6-frame one is cut first, in its middle
    assert supervised_boundaries([3, 9], 10, 2) == [3, 9]
    assert supervised_boundaries([3, 9], 10, 3) == [3, 6, 9]
    assert supervised_boundaries([3, 9], 10, 4) == [1, 3, 6, 9]
    # a target below the phone count keeps every phone end; one at the frame count is 1x
    assert supervised_boundaries([1, 3, 6, 9], 10, 2) == [1, 3, 6, 9]
    assert supervised_boundaries([9], 10, 10) == list(range(10))
    assert supervised_boundaries([9], 10, 50) == list(range(10))
    with pytest.raises(ValueError, match="last frame 9"):
        supervised_boundaries([3], 10, 4)


def test_reference_boundaries_drop_the_file_end_and_silence_runs() -> None:
    from magnet_asr.compression.targets import reference_boundaries

    phones = ["pau", "pau", "h", "ay", "pau"]
    ends = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert reference_boundaries(phones, ends) == [0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match="differ in length"):
        reference_boundaries(phones, ends[:-1])
