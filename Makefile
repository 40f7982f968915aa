# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA ?= data/elpv
DEMO_RUN ?= runs/demo-elpv

.PHONY: install demo test test-fast browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium renders report.html in a test, and chromium-driver lets selenium drive the serve page;
# install them where apt is available (CI, fresh boxes).
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
		echo "chromium/chromium-driver not installed: the browser tests will be skipped"; }

demo: install
	$(PY) -m transferkit data elpv $(DEMO_DATA) --classes 2
	$(PY) -m transferkit train $(DEMO_DATA) --out $(DEMO_RUN) --overwrite

test: install browser
	$(PY) -m pytest -q

# The quick check while coding: every module exercised in about a minute and a half on 2 cores. Tests marked
# `slow` (long end-to-end runs, subprocesses, browsers, fresh venvs) are left out; `make test` runs them all.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
