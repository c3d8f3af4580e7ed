"""Model families; importing this registers them with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForSpeechSeq2Seq

from magnet_asr.models.magnet_whisper import MagnetWhisper, MagnetWhisperConfig
from magnet_asr.models.speech_llm import SpeechLLM, SpeechLLMConfig

AutoConfig.register(MagnetWhisperConfig.model_type, MagnetWhisperConfig, exist_ok=True)
AutoModelForSpeechSeq2Seq.register(MagnetWhisperConfig, MagnetWhisper, exist_ok=True)

__all__ = ["MagnetWhisper", "MagnetWhisperConfig", "SpeechLLM", "SpeechLLMConfig"]
