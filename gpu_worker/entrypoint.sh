#!/usr/bin/env bash
# GPU image entry point: make sure the checkpoints are present and intact, then run the given command
# (the ECS worker passes `prefect flow-run execute`). No model-hub downloads happen after this point.
set -euo pipefail

CHECKPOINTS="${SAM3D_CHECKPOINT_DIR:-/opt/checkpoints}"
if [[ -n "${SAM3D_CHECKPOINT_URI:-}" ]]; then
  # Not baked into the image: fetch from S3 at start (skips files that already match).
  python /opt/sam3d-pipeline/gpu_worker/fetch_checkpoints.py fetch "${SAM3D_CHECKPOINT_URI}" "${CHECKPOINTS}"
fi
# Sizes only at start (hashing ~20 GB would add minutes); the build or the fetch above checked sha256.
python /opt/sam3d-pipeline/gpu_worker/fetch_checkpoints.py verify --sizes-only "${CHECKPOINTS}" || {
  echo "checkpoints under ${CHECKPOINTS} are missing or incomplete; set SAM3D_CHECKPOINT_URI or rebuild" >&2
  exit 78
}
exec "$@"
