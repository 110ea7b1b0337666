"""Rule tests run on hand-built records (see ``rulebuild.py``); no torch."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
