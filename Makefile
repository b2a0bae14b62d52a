# sam3d-pipeline: `make demo` runs the pipeline on a sample photo; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sam3d-pipeline run "$$($(PY) -m sam3d_pipeline.samples coffee)" --prompt "coffee cup" --out outputs
	@echo "Outputs are under ./outputs/ (open object.glb in any glTF viewer)"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/run_one.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
