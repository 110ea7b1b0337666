"""gradvitals in Jupyter: a real notebook executed headlessly (nbclient + an ipykernel)
trains under ``gv.watch`` and shows ``watch.report()``, a Report and ``gv.checkup``'s
result as cell values. Checks the cells' outputs as a notebook saves them: the status
line is ONE output updated in place (not a line per redraw) that ends at the last
step, and each report is the HTML report inline (self-contained, in a sandboxed
iframe) with a one-line text/plain."""

from __future__ import annotations

import html
import os
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = 40

CELLS = [
    """import torch, torch.nn as nn
import gradvitals as gv
torch.manual_seed(0)
x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
print(gv.__file__)""",
    f"""with gv.watch(model, opt) as watch:
    for step in range({STEPS}):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()""",
    "watch.report()",
    "watch.diagnosis()",
    "gv.checkup(model, (x, y))",
]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    tmp = tmp_path_factory.mktemp("nb")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), *([old] if old else [])])  # the kernel imports this src
    try:
        nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                resources={"metadata": {"path": str(tmp)}}).execute()
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    return nb


def test_the_kernel_ran_this_checkout_without_errors(executed):
    for cell in executed.cells:
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.outputs
    assert executed.cells[0].outputs[0].text.strip() == str(SRC / "gradvitals" / "__init__.py")


def test_the_status_line_is_one_output_updated_in_place_to_the_last_step(executed):
    outputs = executed.cells[1].outputs
    assert [o.output_type for o in outputs] == ["display_data"], outputs  # no flood of lines, no stream
    line = outputs[0].data["text/plain"]
    # the first draw was at the first step: the text is the last update's
    assert line.startswith(f"gradvitals  step {STEPS}  loss "), line
    assert "findings: " in line and "architecture_risk" in line, line  # the final diagnosis


@pytest.mark.parametrize("cell", [2, 3, 4])
def test_a_report_as_a_cells_value_renders_the_html_report_inline(executed, cell):
    (out,) = executed.cells[cell].outputs
    assert out.output_type == "execute_result"
    frame = out.data["text/html"]
    assert frame.startswith('<iframe class="gradvitals-report" sandbox="allow-scripts" srcdoc="')
    page = html.unescape(frame.split('srcdoc="', 1)[1].split('"', 1)[0])
    assert page.startswith("<!DOCTYPE html>") and 'id="verdict"' in page and "</html>" in page
    assert "<script src" not in page and "<link" not in page  # self-contained: nothing to fetch
    text = out.data["text/plain"]
    assert text.startswith("<gradvitals ") and len(text.splitlines()) == 1, text
    if cell in (2, 3):  # the watched run: the deep sigmoid stack, diagnosed
        assert "architecture_risk" in text and 'data-code="architecture_risk"' in page, text


@pytest.mark.parametrize("status", [None, True, False])
def test_outside_a_notebook_the_status_line_is_off_unless_asked_for(status, capsys):
    import torch

    import gradvitals as gv

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gv.watch(model, opt, status=status):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    err = capsys.readouterr().err
    assert ("gradvitals  step " in err) == (status is True), err
