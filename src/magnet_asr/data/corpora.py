"""Corpus registry: build a corpus by name, or resolve what a user typed as ``--data`` to a manifest.

Corpora (each builds ``<out_dir>/manifest.jsonl``, ``out_dir`` defaulting to ``data_dir()/<name>``):

- ``synth``: espeak-ng / flite speech from Debian ``fortunes`` sentences (:mod:`.synth`)
- ``asterisk``: the real Asterisk prompts, fixed 70/10/20 split (:mod:`.asterisk`)
- ``librispeech``: LibriSpeech from the hub, or a local dataset (:mod:`.librispeech`)
- ``manifest``: a user folder / tsv / jsonl (option ``source``), imported as is (:mod:`.folder`)

``librispeech:SPLIT`` / ``librispeech:PATH`` name one LibriSpeech split or a local copy (:mod:`.librispeech`).
``synth:N`` names a synth corpus of ``N`` utterances, built once into ``data_dir()/synth-N``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from magnet_asr.data.common import MANIFEST_NAME, CorpusError, read_build_info
from magnet_asr.paths import data_dir

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("id", "audio", "text", "duration", "split")


# name -> (module, function); imported on use so that naming a corpus never loads another's dependencies.
BUILDERS: dict[str, tuple[str, str]] = {
    "synth": ("magnet_asr.data.synth", "build_synth"),
    "asterisk": ("magnet_asr.data.asterisk", "build_asterisk"),
    "librispeech": ("magnet_asr.data.librispeech", "build_librispeech"),
    "manifest": ("magnet_asr.data.folder", "build_manifest"),
}


def _builder(name: str, options: dict[str, Any]) -> Callable[..., Path]:
    """The build function of corpus ``name``, after checking that it accepts ``options``."""
    if name not in BUILDERS:
        raise CorpusError(f"unknown corpus {name!r}; choose from {', '.join(BUILDERS)}")
    module, function = BUILDERS[name]
    fn = getattr(importlib.import_module(module), function)
    params = inspect.signature(fn).parameters
    unknown = [k for k in options if k not in params or k == "out_dir"]
    if unknown:
        accepted = ", ".join(k for k in params if k != "out_dir")
        raise CorpusError(f"corpus {name}: unknown option(s) {', '.join(unknown)}; accepted: {accepted}")
    return fn


def corpus_names() -> list[str]:
    return list(BUILDERS)


def _manifest_version(builder: Callable[..., Path]) -> int:
    """``MANIFEST_VERSION`` of the builder's module (1 when it declares none)."""
    return int(getattr(sys.modules[builder.__module__], "MANIFEST_VERSION", 1))


def _same_build(out_dir: Path, name: str, options: dict[str, Any]) -> bool:
    """True when ``out_dir`` holds a build of ``name`` with every option given here (others: anything goes)."""
    info = read_build_info(out_dir) or {}
    if info.get("corpus") != name:
        return False
    stored = info.get("options", {})
    given = json.loads(json.dumps(options, default=str))
    return all(stored.get(k, given[k]) == v for k, v in given.items())


def build_corpus(name: str, /, out_dir: Path | None = None, force: bool = False, **options: Any) -> Path:
    """Build corpus ``name`` into ``out_dir`` (default ``data_dir()/name``); return its manifest path.

    Idempotent: a finished build whose recorded options agree with those given is returned as is
    (``force=True`` rebuilds). Options are the builder's keyword arguments, e.g. ``num_utterances`` for synth.
    A builder whose module declares a ``MANIFEST_VERSION`` above the one its ``build.json`` records (a new
    manifest field) runs again with the recorded options, so the existing audio is reused as it is.
    """
    folder_name = options.pop("name", None) or name  # `data manifest SRC --name NAME` -> data_dir()/NAME
    builder = _builder(name, options)
    out_dir = Path(out_dir) if out_dir is not None else data_dir() / folder_name
    manifest = out_dir / MANIFEST_NAME
    if manifest.is_file() and not force and _same_build(out_dir, name, options):
        info = read_build_info(out_dir) or {}
        if int(info.get("manifest_version", 1)) >= _manifest_version(builder):
            return manifest
        # an older manifest of the same build: rerun with the recorded options (builder defaults could
        # differ from them, and other options would make prepare_build delete the audio)
        params = inspect.signature(builder).parameters
        recorded = {k: v for k, v in info.get("options", {}).items() if k in params and k != "out_dir"}
        options = recorded | options
        logger.info("corpus %s in %s: manifest version outdated, adding the new fields", name, out_dir)
    if force:
        manifest.unlink(missing_ok=True)
        if (read_build_info(out_dir) or {}).get("corpus") == name:  # never delete a folder we did not build
            shutil.rmtree(out_dir / "wav", ignore_errors=True)
    logger.info("building corpus %s in %s", name, out_dir)
    return builder(out_dir, **options)


