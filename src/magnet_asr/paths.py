"""Where magnet-asr keeps converted weights and built corpora.

Everything lives under ``$MAGNET_ASR_HOME`` (default ``~/.cache/magnet_asr``):
``models/<name>/`` for converted pretrained weights, ``data/<corpus>/`` for corpora.
"""

from __future__ import annotations

import os
from pathlib import Path


def home_dir() -> Path:
    """Root cache directory (``$MAGNET_ASR_HOME`` or ``~/.cache/magnet_asr``)."""
    env = os.environ.get("MAGNET_ASR_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "magnet_asr"


def models_dir() -> Path:
    return home_dir() / "models"


def data_dir() -> Path:
    return home_dir() / "data"
