"""Report files get the permissions any file the user creates gets."""

from __future__ import annotations

import os
import stat

import pytest

from gradvitals.report import write_atomic


@pytest.fixture
def umask():
    def set_(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    os.umask(old)
    yield set_
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_new_report_follows_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    path = write_atomic(tmp_path / "r.json", "{}")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_rewritten_report_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "r.html"
    path.write_text("old")
    path.chmod(0o604)
    write_atomic(path, "new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o604 and path.read_text() == "new"


def test_run_writes_shareable_reports(tmp_path, umask):
    import subprocess
    import sys

    umask(0o022)  # inherited by the child
    script = tmp_path / "train.py"
    script.write_text("import torch\nm = torch.nn.Linear(4, 2)\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
                      "for _ in range(3):\n    opt.zero_grad(); m(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()\n")
    out = subprocess.run([sys.executable, "-m", "gradvitals", "run", "--json", "r.json", "--html", "r.html",
                          str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for name in ("r.json", "r.html"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
