"""Renderers: terminal, JSON, HTML. They only render a Report; no torch."""
