"""gradvitals: the vital signs of a PyTorch training run, and why it is failing.

    import gradvitals as gv
    with gv.watch(model, optimizer) as watch:
        ...train...
    watch.save("run.json")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .findings import CODES, Finding  # noqa: E402
from .record import SCHEMA, Record, Series  # noqa: E402
from .report import Report  # noqa: E402
from . import report as _report  # noqa: E402


def _render_terminal(report: Report):  # the facade may reach up the layers; report.py does not
    from .reports.terminal import render  # rich loads when a Report is first printed

    return render(report)


def _render_html(report: dict):
    from .reports.html import render_html

    return render_html(report)


_report.rich_renderer = _render_terminal
_report.html_renderer = _render_html


def __getattr__(name: str):  # torch-dependent parts load lazily: rules/reports stay torch-free
    if name in ("watch", "Watch"):
        from . import watcher as _w

        return getattr(_w, name)
    if name == "checkup":
        from .preflight import checkup  # not checkup.py: importing it would shadow this function

        return checkup
    if name == "init_":
        from .fixes.init import init_

        return init_
    if name == "clip_grad_agc_":
        from .fixes.agc import clip_grad_agc_

        return clip_grad_agc_
    raise AttributeError(f"module 'gradvitals' has no attribute {name!r}")


__all__ = ["watch", "Watch", "checkup", "init_", "clip_grad_agc_", "Report", "Record", "Series",
           "Finding", "CODES", "SCHEMA", "__version__"]
