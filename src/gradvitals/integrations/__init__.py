"""Thin adapters for the trainers people already use. Each imports its framework
lazily, so ``import gradvitals`` never needs Lightning or transformers:

    from gradvitals.integrations.lightning import GradVitalsCallback  # pip install gradvitals[lightning]
    from gradvitals.integrations.hf import GradVitalsCallback         # pip install gradvitals[hf]

Both only decide *when* the core recorder (the one ``gv.watch`` uses) measures.
"""

from __future__ import annotations
