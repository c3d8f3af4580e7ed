import pytest
import torch

from magnet_asr.models import MagnetWhisper, MagnetWhisperConfig
from tiny import TINY_WHISPER

TINY = TINY_WHISPER


def tiny_config(**kw) -> MagnetWhisperConfig:
    return MagnetWhisperConfig(**{**TINY, **kw})


def tiny_model(seed: int = 0, **kw) -> MagnetWhisper:
    torch.manual_seed(seed)
    return MagnetWhisper(tiny_config(**kw)).eval()


@pytest.fixture(name="tiny_model")
def tiny_model_fixture():
    return tiny_model


@pytest.fixture(name="tiny_config")
def tiny_config_fixture():
    return tiny_config


@pytest.fixture
def ragged_batch():
    """Three samples of different lengths, zero-padded, with their mel masks and decoder prompts."""
    torch.manual_seed(1)
    lengths = [60, 44, 23]
    feats = torch.zeros(3, 8, 60)
    mask = torch.zeros(3, 60, dtype=torch.long)
    singles = []
    for i, n in enumerate(lengths):
        f = torch.randn(8, n)
        feats[i, :, :n] = f
        mask[i, :n] = 1
        singles.append(f[None])
    tokens = torch.randint(3, 64, (3, 6))
    return feats, mask, singles, tokens
