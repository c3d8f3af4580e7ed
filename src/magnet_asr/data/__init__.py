"""Corpora and manifests: every corpus becomes a jsonl manifest that training and evaluation read."""

from magnet_asr.data.common import CorpusError
from magnet_asr.data.corpora import build_corpus, corpus_names, resolve_data
from magnet_asr.data.manifest import Utterance, read_manifest, write_manifest

__all__ = [
    "CorpusError",
    "Utterance",
    "build_corpus",
    "corpus_names",
    "read_manifest",
    "resolve_data",
    "write_manifest",
]
