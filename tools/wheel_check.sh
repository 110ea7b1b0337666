#!/usr/bin/env bash
# A user's install, not the dev venv: build the wheel, install it into a throw-away venv with
# its runtime dependencies only (torch pinned by the dev lock: an unpinned torch pulls a
# multi-GB CUDA build), and run the main job and the report commands there.
# Usage: tools/wheel_check.sh [DEV_PYTHON]   (DEV_PYTHON builds the wheel; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dev_python=${1:-.venv/bin/python}
work=$(mktemp -d "${TMPDIR:-/tmp}/gradvitals-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "wheel-check: building the wheel"
PIP_CONSTRAINT="$root/constraints-dev.txt" "$dev_python" -m pip wheel -q --no-deps --disable-pip-version-check \
    -w "$work/dist" "$root"
wheel=$(ls "$work"/dist/gradvitals-*.whl)

echo "wheel-check: installing $(basename "$wheel") with its runtime dependencies only"
python3 -m venv "$work/venv"
# Only the runtime requirements' pins from the lock: nothing of the dev extra may leak in.
grep -E '^(torch|numpy|rich|click|markdown-it-py|mdurl|Pygments|filelock|fsspec|Jinja2|MarkupSafe|networkx|sympy|mpmath|typing_extensions|setuptools)==' \
    constraints-dev.txt > "$work/runtime-pins.txt"
PIP_CONSTRAINT="$work/runtime-pins.txt" "$work/venv/bin/pip" install -q --disable-pip-version-check "$wheel"
if "$work/venv/bin/python" -c "import sklearn" 2>/dev/null; then
    echo "wheel-check: FAIL: scikit-learn is installed in the runtime-only venv" >&2; exit 1
fi

cd "$work"
gv="$work/venv/bin/gradvitals"
echo "wheel-check: gradvitals demo --quick"
"$gv" demo --quick --out "$work/demo" > "$work/demo.log" 2>&1 || { cat "$work/demo.log"; exit 1; }
ls "$work"/demo/*.json > /dev/null

cat > "$work/train.py" <<'PY'
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
for step in range(40):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
PY
echo "wheel-check: gradvitals run --json --html train.py"
"$gv" run --json run.json --html run.html train.py > run.log 2>&1 || { cat run.log; exit 1; }
echo "wheel-check: gradvitals report run.json --html again.html"
"$gv" report run.json --html again.html > report.log 2>&1 || { cat report.log; exit 1; }
"$work/venv/bin/python" - <<'PY'
import json, pathlib
r = json.loads(pathlib.Path("run.json").read_text())
assert r["schema"] == "gradvitals.report/1" and r["run"]["steps"] == 40, r["run"]
for f in ("run.html", "again.html"):
    assert pathlib.Path(f).stat().st_size > 10_000, f
PY
echo "wheel-check: passed (demo --quick, run --json --html, report on a runtime-only install)"
