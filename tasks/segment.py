"""Segmentation task: one segmenter call, with the backend and its limits in the log."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sam3d_pipeline.images import LoadedImage
from sam3d_pipeline.run import pipeline
from sam3d_pipeline.run.finish import RunRecord
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import Segmentation
from sam3d_pipeline.video import LoadedVideo


@task(name="segment", cache_policy=NO_CACHE)
def segment_in_process(
    image: LoadedImage, options: pipeline.RunOptions, run_plan: pipeline.RunPlan, settings: Settings
) -> Segmentation:
    logger = get_run_logger()
    info = run_plan.segmenter_info
    logger.info("segmenter %s %s on %s (%s)", info["name"], info["version"], info["device"], run_plan.segmenter.reason)
    for limit in info.get("limits", []):
        logger.warning("segmenter limit: %s", limit)
    seg = pipeline.segment(image, options, run_plan, settings)
    for message in seg.messages:
        logger.info(message)
    logger.info("found %d instance(s): %s", len(seg.instances),
                ", ".join(f"#{i} score {inst.score:.2f}" for i, inst in enumerate(seg.instances)) or "none")
    return seg


@task(name="track-video", cache_policy=NO_CACHE)
def track_in_process(record: RunRecord, clip: LoadedVideo, settings: Settings) -> Segmentation:
    """Track the object through the clip in this process; the chosen frame becomes ``record.image``, its mask
    ``record.seg``."""
    info = record.run_plan.segmenter_info
    get_run_logger().info("tracker %s %s on %s through %d sampled frame(s)", info["name"], info["version"],
                          info["device"], len(clip.frames))
    pipeline.start_from_video(record, pipeline.track_video(clip, record.options, record.run_plan, settings))
    log_track(record)
    return record.seg


def log_track(record: RunRecord) -> None:
    """What the tracker did and which frame was chosen, wherever it ran."""
    logger = get_run_logger()
    run = record.video
    for message in run.track.messages:
        logger.info(message)
    chosen = run.chosen
    logger.info("tracked in %d of %d frame(s); %s", run.track.tracked, len(run.video.frames),
                f"chose frame {chosen.index} ({chosen.time_s:.2f} s, view score {chosen.view_score:.3f})"
                if chosen else "the object was never found")
