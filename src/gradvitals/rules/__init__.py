"""Rules: pure functions ``Record -> list[Finding]``, one module per family. No torch.

Every rule is listed in :data:`RULES`; :func:`gradvitals.diagnose.diagnose` runs them all.
"""

from __future__ import annotations

from typing import Callable

from ..findings import Finding
from ..record import Record
from . import nonfinite

Rule = Callable[[Record], "list[Finding]"]

RULES: list[Rule] = [
    nonfinite.nonfinite,
]

__all__ = ["RULES", "Rule"]
