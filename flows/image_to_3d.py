"""The ``image-to-3d`` flow: one photo and a text prompt → mask, overlay, mesh, preview and ``result.json``.

Permanent failures (bad image, bad prompt options, unavailable backend) fail the run at once, with the
reason in the run's state, in a markdown artifact and, when the input could be read, in ``result.json``.
Transient storage failures are retried with backoff by the tasks that touch storage. The model stages run
in-process or as GPU deployments (``SAM3D_GPU_STAGES``, see ``tasks/stages.py``).
"""


import time
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.review import ReviewConfig, review_loop, segment_or_reuse
from sam3d_pipeline import pipeline
from sam3d_pipeline.errors import PipelineError
from sam3d_pipeline.masks import select_instance
from sam3d_pipeline.pipeline import RunOptions
from sam3d_pipeline.review.policy import edited_instance, needs_review
from sam3d_pipeline.settings import get_settings
from sam3d_pipeline.storage import open_storage
from sam3d_pipeline.types import BoxParam, Point
from tasks import gpu_dispatch as stages
from tasks.intake import decode_image, fetch_input
from tasks.publish import publish_artifacts, publish_outputs, render_outputs
from tasks.retry import retry_options


@flow(name="image-to-3d", log_prints=False, validate_parameters=True)
def image_to_3d(
    image: str,
    prompt: str,
    output_root: str | None = None,
    boxes: list[BoxParam] | None = None,
    points: list[Point] | None = None,
    instance_index: int | None = None,
    segmenter: Literal["auto", "lite", "sam3"] = "auto",
    reconstructor: Literal["auto", "lite", "sam3d"] = "auto",
    seed: int = 0,
    force: bool = False,
    review: Literal["none", "auto", "required"] = "none",
    review_auto_approve_score: float = 0.8,
    review_timeout_s: float = 3600.0,
    review_on_timeout: Literal["fail", "approve_if_confident"] = "fail",
) -> dict[str, Any]:
    """Segment the object named by ``prompt`` in ``image`` and reconstruct it in 3D.

    Args:
        image: local path or ``s3://bucket/key`` of the photo.
        prompt: what to segment, e.g. ``red chair``.
        output_root: local directory or ``s3://bucket/prefix``; default ``SAM3D_OUTPUT_ROOT``.
        boxes: box prompts, xyxy image pixels.
        points: click prompts, image pixels, label 1 = object / 0 = background.
        instance_index: which instance to reconstruct; default the highest score.
        segmenter: ``auto`` (sam3 when usable, else lite), ``lite`` or ``sam3``.
        reconstructor: ``auto`` (sam3d when usable, else lite), ``lite`` or ``sam3d``.
        seed: seed for stochastic reconstructors.
        force: recompute even when a completed result exists at the output prefix.
        review: ``none``; ``required`` (always wait for a person); ``auto`` (wait when the best score is below
            ``review_auto_approve_score``). The run pauses for a typed answer before reconstruction.
        review_auto_approve_score: score at or above which ``auto`` (and ``approve_if_confident``) approve.
        review_timeout_s: how long to wait for the reviewer (seconds).
        review_on_timeout: ``fail`` the run, or ``approve_if_confident`` (best score >= the threshold).

    Returns:
        The ``result.json`` contents (status ``completed``, ``no_object`` or ``rejected``); a failure raises.
    """
    logger = get_run_logger()
    settings = get_settings()
    options = RunOptions(
        prompt=prompt,
        boxes=boxes or [],
        points=points or [],
        instance_index=instance_index,
        segmenter=segmenter,
        reconstructor=reconstructor,
        seed=seed,
    )
    root = open_storage(output_root or settings.output_root, settings).root
    io_retries = retry_options(settings)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = run_plan = seg = recon = None
    selected = None
    try:
        t = time.perf_counter()
        data = fetch_input.with_options(**io_retries)(image, settings)
        run_plan = pipeline.plan(image, pipeline.content_id(data), options, root, settings, review_mode=review)
        logger.info("output prefix %s/%s", root, run_plan.prefix)
        if not force:
            done = pipeline.existing_result(open_storage(root, settings), run_plan.prefix)
            if done is not None:
                logger.info("a completed result exists at this prefix; reusing it (force=True recomputes)")
                return done.model_dump(mode="json")
        loaded = decode_image(data, image, settings)
        timings["intake"] = time.perf_counter() - t

        t = time.perf_counter()
        if review == "none":
            seg = stages.segment(loaded, options, run_plan, settings, root)
        else:  # a suspended review re-executes the flow: reuse the persisted first round
            seg = segment_or_reuse(loaded, options, run_plan, settings, open_storage(root, settings), 1)
        selected = select_instance(seg.instances, options.instance_index)
        timings["segment"] = time.perf_counter() - t

        wait, why = needs_review(review, seg.instances, review_auto_approve_score)
        review_record: dict[str, Any] = {"mode": review, "reason": why}
        rejected = False
        if wait:
            t = time.perf_counter()
            outcome = review_loop(
                config=ReviewConfig(review, why, review_auto_approve_score, review_timeout_s, review_on_timeout),
                image=loaded, options=options, run_plan=run_plan, seg=seg, selected=selected,
                storage=open_storage(root, settings), settings=settings, page_url=settings.review_page_url,
            )
            seg, selected, options, review_record = outcome.seg, outcome.selected, outcome.options, outcome.record
            if outcome.edited_mask is not None:
                base = seg.instances[selected] if selected is not None else None
                seg.instances.append(edited_instance(outcome.edited_mask, base))
                selected = len(seg.instances) - 1
            rejected = outcome.status == "rejected"
            timings["review_wait"] = time.perf_counter() - t

        if rejected:
            logger.info("the reviewer rejected the mask: no reconstruction")
        elif selected is not None:
            t = time.perf_counter()
            recon = stages.reconstruct(loaded, seg, selected, options, run_plan, settings, root)
            timings["reconstruct"] = time.perf_counter() - t
        else:
            logger.warning("no object found for prompt %r: nothing to reconstruct", options.prompt)

        t = time.perf_counter()
        files = render_outputs(loaded, seg, selected, recon, run_plan, settings)
        timings["render"] = time.perf_counter() - t
        status = "rejected" if rejected else "completed" if recon is not None else "no_object"
        timings["total"] = time.perf_counter() - start
        result = pipeline.build_result(
            status=status, image=loaded, input_uri=image, options=options, run_plan=run_plan, seg=seg,
            selected=selected, recon=recon, timings=timings, flow_run_id=_flow_run_id(), review=review_record,
        )
        t = time.perf_counter()
        result = publish_outputs.with_options(**io_retries)(root, run_plan.prefix, files, result, settings)
        result.timings_s["publish"] = round(time.perf_counter() - t, 3)
        publish_artifacts(result, root, settings)
        logger.info("%s: %s", result.status, result.output_prefix)
        return result.model_dump(mode="json")
    except PipelineError as exc:
        timings["total"] = time.perf_counter() - start
        _record_failure(exc, image, options, loaded, run_plan, seg, selected, timings, root, settings)
        raise


def _flow_run_id() -> str | None:
    run_id = flow_run.get_id()
    return str(run_id) if run_id else None


def _record_failure(exc, image, options, loaded, run_plan, seg, selected, timings, root, settings) -> None:
    """Write a failed ``result.json`` (when the prefix is known) and a markdown artifact with the reason."""
    logger = get_run_logger()
    logger.error("failed (%s, %s): %s", type(exc).__name__, "transient" if exc.transient else "permanent", exc)
    result = pipeline.build_result(
        status="failed", image=loaded, input_uri=image, options=options, run_plan=run_plan, seg=seg,
        selected=selected, timings=timings, error=exc, flow_run_id=_flow_run_id(),
    )
    if run_plan is not None:
        try:
            result = publish_outputs.with_options(**retry_options(settings))(
                root, run_plan.prefix, {}, result, settings
            )
        except PipelineError as write_exc:
            logger.error("could not record the failure in result.json: %s", write_exc)
    publish_artifacts(result, root, settings)
