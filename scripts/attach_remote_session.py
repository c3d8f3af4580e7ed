#!/usr/bin/env python3
"""Attach to a remote tmux session, list them, or print a log; same as `magnet-asr remote attach`.

python scripts/attach_remote_session.py HOST PORT [--session-name NAME] [--list] [--logs [-n LINES]]
"""

import sys
from pathlib import Path

try:
    from magnet_asr.remote.cli import script_main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from magnet_asr.remote.cli import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("attach", prog="attach_remote_session.py"))
