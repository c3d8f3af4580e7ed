"""Model families; importing this registers them with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForSpeechSeq2Seq
from transformers.models.auto.modeling_auto import MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES

from magnet_asr.models.magnet_whisper import MagnetWhisper, MagnetWhisperConfig
from magnet_asr.models.processing_speech_llm import ChatPrompt
from magnet_asr.models.projector import AudioProjector
from magnet_asr.models.speech_llm import SpeechLLM, SpeechLLMConfig
from magnet_asr.models.whisper_generation import DecodingOptions

AutoConfig.register(MagnetWhisperConfig.model_type, MagnetWhisperConfig, exist_ok=True)
AutoModelForSpeechSeq2Seq.register(MagnetWhisperConfig, MagnetWhisper, exist_ok=True)
# transformers' ASR pipeline tells a seq2seq model from a CTC one by its class name in this table, not by
# the Auto registration above; without the entry it would decode a MagnetWhisper as CTC logits.
# Pinned by tests/training/test_recipe.py and tests/training/test_speech_llm_setup.py (a trained final/
# read by the pipeline as type "seq2seq").
MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.setdefault(MagnetWhisperConfig.model_type, MagnetWhisper.__name__)
# SpeechLLM's config registers itself (models/speech_llm.py); the model, so AutoModel and the pipeline load it
AutoModelForSpeechSeq2Seq.register(SpeechLLMConfig, SpeechLLM, exist_ok=True)
MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.setdefault(SpeechLLMConfig.model_type, SpeechLLM.__name__)

__all__ = [
    "AudioProjector",
    "ChatPrompt",
    "DecodingOptions",
    "MagnetWhisper",
    "MagnetWhisperConfig",
    "SpeechLLM",
    "SpeechLLMConfig",
]
