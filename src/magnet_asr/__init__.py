"""magnet-asr: speech recognition on a Whisper encoder with learned boundary compression.

Importing the package registers its model types with transformers' Auto classes and ASR pipeline, so a
saved ``final/`` directory loads with ``AutoModelForSpeechSeq2Seq`` or ``pipeline(...)`` after
``import magnet_asr``.
"""

__version__ = "0.1.0"

import magnet_asr.models  # noqa: E402, F401  (registration; see magnet_asr/models/__init__.py)
