# README's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test install clean chromium

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints-dev.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradvitals demo

# The HTML report's browser test needs headless Chromium: install it when missing.
# Tolerates failure (no root, no apt): the test then skips and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "warning: could not install chromium; the HTML report's browser test will be skipped"

test: $(STAMP) chromium
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache gradvitals-demo
