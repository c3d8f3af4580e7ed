"""Shared fixtures for the corpus tests: a private MAGNET_ASR_HOME and small audio files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def magnet_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache root, so nothing is read from or written to the user's."""
    home = tmp_path / "magnet_home"
    monkeypatch.setenv("MAGNET_ASR_HOME", str(home))
    return home


def write_tone(path: Path, seconds: float, sample_rate: int = 16_000, fmt: str | None = None) -> Path:
    """A 220 Hz tone of ``seconds`` at ``sample_rate`` (format from the suffix unless ``fmt``)."""
    import soundfile as sf

    t = np.arange(round(seconds * sample_rate)) / sample_rate
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sample_rate, format=fmt)
    return path


@pytest.fixture
def tone():
    """The :func:`write_tone` helper, as a fixture (test modules do not import conftest)."""
    return write_tone
