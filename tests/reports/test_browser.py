"""End to end, as a person sees it: a real run's HTML report in headless Chromium,
with the network blocked. Asserts the page drew data without a script error, that the
vanishing run's heatmap is dark in the early layers, that the NaN run's charts mark
every finding's step, and saves screenshots."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Flags for a clean, offline, headless run as root in a container; the proxy and the
#: resolver rules make any network request fail, so the page must be self-contained.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--proxy-server=127.0.0.1:9",
                  "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0"]
#: Virtual time the page gets to run its scripts before the DOM is dumped.
VIRTUAL_TIME_MS = 5000
#: Vanishing gradients "at a glance": the first layers' heatmap rows must be this much
#: darker (mean luminance, 0-255) than the last layers' rows.
DARK_EARLY_MARGIN = 60


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    reason = ("CHROMIUM NOT FOUND: the end-to-end browser test of the HTML report did NOT run. "
              "Install Debian's `chromium` (`apt-get install -y chromium`; `make test` tries this).")
    warnings.warn(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> str:
    return _chromium()


class _Dom(HTMLParser):
    """Elements (tag, attrs) and the text of SVG <text>/<title> nodes of a dumped DOM."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.svg_text: list[str] = []
        self._in_text = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, {k: v or "" for k, v in attrs}))
        self._in_text = tag in ("text", "title")

    def handle_endtag(self, tag):
        self._in_text = False

    def handle_data(self, data):
        if self._in_text:
            self.svg_text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def _browse(chromium: str, page: Path, tmp: Path, shot: Path) -> tuple[_Dom, str]:
    common = [chromium, *CHROMIUM_FLAGS, "--window-size=1400,2300"]
    url = page.resolve().as_uri()
    dump = subprocess.run([*common, f"--user-data-dir={tmp / 'profile-dom'}",
                           f"--virtual-time-budget={VIRTUAL_TIME_MS}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr[-2000:]
    snap = subprocess.run([*common, f"--user-data-dir={tmp / 'profile-shot'}",
                           f"--virtual-time-budget={VIRTUAL_TIME_MS}", f"--screenshot={shot}", url],
                          capture_output=True, text=True, timeout=120)
    assert snap.returncode == 0, snap.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    keep = os.environ.get("GRADVITALS_SCREENSHOTS")
    if keep:
        shutil.copy(shot, Path(keep) / shot.name)
    return _Dom(dump.stdout), dump.stderr


def _run(script: str, out: Path, *args: str) -> dict:
    html, js = out.with_suffix(".html"), out.with_suffix(".json")
    proc = subprocess.run([sys.executable, "-m", "gradvitals", "run", "-q", "--html", str(html), "--json", str(js),
                           script, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert html.exists() and js.exists(), proc.stderr[-2000:]
    return json.loads(js.read_text())


def _assert_clean(dom: _Dom, stderr: str) -> None:
    body = dom.find("body")[0]
    assert body.get("data-gv-rendered") == "1/1", body
    assert "data-gv-errors" not in body, body  # window.onerror / console.error hook stayed silent
    assert "Uncaught" not in stderr, stderr[-2000:]
    assert not [t for t, a in dom.elements if t == "li" and a.get("class") == "gv-error"]


def test_vanishing_run_heatmap_is_dark_in_early_layers(chromium, tmp_path):
    steps = 30
    report = _run(str(HERE / "scripts" / "vanishing_sigmoid.py"), tmp_path / "vanishing", "--steps", str(steps))
    dom, stderr = _browse(chromium, tmp_path / "vanishing.html", tmp_path, tmp_path / "vanishing.png")
    _assert_clean(dom, stderr)
    (hm,) = dom.find("canvas", **{"class": "gv-heatmap"})
    weight_layers = [l for l in report["layers"] if l["params"]]
    assert int(hm["data-rows"]) == len(weight_layers) == 13
    assert int(hm["data-cols"]) == steps and int(hm["data-cells"]) == 13 * steps
    luma = [int(v) for v in hm["data-row-luma"].split(",")]
    early, late = sum(luma[:3]) / 3, sum(luma[-3:]) / 3
    assert late - early > DARK_EARLY_MARGIN, luma
    for chart in ("loss", "grad_norm"):
        (svg,) = dom.find("svg", **{"data-chart": chart})
        assert int(svg["data-points"]) == steps and svg["data-nonfinite"] == "0"
    # the output logits' log Z (cross_entropy on the model's logits), on the scheduled steps
    (svg,) = dom.find("svg", **{"data-chart": "log_z"})
    assert int(svg["data-points"]) == 2 * len(report["series"]["log_z_mean"]["steps"])  # mean and max
    for quantity in ("update_ratio", "act_sat_frac", "act_std"):
        (svg,) = dom.find("svg", **{"data-quantity": quantity})
        assert int(svg["data-points"]) >= 12, (quantity, svg)


#: Appended to a copy of the page: moves the mouse over the first layer's last cell
#: like a person would, and writes the tooltip it got into the DOM.
HOVER_SCRIPT = """<script>
window.addEventListener("load", function () {
  var c = document.querySelector("canvas.gv-heatmap"), p = c.getAttribute("data-plot").split(",").map(Number);
  var rows = +c.getAttribute("data-rows"), r = c.getBoundingClientRect();
  c.dispatchEvent(new MouseEvent("mousemove", {bubbles: true, clientX: r.left + p[0] + p[2] - 2,
                                               clientY: r.top + p[1] + p[3] / rows / 2}));
  var tip = document.querySelector(".tooltip");
  document.body.setAttribute("data-hover", tip ? tip.textContent : "no tooltip");
});
</script>"""


def test_heatmap_hover_shows_layer_step_and_value(chromium, tmp_path):
    steps = 8
    report = _run(str(HERE / "scripts" / "vanishing_sigmoid.py"), tmp_path / "hover", "--steps", str(steps))
    page = tmp_path / "hover.html"
    page.write_text(page.read_text().replace("</body>", HOVER_SCRIPT + "</body>"))
    dom, stderr = _browse(chromium, page, tmp_path, tmp_path / "hover.png")
    _assert_clean(dom, stderr)
    hover = dom.find("body")[0]["data-hover"]
    first = report["layers"][0]
    norms = [report["series"][f"grad_norm/{p['name']}"] for p in first["params"]]
    expected = math.sqrt(sum(s["values"][-1] ** 2 for s in norms))  # torch measured, the JSON holds it
    name, where, value = hover.split("\n")
    assert name == f"{first['name']} ({first['kind']} → {first['activation_after']})"
    assert where == f"step {steps - 1}"
    assert value.startswith("grad norm ")
    assert math.isclose(float(value.split()[-1]), expected, rel_tol=1e-2), (hover, expected)


def test_exploding_run_marks_where_growth_became_visible_and_the_nan_step(chromium, tmp_path):
    report = _run(str(HERE / "scripts" / "exploding_lr.py"), tmp_path / "exploding", "--steps", "24")
    dom, stderr = _browse(chromium, tmp_path / "exploding.html", tmp_path, tmp_path / "exploding.png")
    _assert_clean(dom, stderr)
    stepped = [f for f in report["findings"] if f.get("step") is not None]
    codes = {f["code"]: f for f in stepped}
    assert "nonfinite" in codes and "exploding_gradients" in codes, report["findings"]
    assert codes["exploding_gradients"]["step"] < codes["nonfinite"]["step"]  # visible before the NaN
    (hm,) = dom.find("canvas", **{"class": "gv-heatmap"})
    assert int(hm["data-nonfinite-cells"]) > 0 and int(hm["data-markers"]) >= len(stepped)
    (gn,) = dom.find("svg", **{"data-chart": "grad_norm"})
    assert int(gn["data-nonfinite"]) > 0 and int(gn["data-points"]) >= 1
    labels = "\n".join(dom.svg_text)  # marker titles list every finding at their step
    for f in stepped:
        assert f"{f['code']} @{f['step']}" in labels, (f["code"], f["step"])
    for f in report["findings"]:  # e.g. exploding_gradients' visible_step: where growth became visible
        for key, value in f["evidence"].items():
            if key.endswith("_step") and isinstance(value, int) and value != f.get("step"):
                label = f"{f['code']}: {key[:-5].replace('_', ' ')} @{value}"
                assert label in labels, label
    nan_step = next(f["step"] for f in stepped if f["code"] == "nonfinite")
    # the NaN step is marked as critical on both the loss and the gradient-norm chart
    assert len(dom.find("g", **{"class": "marker critical", "data-step": str(nan_step)})) == 2
    assert len(dom.find("li", **{"data-code": "nonfinite"})) == 1
