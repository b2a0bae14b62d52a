"""Intake: fetch the input's bytes (a task, retried when transient), then decode and validate them in the flow (never
retried, and cheap: not a task run of its own): a photo, or a video's bounded sample of frames."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sam3d_pipeline.images import LoadedImage
from sam3d_pipeline.run import pipeline
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.video import LoadedVideo
from tasks.retry import retry_if_transient


@task(name="fetch-input", cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient)
def fetch_input(uri: str, settings: Settings) -> bytes:
    data = pipeline.read_bytes(uri, settings)
    get_run_logger().info("read %s (%s bytes)", uri, f"{len(data):,}")
    return data


def decode_image(data: bytes, uri: str, settings: Settings) -> LoadedImage:
    image = pipeline.decode(data, uri, settings)
    get_run_logger().info(
        "decoded %s: %dx%d %s (mode %s%s)", uri, image.width, image.height, image.format, image.original_mode,
        ", EXIF orientation applied" if image.exif_transposed else "",
    )
    return image


def decode_video(data: bytes, uri: str, settings: Settings) -> LoadedVideo:
    clip = pipeline.decode_video(data, uri, settings)
    for note in clip.notes:
        get_run_logger().info(note)
    return clip


def plan_run(uri: str, data: bytes, options: pipeline.RunOptions, output_root: str, settings: Settings,
             review_mode: str = "none") -> pipeline.RunPlan:
    """The run's backends and output prefix, from the input's bytes (no decode, no model, no torch import)."""
    run_plan = pipeline.plan(uri, pipeline.content_id(data), options, output_root, settings, review_mode=review_mode)
    get_run_logger().info("output prefix %s/%s", output_root, run_plan.prefix)
    return run_plan
