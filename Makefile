# sam3d-pipeline: `make demo` runs the pipeline on a sample photo; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-dev
GLTF_VALIDATOR := tools/gltf-validator/node_modules/.package-lock.json

.PHONY: demo test lint install bench clean chromium

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sam3d-pipeline run "$$($(PY) -m sam3d_pipeline.samples coffee)" --prompt "coffee cup" --out outputs
	@echo "Outputs are under ./outputs/ (open object.glb in any glTF viewer)"

$(GLTF_VALIDATOR): tools/gltf-validator/package.json tools/gltf-validator/package-lock.json
	npm ci --prefix tools/gltf-validator --no-audit --no-fund --loglevel=error

# Browser tests drive Debian's Chromium (never a downloaded browser).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) $(GLTF_VALIDATOR) chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: $(STAMP) chromium
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
