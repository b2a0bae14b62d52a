"""The ``gpu-worker`` flow: one warm GPU worker session, deployed to the GPU work pool (``sam3d-gpu``).

A run of it serves the GPU stage background tasks of its stages (``tasks/gpu_tasks.py``; ``SAM3D_GPU_WORKER_STAGES``:
``segment`` in the SAM 3 image, ``reconstruct`` in the SAM 3D Objects image, ``all`` where one process has both) one
task at a time, keeping its model loaded between photos, and ends Completed once it has been idle for
``SAM3D_GPU_IDLE_S``; so the pool scales to zero. Flows with ``SAM3D_GPU_STAGES=workers`` start sessions of the
deployment serving a stage when its work is queued (``tasks/gpu_dispatch.py``). ``sam3d-pipeline gpu-worker``
(or ``python -m flows.gpu_worker``) runs one here.
"""

import uuid
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from sam3d_pipeline.settings import get_settings
from tasks.gpu_tasks import serve_gpu_tasks
from tasks.publish import current_flow_run_id


@flow(name="gpu-worker", log_prints=False, validate_parameters=True)
def gpu_worker(idle_s: float | None = None,
               stages: Literal["segment", "reconstruct", "all"] | None = None) -> dict[str, Any]:
    """Serve GPU stage tasks until idle for ``idle_s`` seconds (default ``SAM3D_GPU_IDLE_S``).

    Args:
        idle_s: seconds without a task before the session exits (None: ``SAM3D_GPU_IDLE_S``).
        stages: the stage tasks to serve (None: ``SAM3D_GPU_WORKER_STAGES``, which each image sets).

    Returns:
        ``{"session", "tasks", "failed", "model_loads": {"segment": n, "reconstruct": n}}``.
    """
    settings = get_settings()
    idle = idle_s if idle_s is not None else settings.gpu_idle_s
    serving = stages or settings.gpu_worker_stages
    session = current_flow_run_id() or f"local-{uuid.uuid4().hex[:12]}"
    get_run_logger().info("GPU worker session %s: serving until idle for %.0f s (stages: %s)", session, idle, serving)
    ledger = serve_gpu_tasks(session, idle, stages=serving)
    summary = ledger.summary()
    if ledger.rows:
        create_table_artifact(table=ledger.rows, key="gpu-worker-session",
                              description=f"GPU worker session {session}: {summary['tasks']} task(s), model loads "
                              f"{summary['model_loads']} (seconds per stage; 0 = model already in memory)")
    get_run_logger().info("GPU worker session %s: idle for %.0f s, exiting (%s)", session, idle, summary)
    return summary


if __name__ == "__main__":
    gpu_worker()
