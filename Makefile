# sam3d-pipeline: `make demo` runs the pipeline on a sample photo; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-dev
SAM3_STAMP := $(VENV)/.installed-sam3

.PHONY: demo test lint install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The real SAM 3 backend (torch, sam3, onnxruntime: ~5.6 GB); the test suite runs it on the CPU.
$(SAM3_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[dev,sam3]'
	touch $(SAM3_STAMP)

demo: $(STAMP)
	$(VENV)/bin/sam3d-pipeline run "$$($(PY) -m sam3d_pipeline.samples coffee)" --prompt "coffee cup" --out outputs
	@echo "Outputs are under ./outputs/ (open object.glb in any glTF viewer)"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) $(SAM3_STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/run_one.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
