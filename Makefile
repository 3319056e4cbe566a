# Two commands on a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo ui test test-fast test-ui demo-stop clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(INSTALLED)

# Embedded PostgreSQL + moto's S3 server, seeded, the whole backfill through Dagster, then the stats.
demo: $(INSTALLED)
	$(BIN)/s3-attrs demo

# The Dagster UI (webserver and daemon) on the demo's data, through the `dg` project.
ui: $(INSTALLED)
	$(BIN)/s3-attrs demo --services-only
	@echo "Dagster UI: http://127.0.0.1:3000"
	. .demo/env && VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/dg dev -h 127.0.0.1 -p 3000

test: $(INSTALLED)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/pytest

# The tests that need no database, S3 server, daemon or browser: seconds, for between edits.
test-fast: $(INSTALLED)
	$(BIN)/pytest -m "not db and not daemon and not ui" -q

# The browser test: the real Dagster UI in headless Chromium, driven by Playwright. Installs Debian's
# chromium (as root, with apt-get) and Playwright into the venv when missing; never `playwright install`.
CHROMIUM ?= /usr/bin/chromium
test-ui: $(INSTALLED)
	@if [ ! -x $(CHROMIUM) ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi
	@$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/python -m pip install --quiet playwright
	S3_ATTRS_UI_TESTS=1 S3_ATTRS_CHROMIUM=$(CHROMIUM) $(BIN)/pytest s3_attrs_pipeline_tests/ui

# Stop the demo's background PostgreSQL and S3 server (their data stays in .demo/).
demo-stop: $(INSTALLED)
	$(BIN)/s3-attrs demo --stop

clean: demo-stop
	rm -rf .demo $(VENV)
