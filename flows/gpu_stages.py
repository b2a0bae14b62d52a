"""The GPU stage flows: ``segment-image`` and ``reconstruct-objects``, deployed to the GPU work pool.

They take storage keys (never pixels), read the photo and masks from storage, and write their results under
the run's prefix (see ``sam3d_pipeline.stages``). ``image-to-3d`` calls them with ``run_deployment`` when
``SAM3D_GPU_STAGES=deployment``. ``python -m flows.gpu_stages`` serves both on this machine (a local
stand-in for the GPU pool's worker).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from sam3d_pipeline import gpu_stages as stages
from sam3d_pipeline.settings import Settings, get_settings


def _settings(low_memory: bool | None) -> Settings:
    settings = get_settings()
    if low_memory is not None:
        settings = settings.model_copy(update={"sam3d_low_memory": low_memory})
    return settings


@flow(name="segment-image", log_prints=False, validate_parameters=True)
def segment_image(
    image: str,
    output_root: str,
    prefix: str,
    params: stages.SegmentParams,
    segmenter: str = "sam3",
    review_assets: bool = False,
) -> dict[str, Any]:
    """Find instances in ``image`` and write their masks under ``<output_root>/<prefix>/stages/segment/``.

    Args:
        image: photo URI (local path or ``s3://bucket/key``).
        output_root: local directory or ``s3://bucket/prefix``.
        prefix: the run's output prefix name.
        params: prompt, boxes (xyxy px) and points (px).
        segmenter: resolved backend name (``sam3`` or ``lite``).
        review_assets: also store the review page's click-decoder files (embeddings, decoder).

    Returns:
        The contents of ``segmentation.json`` (instances with mask keys, backend, messages).
    """
    logger = get_run_logger()
    summary = stages.run_segment_stage(image, output_root, prefix, params, segmenter, get_settings(),
                                       review_assets=review_assets)
    logger.info("%s found %d instance(s) in %s", summary["backend"]["name"], len(summary["instances"]), image)
    return summary


@flow(name="reconstruct-objects", log_prints=False, validate_parameters=True)
def reconstruct_objects(
    jobs: list[stages.ReconstructJobParam],
    output_root: str,
    reconstructor: str = "sam3d",
    low_memory: bool | None = None,
) -> list[dict[str, Any]]:
    """Reconstruct a batch of (image, mask) jobs with one model load per run.

    Args:
        jobs: image URI, mask key, output key prefix and seed per object.
        output_root: local directory or ``s3://bucket/prefix`` the keys are relative to.
        reconstructor: resolved backend name (``sam3d`` or ``lite``).
        low_memory: override ``SAM3D_SAM3D_LOW_MEMORY`` (set after an out-of-memory crash).

    Returns:
        Per job, the contents of its ``reconstruction.json`` (outputs, pose, stats, backend).
    """
    logger = get_run_logger()
    settings = _settings(low_memory)
    logger.info("%d job(s) on %d photo(s) with %s%s", len(jobs), len({j.image for j in jobs}), reconstructor,
                " (low-memory)" if settings.sam3d_low_memory else "")
    results = stages.run_reconstruct_stage(jobs, output_root, reconstructor, settings)
    for job, result in zip(jobs, results, strict=True):
        logger.info("%s: %s", job.output, result["stats"])
    return results


def serve_stages() -> None:  # pragma: no cover - long-running; exercised by the deployment-mode test
    """Serve both stage flows from this process (deployment names match ``prefect.yaml``)."""
    from prefect import serve

    serve(
        segment_image.to_deployment(name="segment-image"),
        reconstruct_objects.to_deployment(name="reconstruct-objects"),
    )


if __name__ == "__main__":
    serve_stages()