SYNTH_SIZE_PREFIX = "synth:"


def resolve_synth_size(spec: str) -> Path:
    """``synth:N``: the synth corpus of ``N`` utterances in ``data_dir()/synth-N``, built when missing.

    Its sentences and voices are split by hash as in every synth build, so no size shares a test sentence or
    voice with another size's training split."""
    size = spec[len(SYNTH_SIZE_PREFIX) :]
    if not size.isdigit():
        raise CorpusError(f"{spec}: synth:N takes the number of utterances, e.g. synth:12000")
    return build_corpus("synth", out_dir=data_dir() / f"synth-{int(size)}", num_utterances=int(size))


def _complete_manifest(path: Path) -> bool:
    """True when every line of a jsonl file already has all manifest fields (then it is used as is)."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    return False
                if not isinstance(row, dict) or any(k not in row for k in REQUIRED_FIELDS):
                    return False
    return True


def _import_dir(source: Path) -> Path:
    """Where the manifest of an imported folder / list is cached (keyed by its absolute path)."""
    key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:10]
    return data_dir() / "imports" / f"{source.stem or 'data'}-{key}"


def resolve_librispeech(spec: str, librispeech_root: str | Path | None = None) -> Path:
    """The manifest of a ``librispeech:SPLIT`` or ``librispeech:PATH`` spec (:mod:`.librispeech`): a folder in
    the LibriSpeech layout is listed where it is, a ``datasets`` source (local or hub) is copied to wav once."""
    from magnet_asr.data.librispeech import import_folders, librispeech_source

    source = librispeech_source(spec, librispeech_root)
    if source.kind == "folders":
        key = hashlib.sha1("\n".join(str(f.resolve()) for f in source.folders).encode()).hexdigest()[:10]
        return import_folders(source, data_dir() / "imports" / f"librispeech-{key}" / MANIFEST_NAME)
    options: dict[str, Any] = {"source": source.location, "splits": source.splits}
    if source.kind == "hub":
        options["config"] = source.config
        folder = f"librispeech-{'-'.join(source.splits or {})}-{source.config}"
    else:
        folder = _import_dir(Path(source.location)).name + "-" + "-".join(source.splits or {"all": ""})
    return build_corpus("librispeech", out_dir=data_dir() / folder, **options)


def resolve_data(spec: str | Path, librispeech_root: str | Path | None = None) -> Path:
    """The manifest ``spec`` stands for.

    - a corpus name (``synth``, ``asterisk``, ``librispeech``): its manifest in ``data_dir()``, built with
      default options when missing (only LibriSpeech needs the network);
    - ``librispeech:SPLIT`` or ``librispeech:PATH`` (:mod:`.librispeech`): one LibriSpeech split, from
      ``librispeech_root`` (``data.librispeech_root``) or the hub, or a local LibriSpeech folder or dataset;
    - ``synth:N``: a synth corpus of ``N`` utterances (:func:`resolve_synth_size`);
    - a folder holding ``manifest.jsonl`` (a built corpus), or a complete jsonl manifest: that manifest;
    - any other folder, ``.tsv`` or ``.jsonl`` list: imported (durations, splits) into
      ``data_dir()/imports/`` every time, so edits to the source are picked up.
    """
    text = str(spec)
    if text in BUILDERS and text != "manifest" and not Path(text).exists():
        return build_corpus(text)
    from magnet_asr.data.librispeech import SPEC_PREFIX

    if text.startswith(SPEC_PREFIX):
        return resolve_librispeech(text, librispeech_root)
    if text.startswith(SYNTH_SIZE_PREFIX):
        return resolve_synth_size(text)
    path = Path(text).expanduser()
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return path / MANIFEST_NAME
    if path.is_file() and path.suffix == ".jsonl" and _complete_manifest(path):
        return path
    if path.exists():
        from magnet_asr.data.folder import import_source

        return import_source(path, _import_dir(path) / MANIFEST_NAME)
    names = ", ".join(n for n in BUILDERS if n != "manifest")
    raise CorpusError(
        f"{spec}: neither a corpus ({names}), a librispeech:SPLIT or librispeech:PATH, a synth:N, nor an "
        "existing folder, .tsv or .jsonl"
    )
