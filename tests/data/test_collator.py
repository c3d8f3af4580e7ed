import pytest
import torch

from magnet_asr.data.collator import collate_target_counts

TEXTS = ["the cat sat on the mat", "please leave a message after the tone"]


def test_target_counts_one_row_per_predictor_scaled_per_unit() -> None:
    base = collate_target_counts(TEXTS, "phoneme", num_predictors=2)
    assert base is not None and base.shape == (2, 2)
    assert torch.equal(base[0], base[1])
    assert bool((base[:, 1] > base[:, 0]).all())  # the longer transcript has more phonemes
    scaled = collate_target_counts(TEXTS, "phoneme", num_predictors=2, per_unit=1.7)
    assert torch.allclose(scaled, base * 1.7)


def test_no_target_counts_for_fixed_rate_or_no_predictor() -> None:
    assert collate_target_counts(TEXTS, "fixed", num_predictors=1) is None
    assert collate_target_counts(TEXTS, "phoneme", num_predictors=0) is None


def test_non_positive_boundaries_per_unit_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="boundaries_per_unit"):
        collate_target_counts(TEXTS, "syllable", num_predictors=1, per_unit=0.0)


def test_phone_boundaries_on_stem_frames_unknown_without_phone_times() -> None:
    import numpy as np

    from magnet_asr.data.collator import collate_phone_boundaries

    # 0.2 s and 0.13 s at 16 kHz: 20 and 13 mel frames (100/s) -> 10 and 7 stem frames
    long, short_audio = np.zeros(3200, dtype=np.float32), np.zeros(2080, dtype=np.float32)
    items = [
        # phone ends 0.06 s (frame 2) and 0.1 s (frame 4); the file's end is the last frame
        {"audio": long, "phones": ["pau", "h", "ay"], "phone_ends": [0.06, 0.1, 0.2]},
        {"audio": short_audio},  # no phone times: every frame unknown
    ]
    out = collate_phone_boundaries(items)
    assert out.shape == (2, 10)
    assert out[0].tolist() == [0, 0, 1, 0, 1, 0, 0, 0, 0, 1]
    assert (out[1] == -1).all()
    short = collate_phone_boundaries([items[0], {**items[0], "audio": short_audio}])[1]
    assert short[:7].tolist() == [0, 0, 1, 0, 1, 0, 1] and (short[7:] == -1).all()
