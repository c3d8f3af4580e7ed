#!/usr/bin/env python3
"""Deploy magnet-asr to a RunPod (or any ssh) GPU box; same as `magnet-asr remote deploy`.

python scripts/deploy_runpod.py HOST PORT [--skip-setup] [--skip-sync] [--skip-deps] [-i KEY]
"""

import sys
from pathlib import Path

try:
    from magnet_asr.remote.cli import script_main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from magnet_asr.remote.cli import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("deploy", prog="deploy_runpod.py"))
