import numpy as np
import pytest
import soundfile as sf
import torch

from magnet_asr import audio as A


def tone(seconds: float, sr: int = A.SAMPLE_RATE, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_constants_are_consistent():
    assert A.N_FRAMES == 3000
    assert A.FRAMES_PER_SECOND == 100 and A.ENCODER_FRAMES_PER_SECOND == 50
    assert A.num_encoder_frames(A.N_SAMPLES) == 1500
    assert A.num_encoder_frames(5 * A.SAMPLE_RATE) == 250


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(0)
    wav = (tone(3.3) + 0.05 * rng.standard_normal(int(3.3 * A.SAMPLE_RATE))).astype(np.float32)
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    ref = fe(wav, sampling_rate=A.SAMPLE_RATE, return_tensors="np").input_features[0]
    ours = A.log_mel_spectrogram(wav, n_mels=n_mels, pad_to=A.N_SAMPLES).numpy()
    assert ours.shape == ref.shape == (n_mels, A.N_FRAMES)
    np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_log_mel_true_length_has_length_frames():
    feats = A.log_mel_spectrogram(tone(2.0))
    assert feats.shape == (80, 200)
    assert feats.dtype == torch.float32


@pytest.mark.parametrize("fmt,ext", [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg")])
def test_load_formats_resample_and_mixdown(tmp_path, fmt, ext):
    stereo = np.stack([tone(1.0, 8000), tone(1.0, 8000)], axis=1)
    path = tmp_path / f"x.{ext}"
    sf.write(path, stereo, 8000, format=fmt)
    out = A.load_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - A.SAMPLE_RATE) <= 2
    # the 440 Hz tone survives resampling: the spectrum peaks there
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * A.SAMPLE_RATE / len(out) - 440) < 5


def write(tmp_path, name, data, sr=A.SAMPLE_RATE):
    path = tmp_path / name
    sf.write(path, data, sr, subtype="FLOAT")
    return path


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda p: p / "missing.wav", "file not found"),
        (
            lambda p: (p / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10) and p / "corrupt.wav",
            "cannot decode",
        ),
        (lambda p: write(p, "empty.wav", np.zeros(0, np.float32)), "empty audio"),
        (lambda p: write(p, "silent.wav", np.zeros(16000, np.float32)), "silent"),
        (lambda p: write(p, "nan.wav", np.full(16000, np.nan, np.float32)), "NaN"),
        (lambda p: write(p, "long.wav", tone(3.0)), "longer than the maximum"),
    ],
)
def test_load_errors_are_one_line_and_name_the_file(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(A.AudioError) as info:
        A.load_audio(path, max_seconds=2.0)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_validate_allows_silence_when_asked():
    assert A.validate(np.zeros(100, np.float32), allow_silent=True).shape == (100,)


def _speech_with_pauses(seconds: float, pauses: list[float]) -> np.ndarray:
    """Noise ``seconds`` long with 0.3 s of digital silence starting at each of ``pauses`` (s)."""
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.normal(size=int(seconds * A.SAMPLE_RATE))).astype(np.float32)
    for start in pauses:
        audio[int(start * A.SAMPLE_RATE) : int((start + 0.3) * A.SAMPLE_RATE)] = 0.0
    return audio


def test_long_form_windows_cut_in_the_pauses():
    audio = _speech_with_pauses(70.0, pauses=[27.0, 40.0, 52.5])
    windows = A.long_form_windows(audio)
    assert windows[0][0] == 0 and windows[-1][1] == len(audio)
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))  # contiguous, no overlap
    assert all(end - start <= A.N_SAMPLES for start, end in windows)
    cuts = [end for _, end in windows[:-1]]
    assert all(c % A.SAMPLES_PER_ENCODER_FRAME == 0 for c in cuts)  # on the encoder-frame grid
    # the first window ends in the pause at 27 s; the second may reach 57 s and ends in the one at 52.5 s
    assert 27.0 <= cuts[0] / A.SAMPLE_RATE <= 27.3
    assert 52.5 <= cuts[1] / A.SAMPLE_RATE <= 52.8
    assert len(windows) == 3


def test_pause_windows_cut_every_pause_and_join_short_pieces():
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.normal(size=int(10.4 * A.SAMPLE_RATE))).astype(np.float32)
    # leading silence (never a cut), a 0.5 s pause, one too short (0.2 s), 0.4 s, and 0.3 s before a
    # 0.5 s piece, which joins the one before it
    for start, length in [(0.0, 0.5), (2.0, 0.5), (5.0, 0.2), (7.0, 0.4), (9.6, 0.3)]:
        audio[int(start * A.SAMPLE_RATE) : int((start + length) * A.SAMPLE_RATE)] = 0.0
    frame = A.SAMPLES_PER_ENCODER_FRAME
    # cuts in the middle of the pauses: frames 100-124 -> 112, frames 350-369 -> 360
    assert A.pause_windows(audio, 6.0) == [
        (0, 112 * frame),
        (112 * frame, 360 * frame),
        (360 * frame, len(audio)),
    ]
    shorter = A.pause_windows(audio, 4.0)  # the 4.96 s piece is cut once more, where long_form_windows cuts
    assert shorter[0] == (0, 112 * frame) and shorter[-1] == (360 * frame, len(audio)) and len(shorter) == 4
    assert all(a[1] == b[0] for a, b in zip(shorter, shorter[1:]))
    assert all(end - start <= 4.0 * A.SAMPLE_RATE for start, end in shorter)
    assert A.pause_windows(audio, 10.4) == [(0, len(audio))]  # a clip that fits is read whole


def test_long_form_windows_of_short_and_pauseless_clips():
    assert A.long_form_windows(np.ones(A.N_SAMPLES, np.float32)) == [(0, A.N_SAMPLES)]
    no_pause = _speech_with_pauses(61.0, pauses=[])
    windows = A.long_form_windows(no_pause)
    assert all(end - start <= A.N_SAMPLES for start, end in windows) and windows[-1][1] == len(no_pause)
    # a remainder that would be shorter than one analysis window is not left over
    just_over = _speech_with_pauses(30.0 + 0.01, pauses=[])
    assert all(end - start >= A.N_FFT for start, end in A.long_form_windows(just_over))
