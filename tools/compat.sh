#!/usr/bin/env bash
# The supported range, tested: throw-away venvs with the OLDEST supported and the NEWEST
# available releases of the integrations (transformers + accelerate, lightning), each running
# tests/integrations against this tree installed as a user installs it (not editable).
# Everything else (torch, the test tools) comes pinned from the dev lock, so the only thing
# that differs between the two venvs is the integrations' versions.
# Usage: tools/compat.sh [oldest|newest]...   (default: both)   Venvs: .compat/<name>/
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# The oldest releases pyproject.toml's extras allow (keep the two in step). numpy < 2 and
# setuptools < 81 (lightning 2.1 imports pkg_resources): these releases predate both.
OLDEST="transformers==4.36.0 accelerate==0.26.0 lightning==2.1.0 numpy<2 setuptools<81"
NEWEST="transformers accelerate lightning"

# The lock's pins for everything but the integrations and what they bring along.
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
grep -vE '^(transformers|accelerate|lightning|pytorch-lightning|lightning-utilities|torchmetrics|huggingface_hub|hf-xet|tokenizers|safetensors|numpy|packaging|PyYAML|fsspec|regex|tqdm|typer|httpx2|httpcore2|h11|anyio|idna|shellingham|annotated-doc|filelock|aiohttp|aiosignal|aiohappyeyeballs|attrs|frozenlist|multidict|propcache|yarl|typing_extensions|psutil|setuptools|wheel)==' \
    constraints-dev.txt | grep '==' > "$pins"
echo "torch==$(grep '^torch==' constraints-dev.txt | cut -d= -f3)" >> "$pins"

status=0
for name in "${@:-oldest newest}"; do
  for which in $name; do
    case $which in
      oldest) spec=$OLDEST ;;
      newest) spec=$NEWEST ;;
      *) echo "compat: unknown set '$which' (expected oldest or newest)" >&2; exit 2 ;;
    esac
    venv=".compat/$which"
    echo "== compat $which: $spec"
    rm -rf "$venv"
    python3 -m venv "$venv"
    # shellcheck disable=SC2086
    PIP_CONSTRAINT="$pins" "$venv/bin/pip" install -q --disable-pip-version-check --upgrade \
        $spec pytest pytest-xdist hypothesis jsonschema scikit-learn psutil tensorboard "$root"
    # The integrations must import: a test module that skips on a failed import would
    # otherwise pass the check without testing anything.
    "$venv/bin/python" - <<'PY'
import importlib.metadata as md
import accelerate, gradvitals.integrations.hf, gradvitals.integrations.lightning, lightning, transformers  # noqa: F401
print("   ", ", ".join(f"{p} {md.version(p)}" for p in ("torch", "numpy", "transformers", "accelerate", "lightning")))
PY
    # From a folder outside the tree: the installed package is tested, not ./src.
    if (cd "$root/tests" && "$root/$venv/bin/python" -m pytest -q -p no:cacheprovider -n 2 \
          --rootdir "$root" -c "$root/pyproject.toml" integrations); then
      echo "== compat $which: passed"
    else
      echo "== compat $which: FAILED"; status=1
    fi
  done
done
exit $status
