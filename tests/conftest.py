from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"

# Two cores, shared: keep torch from oversubscribing them in each xdist worker.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # torch-free test modules
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits():
    import torch
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)


def gradvitals_cmd() -> list[str]:
    return [sys.executable, "-m", "gradvitals"]


def cli(args: list, cwd: Path | None = None):
    """``gradvitals ARGS`` in this process (click's CliRunner, run from ``cwd``): the CLI's
    code path without a fresh interpreter's torch import. tests/test_runner.py and
    tests/realworld run the CLI as a subprocess."""
    from click.testing import CliRunner

    from gradvitals.cli import main

    here = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(here)
