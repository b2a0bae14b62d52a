"""Review-assets task: what the review page's in-browser click decoder needs for one photo."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sam3d_pipeline import backends
from sam3d_pipeline.backends.sam3 import clickdecoder
from sam3d_pipeline.images import LoadedImage
from sam3d_pipeline.run.pipeline import RunPlan
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import open_storage


@task(name="review-assets", cache_policy=NO_CACHE)
def store_review_assets(image: LoadedImage, run_plan: RunPlan, settings: Settings) -> dict[str, str] | None:
    """Store the photo's embeddings and (once per model version) the click decoder.

    Returns:
        ``{"embeddings_key", "decoder_key"}`` relative to the output root, or None when the segmenter has no
        click decoder (``lite``: the review page refines clicks on the server instead).
    """
    logger = get_run_logger()
    segmenter = backends.get_segmenter(run_plan.segmenter.name, settings)
    keys = clickdecoder.publish_review_assets(segmenter, image.rgb, open_storage(run_plan.output_root, settings),
                                              run_plan.prefix, settings.review_decoder_weights)
    if keys is None:
        logger.info("segmenter %s has no click decoder: the review page refines clicks on the server",
                    run_plan.segmenter.name)
    else:
        logger.info("review page assets: %s, %s", keys["embeddings_key"], keys["decoder_key"])
    return keys
