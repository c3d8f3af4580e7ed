"""The oldest-transformers check (`make test-oldest`): run in the venv that holds the declared lower bound.

Usage: ``python scripts/test_oldest.py VERSION``. Fails unless the running interpreter imports
transformers VERSION (the lower bound of pyproject.toml, which the Makefile reads and installs), then
runs the tests that hold MagnetWhisper to transformers' own Whisper: same logits and same greedy
transcripts on the bundled real weights, and the pins on transformers' key/value cache. A skipped test
counts as a failure here: a check that skipped its real-weight tests (no flite, no weights) would pass
without having compared anything.
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/models/test_magnet_whisper_real.py",  # real weights: logits and transcripts vs transformers
    "tests/models/test_transformers_cache.py",  # the cache API our decoder and RoPE attention use
    "tests/models/test_magnet_whisper.py",  # tiny models: equality with Whisper, padding invariance
]


class _SkipCounter:
    """pytest plugin that records every skipped test."""

    def __init__(self) -> None:
        self.skipped: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped:
            self.skipped.append(report.nodeid)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/test_oldest.py TRANSFORMERS_VERSION", file=sys.stderr)
        return 2
    # read from the installed metadata: importing transformers before pytest starts would import
    # plugins' modules (anyio) before pytest can rewrite their asserts
    installed = version("transformers")
    if Version(installed) != Version(argv[0]):
        print(
            f"test-oldest: this venv has transformers {installed}, not the declared lower bound {argv[0]}",
            file=sys.stderr,
        )
        return 1
    print(f"test-oldest: transformers {installed}", flush=True)
    counter = _SkipCounter()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *(str(ROOT / t) for t in TESTS)], plugins=[counter])
    if code == 0 and counter.skipped:
        print(
            f"test-oldest: {len(counter.skipped)} test(s) skipped: {', '.join(counter.skipped)}",
            file=sys.stderr,
        )
        return 1
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
