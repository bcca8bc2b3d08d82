# Two commands for a newcomer: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NODE_STAMP := tests/node/node_modules/.installed-stamp

.PHONY: setup serve test test-fast lint system-deps bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Real peers the integration tests talk to: dcmtk (storescu), Orthanc (the PACS),
# Chromium (the web page) and Node.js (the FHIR validator). Installed only if missing.
system-deps:
	@deploy/system-deps.sh

# The FHIR validator's packages (tests/node/node_modules is not in git), after system-deps
# has had its chance to install npm. Without npm the tests that need it are skipped.
$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json | system-deps
	@if command -v npm >/dev/null; then \
	  echo "cd tests/node && npm ci"; \
	  (cd tests/node && npm ci --no-audit --no-fund --loglevel=error) && touch $(NODE_STAMP); \
	else \
	  echo "npm is missing: the FHIR validator tests will be skipped" >&2; \
	fi

serve: $(STAMP)
	$(VENV)/bin/cardioscan serve

test: $(STAMP) system-deps $(NODE_STAMP)
	$(PY) -m pytest
	$(MAKE) lint

test-fast: $(STAMP)
	$(PY) -m pytest -m "not integration and not e2e and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline adapters service tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache tests/node/node_modules
