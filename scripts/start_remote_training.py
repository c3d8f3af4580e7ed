#!/usr/bin/env python3
"""Start training in a tmux session on the remote; same as `magnet-asr remote start`.

python scripts/start_remote_training.py HOST PORT [--experiment NAME] [--no-attach] [--force]
"""

import sys
from pathlib import Path

try:
    from magnet_asr.remote.cli import script_main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from magnet_asr.remote.cli import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("start", prog="start_remote_training.py"))
