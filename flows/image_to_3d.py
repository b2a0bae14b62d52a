"""The ``image-to-3d`` flow: one photo and a text prompt → mask, overlay, mesh, preview and ``result.json``.

Permanent failures (bad image, bad prompt options, unavailable backend) fail the run at once, with the
reason in the run's state, in a markdown artifact and, when the input could be read, in ``result.json``.
Transient storage failures are retried with backoff by the tasks that touch storage. The model stages run
in this process or on the warm GPU workers (``SAM3D_GPU_STAGES``; the one dispatch point is
``tasks/gpu_dispatch.py``). The run's end (render, ``result.json`` last, artifacts) is ``sam3d_pipeline.run.finish``.
"""


from typing import Any, Literal

from prefect import flow

from sam3d_pipeline.errors import PipelineError
from sam3d_pipeline.export import ProfileName
from sam3d_pipeline.masks import select_instance
from sam3d_pipeline.run import clock, objects
from sam3d_pipeline.run.finish import RunRecord, existing_result, timed
from sam3d_pipeline.run.pipeline import RunOptions
from sam3d_pipeline.settings import get_settings
from sam3d_pipeline.storage import open_storage
from sam3d_pipeline.types import BoxParam, Point
from sam3d_pipeline.video import is_video_uri
from tasks import gpu_dispatch
from tasks.intake import decode_image, decode_video, fetch_input, plan_run
from tasks.publish import current_run_facts, finish_outputs, record_failure
from tasks.retry import retry_options
from tasks.review_pause import review_run, segment_or_reuse

clock.mark_imported()


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
    instances: Literal["best", "all"] | list[int] = "best",
    profile: ProfileName = "web",
    export: list[Literal["glb", "usdz", "obj", "ply"]] | None = None,
    video_frames: int = 1,
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
        instances: objects to reconstruct: ``best`` (the selected instance), ``all``, or instance indices; each
            gets ``objects/<index>/`` and ``scene.glb`` holds them all.
        profile: ``web`` (simplified to ``SAM3D_EXPORT_MAX_TRIANGLES``, quantised GLB), ``ar`` (simplified,
            plain GLB) or ``raw`` (the reconstructor's mesh as it came).
        export: formats per object, default ``glb`` and ``usdz``; also ``obj`` (+ mtl, texture), ``ply`` (splat).
        video_frames: when ``image`` is a video (MP4 / MOV / WebM, or a folder / prefix of frames): reconstruct
            from the best tracked frame (1), or try the K best and keep the one the reconstructor scores highest.

    Returns:
        The ``result.json`` contents (status ``completed``, ``no_object`` or ``rejected``); a failure raises.
    """
    settings = get_settings()
    storage = open_storage(output_root or settings.output_root, settings)
    options = RunOptions(prompt=prompt, boxes=boxes or [], points=points or [], instance_index=instance_index,
                         segmenter=segmenter, reconstructor=reconstructor, seed=seed, instances=instances,
                         profile=profile, export=export or ["glb", "usdz"], video_frames=video_frames)
    record = RunRecord(input_uri=image, options=options, **current_run_facts())
    try:
        with timed(record, "intake"):
            data = fetch_input.with_options(**retry_options(settings))(image, settings)
            record.run_plan = plan_run(image, data, options, storage.root, settings, review)
            if not force and (done := existing_result(storage, record.run_plan.prefix)) is not None:
                return done.model_dump(mode="json")
            clip = decode_video(data, image, settings) if is_video_uri(image) else None
            if clip is None:
                record.image = decode_image(data, image, settings)
        with timed(record, "segment"):
            record.seg = (gpu_dispatch.track(record, clip, settings, storage.root) if clip is not None else
                          gpu_dispatch.segment(record.image, options, record.run_plan, settings, storage.root)
                          if review == "none" else  # a resumed review re-executes the flow: reuse round 1
                          segment_or_reuse(record.image, options, record.run_plan, settings, storage, 1))
            record.selected = objects.primary_of(
                options.instances, select_instance(record.seg.instances, options.instance_index),
                options.instance_index)
        review_run(record, review, review_auto_approve_score, review_timeout_s, review_on_timeout, storage, settings)
        if record.selected is not None and not record.rejected:
            with timed(record, "reconstruct"):
                gpu_dispatch.reconstruct_run(record, settings, storage.root)
        return finish_outputs(storage.root, record, settings).model_dump(mode="json")
    except PipelineError as exc:
        record_failure(storage.root, record, exc, settings)
        raise
