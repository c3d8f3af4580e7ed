"""Model families; importing this registers them with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForSpeechSeq2Seq

from magnet_asr.models.magnet_whisper import MagnetWhisper, MagnetWhisperConfig
from magnet_asr.models.processing_speech_llm import ChatPrompt
from magnet_asr.models.projector import AudioProjector
from magnet_asr.models.speech_llm import SpeechLLM, SpeechLLMConfig
from magnet_asr.models.whisper_generation import DecodingOptions

AutoConfig.register(MagnetWhisperConfig.model_type, MagnetWhisperConfig, exist_ok=True)
AutoModelForSpeechSeq2Seq.register(MagnetWhisperConfig, MagnetWhisper, exist_ok=True)

__all__ = [
    "AudioProjector",
    "ChatPrompt",
    "DecodingOptions",
    "MagnetWhisper",
    "MagnetWhisperConfig",
    "SpeechLLM",
    "SpeechLLMConfig",
]
