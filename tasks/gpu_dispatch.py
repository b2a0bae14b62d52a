"""GPU stage dispatch: run segmentation and reconstruction in-process or as deployments on the GPU pool.

``SAM3D_GPU_STAGES=inline`` (the embedded default) calls the in-process tasks with the pixels in memory.
``SAM3D_GPU_STAGES=deployment`` calls the ``segment-image`` / ``reconstruct-objects`` deployments with
``run_deployment``, passing storage keys, and reads their results back from storage. A stage run that
crashes for an infrastructure reason (no GPU capacity, spot interruption, out of memory) is retried with
exponential backoff; after an out-of-memory crash the retry runs with the low-memory settings. Every attempt
is logged, recorded in a table artifact, and listed in the run's messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling

from sam3d_pipeline import gpu_stages as stages
from sam3d_pipeline import pipeline
from sam3d_pipeline.gpu_failures import GpuStageError, StageAttempt, backoff_s, classify, next_low_memory, should_retry
from sam3d_pipeline.images import LoadedImage
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import Reconstruction, Segmentation

from .embeddings import store_review_assets
from .reconstruct import reconstruct_object
from .segment import segment_image


def run_gpu_stage(deployment: str, parameters: dict[str, Any], settings: Settings, *,
                  low_memory_param: bool = False, sleep: Callable[[float], None] = time.sleep) -> list[StageAttempt]:
    """Run a stage deployment until it completes, retrying infrastructure crashes with backoff.

    Args:
        deployment: ``flow-name/deployment-name``.
        parameters: JSON-able flow parameters (storage keys, never pixels).
        settings: ``gpu_stage_attempts``, ``gpu_stage_retry_delay_s``, ``gpu_stage_timeout_s``.
        low_memory_param: the flow accepts ``low_memory``; set it after an out-of-memory crash.
        sleep: the backoff sleep (seconds), replaceable in tests.

    Returns:
        Every attempt, the last one ``ok``.

    Raises:
        GpuStageError: a permanent failure, attempts exhausted, or a run still unfinished at the timeout.
    """
    logger = get_run_logger()
    attempts: list[StageAttempt] = []
    low_memory = False
    for n in range(1, settings.gpu_stage_attempts + 1):
        params = parameters | ({"low_memory": True} if low_memory and low_memory_param else {})
        try:
            flow_run = run_deployment(deployment, parameters=params, timeout=settings.gpu_stage_timeout_s)
        except ObjectNotFound as exc:
            raise GpuStageError(f"deployment {deployment!r} not found: deploy it (prefect deploy --all) or set "
                                "SAM3D_GPU_STAGES=inline", attempts) from exc
        state = flow_run.state
        final = state is not None and state.is_final()
        kind = classify(state.type.value, state.message) if final else "timeout"
        if not final:
            _cancel(flow_run.id, settings.gpu_stage_timeout_s)
        attempt = StageAttempt(attempt=n, flow_run_id=str(flow_run.id), state=state.type.value if state else "NONE",
                               kind=kind, message=(state.message or "")[:500] if state else "", low_memory=low_memory)
        attempts.append(attempt)
        (logger.info if kind == "ok" else logger.warning)("%s %s", deployment, attempt.line())
        if kind == "ok":
            break
        if not should_retry(kind, n, settings.gpu_stage_attempts, low_memory):
            _record(deployment, attempts)
            raise GpuStageError(f"{deployment} did not complete: {attempt.line()}", attempts)
        if low_memory_param:
            low_memory = next_low_memory(kind, low_memory)
        delay = backoff_s(n, settings.gpu_stage_retry_delay_s)
        logger.info("retrying %s in %.0f s%s", deployment, delay, " with low-memory settings" if low_memory else "")
        sleep(delay)
    if len(attempts) > 1:
        _record(deployment, attempts)
    return attempts


def _cancel(flow_run_id: Any, timeout_s: float) -> None:
    """Cancel a stage run that outlived its timeout, so it stops holding (or waiting for) a GPU."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(
            flow_run_id, Cancelling(message=f"no result within SAM3D_GPU_STAGE_TIMEOUT_S={timeout_s:g}"), force=True
        )


def _record(deployment: str, attempts: list[StageAttempt]) -> None:
    create_table_artifact(table=[a.as_dict() for a in attempts],
                          description=f"GPU stage `{deployment}`: attempts (state, failure class, message)")


def segment(image: LoadedImage, options: pipeline.RunOptions, run_plan: pipeline.RunPlan, settings: Settings,
            output_root: str, review_assets: bool = False) -> Segmentation:
    """Segment in-process, or through the ``segment-image`` deployment (``SAM3D_GPU_STAGES``).

    ``review_assets`` also stores the review page's click-decoder files, where the model runs.
    """
    if settings.gpu_stages == "inline":
        seg = segment_image(image, options, run_plan, settings)
        if review_assets:
            store_review_assets(image, run_plan, settings)
        return seg
    pipeline.segment_request(options, image.width, image.height)  # bad boxes/points fail here, before a GPU
    params = stages.SegmentParams(prompt=options.prompt, boxes=options.boxes,
                                  points=[p.model_dump() for p in options.points])
    attempts = run_gpu_stage(settings.segment_deployment, {
        "image": run_plan.input_uri, "output_root": output_root, "prefix": run_plan.prefix,
        "params": params.model_dump(mode="json"), "segmenter": run_plan.segmenter.name,
        **({"review_assets": True} if review_assets else {}),
    }, settings)
    seg = stages.load_segmentation(output_root, run_plan.prefix, settings)
    seg.messages.extend(f"segment-image {a.line()}" for a in attempts if len(attempts) > 1)
    return seg


def reconstruct(image: LoadedImage, seg: Segmentation, selected: int, options: pipeline.RunOptions,
                run_plan: pipeline.RunPlan, settings: Settings, output_root: str) -> Reconstruction:
    """Reconstruct the selected instance in-process, or through the ``reconstruct-objects`` deployment."""
    mask: np.ndarray = seg.instances[selected].mask
    if settings.gpu_stages == "inline":
        return reconstruct_object(image, mask, options, run_plan, settings)
    job = stages.ReconstructJobParam(
        image=run_plan.input_uri, mask=f"{run_plan.prefix}/{stages.SEGMENT_DIR}/mask-{selected}.png",
        output=f"{run_plan.prefix}/{stages.RECONSTRUCT_DIR}", seed=options.seed,
    )
    attempts = run_gpu_stage(settings.reconstruct_deployment, {
        "jobs": [job.model_dump(mode="json")], "output_root": output_root,
        "reconstructor": run_plan.reconstructor.name,
    }, settings, low_memory_param=True)
    recon = stages.load_reconstruction(output_root, job.output, settings)
    recon.stats["gpu_attempts"] = [a.as_dict() for a in attempts]
    seg.messages.extend(f"reconstruct-objects {a.line()}" for a in attempts if len(attempts) > 1)
    return recon
