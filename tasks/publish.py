"""Publishing tasks: the run's end (``sam3d_pipeline.run.finish``) with retries when transient, and artifacts."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from sam3d_pipeline.errors import PipelineError
from sam3d_pipeline.run import finish
from sam3d_pipeline.run.finish import RunRecord
from sam3d_pipeline.run.report import RunResult, summary_markdown
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import open_storage
from tasks.retry import retry_if_transient, retry_options


def current_flow_run_id() -> str | None:
    run_id = flow_run.get_id()
    return str(run_id) if run_id else None


def current_run_facts() -> dict[str, Any]:
    """The ``RunRecord`` fields the flow run knows: its id, and when a deployment's run was due (its queue)."""
    from prefect.runtime import deployment

    due = flow_run.get_scheduled_start_time() if deployment.get_id() else None
    return {"flow_run_id": current_flow_run_id(), "queued_at": due.timestamp() if due else None}


@task(name="publish-outputs", cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient)
def publish_run(output_root: str, record: RunRecord, settings: Settings) -> RunResult:
    """Render every output and publish it, ``result.json`` last."""
    result = finish.finish_run(open_storage(output_root, settings), record, settings)
    get_run_logger().info("wrote %d file(s) under %s, result.json last", len(result.outputs), result.output_prefix)
    return result


@task(name="record-failure", cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient)
def publish_failure(output_root: str, record: RunRecord, exc: BaseException, settings: Settings) -> RunResult:
    """Write a ``failed`` ``result.json`` (when the prefix is known)."""
    return finish.fail_run(open_storage(output_root, settings), record, exc)


def finish_outputs(output_root: str, record: RunRecord, settings: Settings) -> RunResult:
    """End a run that produced its outputs: publish (retried when transient), then the artifacts."""
    result = publish_run.with_options(**retry_options(settings))(output_root, record, settings)
    publish_artifacts(result, output_root, settings)
    get_run_logger().info("%s: %s", result.status, result.output_prefix)
    return result


def record_failure(output_root: str, record: RunRecord, exc: PipelineError, settings: Settings) -> RunResult:
    """End a failed run: the reason in the log, in ``result.json`` (when the prefix is known) and an artifact."""
    logger = get_run_logger()
    logger.error("failed (%s, %s): %s", type(exc).__name__, "transient" if exc.transient else "permanent", exc)
    try:
        result = publish_failure.with_options(**retry_options(settings))(output_root, record, exc, settings)
    except PipelineError as write_exc:
        logger.error("could not record the failure in result.json: %s", write_exc)
        result = finish.build_result(record, "failed", error=exc)
    publish_artifacts(result, output_root, settings)
    return result


def publish_artifacts(result: RunResult, output_root: str, settings: Settings) -> None:
    """Artifacts for people, on the flow run (three API calls: not a task run of its own): the overlay, the instances
    table, and a summary linking every output."""
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
