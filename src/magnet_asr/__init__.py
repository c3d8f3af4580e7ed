"""magnet-asr: speech recognition on a Whisper encoder with learned boundary compression."""

__version__ = "0.1.0"
