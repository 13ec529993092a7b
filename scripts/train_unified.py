"""Train the unified text+image transformer with DeepSpeed: `deepspeed scripts/train_unified.py --help`.

A thin launcher for the DeepSpeed launcher (which starts a script per process): the command line, its messages
and exit statuses are unified_lm.train.launch's (`main`), where the training logic lives.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from unified_lm.train.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
