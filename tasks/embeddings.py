"""Embeddings task: the click decoder's inputs for one image, stored as ``embeddings.bin`` next to the mask."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sam3d_pipeline import backends, embeddings
from sam3d_pipeline.backends.base import Embedder
from sam3d_pipeline.images import LoadedImage
from sam3d_pipeline.pipeline import RunPlan
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import open_storage


@task(name="embeddings", cache_policy=NO_CACHE)
def store_embeddings(image: LoadedImage, run_plan: RunPlan, settings: Settings) -> str | None:
    """Compute the image embedding and high-resolution features with the planned segmenter and store them.

    Returns:
        The URI of ``embeddings.bin``, or None (skipped) when the segmenter has no click decoder (``lite``).
    """
    logger = get_run_logger()
    segmenter = backends.get_segmenter(run_plan.segmenter.name, settings)
    if not isinstance(segmenter, Embedder):
        logger.info("segmenter %s has no click decoder: no embeddings stored", run_plan.segmenter.name)
        return None
    tensors = segmenter.embeddings(image.rgb)
    uri = embeddings.store(open_storage(run_plan.output_root, settings), run_plan.prefix, tensors)
    logger.info("stored click-decoder embeddings at %s", uri)
    return uri
