# sam3d-pipeline: `make demo` runs the pipeline on a sample photo; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-dev
GALLERY := sam3d_pipeline/gallery
GALLERY_STAMP := $(GALLERY)/node_modules/.installed

.PHONY: demo test lint install bench bench-catalog clean gallery-assets chromium

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

# The catalog gallery's 3D viewer (@google/model-viewer), installed from npm and copied next to index.html.
$(GALLERY_STAMP): $(GALLERY)/package.json $(GALLERY)/package-lock.json
	command -v npm >/dev/null || (apt-get update && apt-get install -y --no-install-recommends nodejs npm)
	cd $(GALLERY) && npm ci --no-audit --no-fund
	touch $(GALLERY_STAMP)

gallery-assets: $(GALLERY_STAMP)

# Browser tests use Debian's chromium (never a downloaded browser).
chromium:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y --no-install-recommends chromium)

install: $(STAMP) $(GALLERY_STAMP)

demo: $(STAMP)
	$(VENV)/bin/sam3d-pipeline run "$$($(PY) -m sam3d_pipeline.samples coffee)" --prompt "coffee cup" --out outputs
	@echo "Outputs are under ./outputs/ (open object.glb in any glTF viewer)"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) $(GALLERY_STAMP) chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/run_one.py

bench-catalog: $(STAMP)
	$(PY) bench/catalog_throughput.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache $(GALLERY)/node_modules
