# README's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# The dev install is the lock, build tools included (pip's isolated build reads the
# constraint from the environment).
LOCK := $(CURDIR)/constraints-dev.txt

.PHONY: demo test install clean chromium compat wheel-check lock

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	PIP_CONSTRAINT=$(LOCK) $(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradvitals demo

# The HTML report's browser test needs headless Chromium: install it when missing.
# Tolerates failure (no root, no apt): the test then skips and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "warning: could not install chromium; the HTML report's browser test will be skipped"

# worksteal: a worker that runs out of tests takes some of the other's (the suite's long
# real-program tests otherwise leave one core idle at the end). The wheel check runs beside
# the suite at the lowest priority (mostly unpacking an install: it takes the cores' idle
# moments, not the tests' time); its log is printed after the tests, and either failing
# fails the target.
test: $(STAMP) chromium
	@log=$$(mktemp); nice -n 19 tools/wheel_check.sh $(PY) > "$$log" 2>&1 & wheel=$$!; \
	$(PY) -m pytest -q -n 2 --dist worksteal $(PYTEST_ARGS); tests=$$?; \
	wait $$wheel; checked=$$?; cat "$$log"; rm -f "$$log"; \
	test $$tests -eq 0 && test $$checked -eq 0

# The wheel in a clean venv with runtime dependencies only: demo --quick, run, report.
wheel-check: $(STAMP)
	tools/wheel_check.sh $(PY)

# tests/integrations on the oldest supported and newest available transformers/accelerate
# and lightning (throw-away venvs in .compat/; not part of `make test`: several minutes).
compat:
	tools/compat.sh

# Rewrite the lock from .venv (run `make test` there first: the lock is what passed).
lock: $(STAMP)
	{ sed -n '/^# Runtime and dev dependencies:/q;p' constraints-dev.txt; \
	  echo '# Runtime and dev dependencies:'; \
	  $(PY) -m pip freeze --exclude-editable --disable-pip-version-check | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; \
	} > constraints-dev.txt.new && mv constraints-dev.txt.new constraints-dev.txt

clean:
	rm -rf $(VENV) .pytest_cache gradvitals-demo .compat
