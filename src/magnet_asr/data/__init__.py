"""Corpora and manifests: every corpus becomes a jsonl manifest that training and evaluation read."""

from magnet_asr.data.manifest import Utterance, read_manifest, write_manifest

__all__ = ["Utterance", "read_manifest", "write_manifest"]
