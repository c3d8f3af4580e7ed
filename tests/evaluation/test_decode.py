"""MagnetWhisper decoding: boundaries carried by ``encode`` through greedy and beam ``generate``, mapped
to encoder-stem frames, and the token-cap test."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from magnet_asr.evaluation import decode
from magnet_asr.evaluation.decode import MagnetWhisperRecognizer, Transcription, stem_segment_ends
from magnet_asr.models import MagnetWhisper, MagnetWhisperConfig
from tiny import TINY_WHISPER

PREDICTOR = {"variant": "mlp", "prior": 0.3, "target": "phoneme", "loss": ["binomial"]}


def tiny(predictor_layers=(1,), **kw) -> MagnetWhisper:
    torch.manual_seed(0)
    config = MagnetWhisperConfig(
        **{**TINY_WHISPER, "predictor_layers": list(predictor_layers), "predictor_settings": PREDICTOR, **kw}
    )
    model = MagnetWhisper(config).eval()
    model.generation_config.decoder_start_token_id = 1
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


def ragged(lengths=(60, 44, 23)) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    feats = torch.zeros(len(lengths), 8, max(lengths))
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        feats[i, :, :n] = torch.randn(8, n)
        mask[i, :n] = 1
    return feats, mask


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_is_unchanged_by_the_boundaries_encode_carries(num_beams):
    model = tiny(predictor_layers=(1, 2))
    feats, mask = ragged()
    encoded = model.encode(feats, mask)
    assert encoded.boundary_outputs is not None and len(encoded.boundary_outputs) == 2
    before = [out.boundaries.clone() for out in encoded.boundary_outputs]
    with_boundaries = model.generate(encoder_outputs=encoded, max_new_tokens=5, num_beams=num_beams)
    plain = model.encode(feats, mask)
    plain.boundary_outputs = None
    without = model.generate(encoder_outputs=plain, max_new_tokens=5, num_beams=num_beams)
    assert with_boundaries.tolist() == without.tolist()
    assert with_boundaries.shape[0] == 3
    # generate leaves the tuple alone (it expands tensors only): still one row per input
    assert [out.boundaries.shape[0] for out in encoded.boundary_outputs] == [3, 3]
    assert all(torch.equal(a, b.boundaries) for a, b in zip(before, encoded.boundary_outputs))


def test_stem_segment_ends_follow_segments_back_to_stem_frames():
    # sample 0: 6 real frames, sample 1: 4 real frames (then padding)
    first = SimpleNamespace(
        boundaries=torch.tensor([[0, 1, 0, 1, 0, 1], [1, 0, 0, 0, 0, 0]]),
        mask=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
    )
    # over the first predictor's segments: 3 for sample 0, 2 for sample 1 (final one added)
    second = SimpleNamespace(
        boundaries=torch.tensor([[1, 0, 1], [0, 1, 0]]), mask=torch.tensor([[1, 1, 1], [1, 1, 0]])
    )
    ends = stem_segment_ends([first, second], stem_frames=[6, 4])
    assert ends[0] == [[1, 3, 5], [1, 5]]
    assert ends[1] == [[0, 3], [3]]  # the last real frame always ends a segment
    # stride 2 (a fixed-stride conv before the predictor): input frame j ends at stem frame 2j+1, clipped
    strided = SimpleNamespace(boundaries=torch.tensor([[1, 0, 1]]), mask=torch.tensor([[1, 1, 1]]))
    assert stem_segment_ends([strided], stem_frames=[5], stride=2) == [[[1, 4]]]


class _Tokenizer:
    def batch_decode(self, tokens, skip_special_tokens=True):
        return [" ".join(str(int(t)) for t in row if int(t) > 2) for row in tokens]


@pytest.mark.parametrize("num_beams", [1, 2])
def test_recognizer_reports_boundaries_per_sample_in_stem_frames(num_beams, monkeypatch):
    monkeypatch.setattr(decode, "max_new_tokens_for", lambda seconds: 4)  # a random model never stops
    model = tiny(predictor_layers=(1, 2))
    model.generation_config.num_beams = num_beams
    recognizer = MagnetWhisperRecognizer(model, _Tokenizer())
    assert recognizer.predictor_layers == [1, 2]
    rng = np.random.default_rng(0)
    waves = [0.1 * rng.normal(size=n).astype(np.float32) for n in (9600, 5600, 3200)]  # 0.6, 0.35, 0.2 s
    outs = recognizer.transcribe(waves)
    assert [o.encoder_frames for o in outs] == [30, 18, 10]
    assert all(o.hit_token_cap for o in outs)
    for out in outs:
        assert out.boundary_frames is not None and len(out.boundary_frames) == 2
        first, second = out.boundary_frames
        assert first[-1] == second[-1] == out.encoder_frames - 1
        assert set(second) <= set(first) and first == sorted(first)
        assert len(second) == out.compressed_frames  # the decoder's segments
    alone = recognizer.transcribe(waves[1:2])[0]
    assert alone.boundary_frames == outs[1].boundary_frames  # batch-invariant


class _WindowEcho:
    """A recognizer with 1 s windows: says each window's length in samples, boundaries at its frames 0 and
    its last one."""

    name = "window-echo"
    max_seconds = 1.0

    def __init__(self) -> None:
        self.batches: list[int] = []

    def transcribe(self, waveforms):
        self.batches.append(len(waveforms))
        out = []
        for w in waveforms:
            frames = decode.num_encoder_frames(len(w))
            out.append(Transcription(str(len(w)), frames, 2, boundary_frames=[[0, frames - 1]]))
        return out


def test_transcribe_long_joins_windows_in_order_on_the_clip_frame_grid():
    rng = np.random.default_rng(0)
    short = (0.1 * rng.normal(size=8000)).astype(np.float32)  # 0.5 s: one window
    long = (0.1 * rng.normal(size=40000)).astype(np.float32)  # 2.5 s: three windows
    recognizer = _WindowEcho()
    got = decode.transcribe_long(recognizer, [short, long])
    windows = decode.long_form_windows(long, 1.0)
    assert len(windows) == 3
    assert got[0].text == "8000" and got[0].boundary_frames == [[0, 24]]
    assert got[1].text == " ".join(str(end - start) for start, end in windows)
    assert got[1].compressed_frames == 6
    assert got[1].encoder_frames == decode.num_encoder_frames(len(long))
    offsets = [start // 320 for start, _ in windows]
    expected = [f + off for (start, end), off in zip(windows, offsets) for f in (0, (end - start) // 320 - 1)]
    assert got[1].boundary_frames == [expected]
    assert recognizer.batches == [2, 2]  # four windows, in batches as large as the caller's
    assert decode.transcribe_long(recognizer, [short])[0].text == "8000"
