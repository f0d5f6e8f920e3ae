# The two commands of the README: `make smoke` (main job on the embedded default) and `make test`.
# Both install what they need first; torch comes first so that the CPU build on disk is used
# instead of a multi-GB CUDA download pulled in by a bare `torch` requirement.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .install-stamp

.PHONY: install smoke test lint browser

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

smoke: install
	$(PYTHON) pipelines/full.py

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# Debian's Chromium, for the test that opens MLflow's UI in a browser (skipped, saying so, without it)
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null; } || echo "chromium could not be installed: the MLflow UI check will be skipped"

test: lint browser
	$(PYTHON) -m pytest
