#!/usr/bin/env bash
# GPU image entry point (both images: gpu_worker/sam3.Dockerfile, gpu_worker/sam3d.Dockerfile): make sure the
# checkpoints this image reads are present and intact, then run the given command. On the sam3d-gpu pool the ECS
# worker passes `prefect flow-run execute`, which runs one gpu-worker session: it serves the GPU stage task of its
# image (SAM3D_GPU_WORKER_STAGES) with the model kept loaded, and exits when idle.
# No model-hub downloads happen after this point.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKPOINTS="${SAM3D_CHECKPOINT_DIR:-/opt/checkpoints}"
if [[ -n "${SAM3D_CHECKPOINT_URI:-}" ]]; then
  # Not baked into the image: fetch this image's parts from S3 at start (skips files that already match).
  python "${HERE}/fetch_checkpoints.py" fetch "${SAM3D_CHECKPOINT_URI}" "${CHECKPOINTS}" \
    --only "${SAM3D_CHECKPOINT_PARTS:-}"
fi
# Sizes only at start (hashing ~20 GB would add minutes); the build or the fetch above checked sha256.
python "${HERE}/fetch_checkpoints.py" verify --sizes-only "${CHECKPOINTS}" || {
  echo "checkpoints under ${CHECKPOINTS} are missing or incomplete; set SAM3D_CHECKPOINT_URI or rebuild" >&2
  exit 78
}
# A worker session reads task parameters from, and writes results to, storage it shares with the orchestrating
# flows; with Prefect's local defaults every task it picks up would fail. Refuse to start instead.
if [[ "${SAM3D_GPU_STAGES:-inline}" == "workers" ]]; then
  for setting in PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK; do
    if [[ -z "${!setting:-}" ]]; then
      echo "SAM3D_GPU_STAGES=workers needs ${setting} (the shared S3 block, e.g. s3-bucket/sam3d-task-storage)" >&2
      exit 78
    fi
  done
fi
# exec: no shell in between, so the session itself gets the SIGTERM ECS sends on stop (through the task's init
# process) and has the container's stopTimeout (120 s) to finish the task it is running.
exec "$@"
