# sam3d-pipeline: `make demo` runs the pipeline on a sample photo; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-dev
GLTF_VALIDATOR := tools/gltf-validator/node_modules/.package-lock.json
GALLERY := sam3d_pipeline/gallery
GALLERY_STAMP := $(GALLERY)/node_modules/.installed
SAM3_STAMP := $(VENV)/.installed-sam3

.PHONY: demo test lint install bench bench-catalog clean gallery-assets review-assets chromium postgres scan scan-tools

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

# The review page's in-browser click decoder runtime (onnxruntime-web), served by review-server.
REVIEW_WEB := sam3d_pipeline/review/web
REVIEW_WEB_STAMP := $(REVIEW_WEB)/node_modules/.installed
$(REVIEW_WEB_STAMP): $(REVIEW_WEB)/package.json $(REVIEW_WEB)/package-lock.json
	command -v npm >/dev/null || (apt-get update && apt-get install -y --no-install-recommends nodejs npm)
	cd $(REVIEW_WEB) && npm ci --no-audit --no-fund --loglevel=error
	touch $(REVIEW_WEB_STAMP)

review-assets: $(REVIEW_WEB_STAMP)

install: $(STAMP) $(GALLERY_STAMP) $(REVIEW_WEB_STAMP)

# The real SAM 3 backend (torch, sam3, onnxruntime: ~5.6 GB); the test suite runs it on the CPU.
$(SAM3_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[dev,sam3]'
	touch $(SAM3_STAMP)

demo: $(STAMP)
	$(VENV)/bin/sam3d-pipeline run "$$($(PY) -m sam3d_pipeline.samples coffee)" --prompt "coffee cup" --out outputs
	@echo "Outputs are under ./outputs/ (open object.glb in any glTF viewer)"
	@echo "The local Prefect API stays up for the next run and stops after 10 idle minutes (now: $(VENV)/bin/sam3d-pipeline local-api --stop)"

$(GLTF_VALIDATOR): tools/gltf-validator/package.json tools/gltf-validator/package-lock.json
	command -v npm >/dev/null || (apt-get update && apt-get install -y --no-install-recommends nodejs npm)
	npm ci --prefix tools/gltf-validator --no-audit --no-fund --loglevel=error

# Browser tests drive Debian's Chromium (never a downloaded browser).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# `up --db postgres` and its tests run Prefect on Debian's PostgreSQL server binaries (initdb, postgres).
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		echo "installing Debian's postgresql for the local stack's --db postgres"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# checkov (the templates' security scan) pins packages that clash with Prefect's: it lives in its own venv.
SCAN_VENV := tools/scan-venv
CHECKOV_STAMP := $(SCAN_VENV)/.installed-checkov-3.3.30
$(CHECKOV_STAMP):
	test -x $(SCAN_VENV)/bin/python || $(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/pip install --quiet checkov==3.3.30
	touch $(CHECKOV_STAMP)

scan-tools: $(CHECKOV_STAMP)

# The cloud templates and Dockerfiles: cfn-lint, checkov (no failed check; every skip says why), hadolint.
scan: $(STAMP) $(CHECKOV_STAMP)
	$(VENV)/bin/cfn-lint deployments/infrastructure.yaml deployments/artifacts.yaml
	$(SCAN_VENV)/bin/checkov --quiet --compact --skip-download --framework cloudformation \
		-f deployments/infrastructure.yaml -f deployments/artifacts.yaml
	$(VENV)/bin/hadolint deployments/service.Dockerfile gpu_worker/sam3.Dockerfile gpu_worker/sam3d.Dockerfile

test: $(STAMP) $(SAM3_STAMP) $(GLTF_VALIDATOR) $(GALLERY_STAMP) $(REVIEW_WEB_STAMP) chromium postgres $(CHECKOV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

bench: $(STAMP) $(SAM3_STAMP) $(GLTF_VALIDATOR) $(GALLERY_STAMP) $(REVIEW_WEB_STAMP) chromium
	$(PY) bench/run_all.py

bench-catalog: $(STAMP)
	$(PY) bench/catalog_throughput.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache $(GALLERY)/node_modules $(REVIEW_WEB)/node_modules $(SCAN_VENV)
