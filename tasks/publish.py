"""Publishing tasks: encode outputs, write them (``result.json`` last, retried when transient), and artifacts."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from sam3d_pipeline import pipeline
from sam3d_pipeline.images import LoadedImage
from sam3d_pipeline.report import RunResult, summary_markdown
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import open_storage
from sam3d_pipeline.types import Reconstruction, Segmentation

from .retry import retry_if_transient


@task(name="render-outputs", cache_policy=NO_CACHE)
def render_outputs(
    image: LoadedImage,
    seg: Segmentation,
    selected: int | None,
    recon: Reconstruction | None,
    run_plan: pipeline.RunPlan,
    settings: Settings,
) -> dict[str, bytes]:
    files = pipeline.render_outputs(image, seg, selected, recon, run_plan, settings)
    get_run_logger().info("encoded %s", ", ".join(f"{k} ({len(v):,} B)" for k, v in sorted(files.items())))
    return files


@task(name="publish-outputs", cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient)
def publish_outputs(
    output_root: str, prefix: str, files: dict[str, bytes], result: RunResult, settings: Settings
) -> RunResult:
    storage = open_storage(output_root, settings)
    published = pipeline.publish(storage, prefix, files, result)
    get_run_logger().info("wrote %d file(s) under %s, result.json last", len(published.outputs), result.output_prefix)
    return published


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_artifacts(result: RunResult, output_root: str, settings: Settings) -> None:
    """Artifacts for people: the overlay, the instances table, and a summary linking every output."""
    prefix = result.output_prefix.rsplit("/", 1)[-1]
    if result.outputs and "overlay.png" in result.outputs:
        storage = open_storage(output_root, settings)
        create_image_artifact(
            image_url=storage.link(f"{prefix}/overlay.png"),
            description=f"Overlay for `{result.input.get('uri')}`, prompt `{result.prompt}`",
        )
    if result.instances:
        create_table_artifact(
            table=[dict(inst, selected=inst["index"] == result.selected) for inst in result.instances],
            description=f"Instances found by {result.segmenter['name'] if result.segmenter else '?'} "
            "(score, xyxy box in pixels, area in pixels)",
        )
    create_markdown_artifact(markdown=summary_markdown(result), description=f"image-to-3d: {result.status}")
