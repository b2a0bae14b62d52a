# syntax=docker/dockerfile:1.7
# The non-GPU image: everything that is not model work, from one image with this project and its `service` extra
# (no torch) at /opt/sam3d-pipeline:
#   the CPU pool's process worker and its orchestrating flow runs  prefect worker start --pool sam3d-cpu --type process
#   the GPU pool's ECS worker                                      prefect worker start --pool sam3d-gpu --type ecs
#   the events bridge (ECS service)                                sam3d-pipeline events-bridge --queue-url URL
#   the events bridge (Lambda)                                     python -m awslambdaric handler.handler
#                                                                    (working directory deployments/lambda)
#   the web server (job API, studio, review page)                  sam3d-pipeline web --host 0.0.0.0 --port 8000
#
#   docker buildx build -f deployments/service.Dockerfile --platform linux/amd64 --provenance=false \
#     -t ACCOUNT.dkr.ecr.REGION.amazonaws.com/sam3d-pipeline:TAG .
#
# (--provenance=false: Lambda refuses image indexes with attestations.) The bases are pinned by exact tag; append
# @sha256:<digest> to the build args to pin them by digest as well (docker buildx imagetools inspect <tag>).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG NODE_IMAGE=node:22.12.0-bookworm-slim

# Browser assets served from the package folders (no CDN at run time): onnxruntime-web for the review page's
# click decoder, @google/model-viewer for the gallery and the studio. Only their dist/ folders are kept.
FROM ${NODE_IMAGE} AS browser-assets
WORKDIR /assets
COPY sam3d_pipeline/review/web/package.json sam3d_pipeline/review/web/package-lock.json review/
COPY sam3d_pipeline/gallery/package.json sam3d_pipeline/gallery/package-lock.json gallery/
RUN npm ci --prefix review --omit=dev --no-audit --no-fund --loglevel=error \
 && npm ci --prefix gallery --omit=dev --no-audit --no-fund --loglevel=error

FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PREFECT_HOME=/tmp/prefect \
    SAM3D_PROJECT_DIR=/opt/sam3d-pipeline \
    PYTHONPATH=/opt/sam3d-pipeline

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The project is installed in editable mode from /opt/sam3d-pipeline: deployments pull from there
# (set_working_directory), and the browser assets below sit next to the package as they do in a checkout. The
# package installs sam3d_pipeline only; flows/ and tasks/ are imported from the project folder (SAM3D_PROJECT_DIR,
# on PYTHONPATH above).
WORKDIR /opt/sam3d-pipeline
COPY pyproject.toml README.md ./
COPY sam3d_pipeline ./sam3d_pipeline
COPY flows ./flows
COPY tasks ./tasks
COPY deployments/lambda ./deployments/lambda
COPY --from=browser-assets /assets/review/node_modules/onnxruntime-web/dist \
     ./sam3d_pipeline/review/web/node_modules/onnxruntime-web/dist
COPY --from=browser-assets /assets/gallery/node_modules/@google/model-viewer/dist \
     ./sam3d_pipeline/gallery/node_modules/@google/model-viewer/dist
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir --editable ".[service]" \
 && if pip list --format=freeze | grep -iE '^(torch|torchvision|triton|nvidia-)'; then \
      echo "the service image must not contain torch or CUDA libraries" >&2; exit 1; \
    fi

# Non-root. Only /tmp needs to be writable (PREFECT_HOME, temporary files); the Fargate services that can run with
# a read-only root mount a volume there.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp sam3d
USER 10001
ENV HOME=/tmp

CMD ["sam3d-pipeline", "--help"]
