"""Reconstruction task: one reconstructor call on the selected mask."""

from __future__ import annotations

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sam3d_pipeline.images import LoadedImage
from sam3d_pipeline.run import pipeline
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import Reconstruction, Segmentation


@task(name="reconstruct", cache_policy=NO_CACHE)
def reconstruct_in_process(
    image: LoadedImage, mask: np.ndarray, options: pipeline.RunOptions, run_plan: pipeline.RunPlan, settings: Settings
) -> Reconstruction:
    logger = get_run_logger()
    info = run_plan.reconstructor_info
    logger.info("reconstructor %s %s on %s (%s)", info["name"], info["version"], info["device"],
                run_plan.reconstructor.reason)
    for limit in info.get("limits", []):
        logger.warning("reconstructor limit: %s", limit)
    recon = pipeline.reconstruct(image, mask, options, run_plan, settings)
    logger.info("mesh: %s", recon.stats)
    return recon


@task(name="reconstruct-objects", cache_policy=NO_CACHE)
def reconstruct_objects_in_process(image: LoadedImage, seg: Segmentation, indices: list[int],
                                   options: pipeline.RunOptions, run_plan: pipeline.RunPlan,
                                   settings: Settings) -> dict[int, Reconstruction]:
    """A photo's objects reconstructed together (one model call, one point map)."""
    logger = get_run_logger()
    logger.info("reconstructing %d object(s) of one photo with %s: instances %s", len(indices),
                run_plan.reconstructor_info["name"], indices)
    recons = pipeline.reconstruct_objects(image, seg, indices, options, run_plan, settings)
    for index, recon in recons.items():
        logger.info("object %d mesh: %s", index, recon.stats)
    return recons
