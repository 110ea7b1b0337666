"""Probes: torch code that observes a run and never changes it.

Each probe owns its hook handles and buffers. Nothing here syncs with the host:
probes leave device tensors for the recorder, which fetches them once per step.
"""
