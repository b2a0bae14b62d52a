"""Pause ``image-to-3d`` for a person to approve, reject, re-prompt or refine the mask (typed ``RunInput``).

The pause happens in the orchestrating flow between segmentation and reconstruction, so no GPU is held while
a person decides. The input model is built per round with the image's and the instances' bounds (and, for a
video, the frames offered to pick from), so the Prefect server itself refuses an out-of-range instance, a box
outside the image or a frame not offered, and the run keeps waiting.
What an answer leads to is decided by ``sam3d_pipeline.review.machine``; this module publishes each round,
waits (paused in process, or suspended for long reviews of deployed runs) and performs the steps the machine
asks for: re-segmenting through ``tasks.gpu_dispatch`` and reading an edited mask from storage.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import numpy as np
from prefect import get_run_logger, pause_flow_run, suspend_flow_run
from prefect.client.orchestration import get_client
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput, create_flow_run_input
from prefect.runtime import deployment, flow_run
from prefect.states import Running
from pydantic import Field, create_model

from sam3d_pipeline import backends, keys
from sam3d_pipeline.backends.sam3 import clickdecoder
from sam3d_pipeline.errors import InputError, ReviewTimeoutError
from sam3d_pipeline.images import LoadedImage, encode_jpeg, encode_png
from sam3d_pipeline.masks import mask_from_png, overlay
from sam3d_pipeline.review.machine import (
    Answer,
    Ask,
    ReadMask,
    Resegment,
    ReviewConfig,
    ReviewFailed,
    ReviewMachine,
    ReviewOutcome,
    Step,
    apply_review,
)
from sam3d_pipeline.review.persist import load_round, save_round
from sam3d_pipeline.review.policy import CONTEXT_KEY, ReviewContext, needs_review, review_markdown
from sam3d_pipeline.run import finish, pipeline
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import Storage
from sam3d_pipeline.types import PointList, Segmentation, bounded_point_model
from sam3d_pipeline.video.outputs import view_overlay_png
from sam3d_pipeline.video.views import FrameView, VideoRun
from tasks import gpu_dispatch

__all__ = ["ReviewConfig", "ReviewInput", "ReviewOutcome", "bounded_input", "decoder_files", "review_loop",
           "round_request", "segment_or_reuse", "should_suspend"]


FRAME_HELP = ("Video: the source frame index to reconstruct from, one of the frames shown (approve; default the "
              "shown one).")


class ReviewInput(RunInput):
    """What a person answers to a paused run (the Prefect UI shows this as a form)."""

    action: Literal["approve", "reject", "reprompt"] = "approve"
    instance_index: int | None = Field(None, description="Instance to reconstruct (approve).")
    prompt: str | None = Field(None, min_length=1, max_length=500, description="New text prompt (reprompt).")
    boxes: list[tuple[float, float, float, float]] = Field(default_factory=list, description="xyxy pixels.")
    points: PointList = Field(default_factory=list, description="Clicks: x, y, label 1/0 (at most 64).")
    score_threshold: float | None = Field(None, ge=0.0, le=1.0, description="New score threshold (reprompt).")
    mask_key: str | None = Field(
        None, pattern=keys.REVIEW_UPLOAD_PATTERN, description="A mask PNG uploaded by the review page (approve)."
    )
    comment: str | None = Field(None, max_length=1000)
    frame: int | None = Field(None, ge=0, description=FRAME_HELP)


def bounded_input(n_instances: int, width: int, height: int, default_index: int | None = None,
                  frames: Sequence[int] = ()) -> type[ReviewInput]:
    """``ReviewInput`` whose JSON schema carries this round's bounds (validated by the Prefect server).

    ``frames``: a video's source frame indices offered this round, the only values ``frame`` takes (an enum in
    the schema); a photo offers none and ``frame`` must be null. A video's ``instance_index`` has no default (an
    answer picking another frame leaves it unset).

    Defaults are set here rather than with ``with_initial_data(**kwargs)``, which would rebuild the fields
    from their bare annotations and drop the bounds.
    """
    x = Annotated[float, Field(ge=0, le=width)]
    y = Annotated[float, Field(ge=0, le=height)]
    point = bounded_point_model(width, height)
    frame = Literal[tuple(int(f) for f in frames)] | None if frames else None
    return create_model(
        "ReviewInput",
        __base__=ReviewInput,
        instance_index=(Annotated[int | None, Field(ge=0, le=n_instances - 1)], None if frames else default_index),
        boxes=(list[tuple[x, y, x, y]], []),
        points=(list[point], []),
        frame=(Annotated[frame, Field(description=FRAME_HELP)], None),
    )


def _publish_frames(storage: Storage, prefix: str, video: VideoRun | None,
                    views: list[FrameView]) -> list[dict[str, Any]]:
    """Write a video's offered frames (small, with their tracked masks); what ``ReviewContext.frames`` lists."""
    run_keys, frames = keys.RunKeys(prefix), []
    for view in views:
        key = run_keys.review_frame(view.index)
        storage.write_bytes(key, view_overlay_png(video, view), content_type="image/png")
        frames.append({"index": view.index, "time_s": round(view.time_s, 3), "score": round(view.score, 4),
                       "view_score": round(view.view_score, 4), "overlay_key": key,
                       "chosen": view == video.chosen})
    return frames


def _publish_round(storage: Storage, prefix: str, round_number: int, image: LoadedImage, seg: Segmentation,
                   selected: int | None, options: pipeline.RunOptions, label: str) -> str:
    """Write what the review page and the pause description show; return the overlay's key. The files are
    independent of each other: they are encoded and written side by side, and a person waits for the last one."""
    run_keys = keys.RunKeys(prefix)
    mask = seg.instances[selected].mask if selected is not None else None
    key = run_keys.review_overlay(round_number)
    steps = [lambda: storage.write_bytes(key, encode_png(overlay(image.rgb, mask, label=label)),
                                         content_type="image/png"),
             lambda: save_round(storage, prefix, round_number, seg, round_request(options))]
    if round_number == 1:  # the EXIF-corrected photo, on the same pixel grid as every mask
        steps.append(lambda: storage.write_bytes(run_keys.review_image, encode_jpeg(image.rgb),
                                                 content_type="image/jpeg"))
    with ThreadPoolExecutor(max_workers=len(steps), thread_name_prefix="sam3d-review-publish") as pool:
        done = [pool.submit(step) for step in steps]
    for future in done:
        future.result()  # a failed write raises here
    return key


def round_request(options: pipeline.RunOptions) -> dict[str, Any]:
    """What a round's segmentation was made for (a persisted round is reused only for the same request)."""
    return {"prompt": options.prompt, **options.selection()}


def segment_or_reuse(image: LoadedImage, options: pipeline.RunOptions, run_plan: pipeline.RunPlan,
                     settings: Settings, storage: Storage, round_number: int) -> Segmentation:
    """Segment, unless this round's segmentation was persisted before a suspension (the run re-executes)."""
    info = backends.describe("segmenter", run_plan.segmenter.name, settings)  # no model in this process
    reused = load_round(storage, run_plan.prefix, round_number, round_request(options), info,
                        (image.width, image.height))
    if reused is not None:
        get_run_logger().info("review round %d: reusing the persisted segmentation", round_number)
        return reused
    return gpu_dispatch.segment(image, options, run_plan, settings, storage.root, review_assets=round_number == 1)


def decoder_files(storage: Storage, run_plan: pipeline.RunPlan, settings: Settings) -> dict[str, str]:
    """The in-browser click decoder's files for this run, when its segmenter stored them."""
    files = {"embeddings_key": clickdecoder.embeddings_key(run_plan.prefix),
             "decoder_key": clickdecoder.decoder_key(run_plan.segmenter_info["version"],
                                                     settings.review_decoder_weights)}
    return files if all(storage.exists(k) for k in files.values()) else {}


def should_suspend(timeout_s: float, settings: Settings) -> bool:
    """Suspend (leave the infrastructure) for long reviews of deployed runs; pause in process otherwise."""
    if timeout_s <= settings.review_suspend_after_s:
        return False
    if deployment.get_id() is None:
        get_run_logger().info("a long review would suspend, but this run has no deployment: pausing in process")
        return False
    return True


def _used_pause_keys() -> set[str]:
    """The pause keys this flow run has used (kept by Prefect across a suspension and its re-execution)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return set(context.flow_run.empirical_policy.pause_keys or ()) if context and context.flow_run else set()


def _save_context(key: str, context: ReviewContext) -> None:
    """Store the round's context for the review page; a re-executed (resumed) run finds it already there."""
    import httpx

    try:
        create_flow_run_input(key=key, value=context.model_dump(mode="json"))
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code != 409:
            raise


def _leave_expired_pause(message: str) -> None:
    """A pause that timed out leaves the run Paused, and Prefect would end it with a generic message.

    Move it back to Running so the run can complete (policy approved) or fail with our reason.
    """
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.get_id(), Running(message=message), force=True)


class _ReviewRun:
    """Performs the machine's steps for one run: publish and wait, re-segment, read an edited mask."""

    def __init__(self, machine: ReviewMachine, image: LoadedImage, run_plan: pipeline.RunPlan, storage: Storage,
                 settings: Settings, page_url: str | None, video: VideoRun | None = None,
                 views: list[FrameView] | None = None):
        self.machine, self.image, self.run_plan = machine, image, run_plan
        self.video, self.views = video, views or []
        self.storage, self.settings, self.page_url = storage, settings, page_url
        self.started = time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def ask(self, step: Ask) -> Step:
        """Publish the round, pause (or suspend) until a person answers or the review times out."""
        logger, machine, image, n = get_run_logger(), self.machine, self.image, step.round_number
        seg, selected, options = machine.seg, machine.selected, machine.options
        label = f"review round {n}: segmenter {finish.backend_label(self.run_plan.segmenter_info)}"
        overlay_key = _publish_round(self.storage, self.run_plan.prefix, n, image, seg, selected, options, label)
        frames = _publish_frames(self.storage, self.run_plan.prefix, self.video,
                                 [v for v in self.views if v.index in machine.frames])
        instances = [inst.summary(i) for i, inst in enumerate(seg.instances)]
        description = review_markdown(
            input_uri=image.source, prompt=options.prompt, instances=instances, selected=selected,
            overlay_link=self.storage.link(overlay_key),
            page_link=f"{self.page_url.rstrip('/')}/runs/{flow_run.get_id()}" if self.page_url else None,
            round_number=n, reason=machine.config.reason, note=step.note, frames=frames,
        )
        _save_context(f"{CONTEXT_KEY}-r{n}", ReviewContext(
            output_root=self.storage.root, prefix=self.run_plan.prefix, round=n, input_uri=image.source,
            prompt=options.prompt, width=image.width, height=image.height, instances=instances, selected=selected,
            segmenter=self.run_plan.segmenter_info["name"], frames=frames,
            **decoder_files(self.storage, self.run_plan, self.settings),
        ))
        form = bounded_input(len(seg.instances), image.width, image.height, selected,
                             machine.frames).with_initial_data(description=description)
        remaining_s = machine.wait_s(self.elapsed_s())
        suspend = should_suspend(machine.config.timeout_s, self.settings)
        logger.info("waiting for review (round %d, up to %.0f s, %s)", n, remaining_s,
                    f"paused in process for up to {self.settings.review_suspend_after_s:.0f} s, then suspended "
                    "(the run leaves its infrastructure)" if suspend else "paused in process")
        try:
            answer = self._wait(form, n, remaining_s, suspend)
        except FlowPauseTimeout:
            after = machine.timeout(self.elapsed_s())
            logger.warning(machine.record["detail"])
            _leave_expired_pause(machine.record["detail"])
            return after
        logger.info("review round %d: %s", n, answer.action)
        form_answer = answer.model_dump(mode="json", exclude={"metadata"})
        return machine.answer(Answer.from_form(form_answer), self.elapsed_s())

    def _wait(self, form: type[ReviewInput], n: int, remaining_s: float, suspend: bool) -> ReviewInput:
        """Wait for round ``n``'s answer: paused in process (an answer resumes the run within
        ``review_poll_interval_s``); a long review of a deployed run pauses for ``review_suspend_after_s`` first and
        then suspends for the rest. A run re-executed after a suspension passes its earlier rounds at once:
        Prefect hands back the answer stored under each round's pause key."""
        live_key, parked_key = f"review-round-{n}", f"review-round-{n}-suspended"
        used = _used_pause_keys()
        if parked_key in used:
            return suspend_flow_run(wait_for_input=form, timeout=int(np.ceil(remaining_s)), key=parked_key)
        live_s = min(remaining_s, self.settings.review_suspend_after_s) if suspend and live_key not in used \
            else remaining_s
        try:
            return pause_flow_run(wait_for_input=form, timeout=int(np.ceil(live_s)),
                                  poll_interval=self.settings.review_poll_interval_s, key=live_key)
        except FlowPauseTimeout:
            if live_s >= remaining_s:
                raise
        _leave_expired_pause(f"no review answer within {live_s:.0f} s: the run suspends until one comes")
        return suspend_flow_run(wait_for_input=form, timeout=int(np.ceil(remaining_s - live_s)), key=parked_key)

    def resegment(self, step: Resegment) -> Ask:
        """Segment for the re-prompt (through ``gpu_dispatch``, or reuse a persisted round)."""
        settings = self.settings if step.score_threshold is None else self.settings.model_copy(
            update={"score_threshold": step.score_threshold})
        try:
            seg = segment_or_reuse(self.image, step.options, self.run_plan, settings, self.storage, step.round_number)
        except InputError as exc:
            return self.machine.segment_refused(exc)
        return self.machine.segmented(seg)

    def read_mask(self, step: ReadMask) -> Step:
        """Read the reviewer's uploaded mask; one that is missing or does not fit the photo is refused."""
        try:
            mask = mask_from_png(self.storage.read_bytes(keys.RunKeys(self.run_plan.prefix).file(step.key)),
                                 size=(self.image.width, self.image.height), source=step.key)
        except InputError as exc:
            return self.machine.mask_refused(exc)
        return self.machine.mask_read(mask)


def review_run(record: finish.RunRecord, mode: str, auto_approve_score: float, timeout_s: float, on_timeout: str,
               storage: Storage, settings: Settings) -> None:
    """Decide whether a person reviews this run's mask (``needs_review``) and, when so, wait for the answer and
    apply it to ``record`` (approved, refined, re-segmented, rejected, or for a video another frame picked)."""
    wait, why = needs_review(mode, record.seg.instances, auto_approve_score)
    record.review = {"mode": mode, "reason": why}
    if not wait:
        return
    with finish.timed(record, "review_wait"):
        apply_review(record, review_loop(
            config=ReviewConfig(mode, why, auto_approve_score, timeout_s, on_timeout), image=record.image,
            options=record.options, run_plan=record.run_plan, seg=record.seg, selected=record.selected,
            storage=storage, settings=settings, page_url=settings.review_page_url, video=record.video))


def review_loop(
    *,
    config: ReviewConfig,
    image: LoadedImage,
    options: pipeline.RunOptions,
    run_plan: pipeline.RunPlan,
    seg: Segmentation,
    selected: int | None,
    storage: Storage,
    settings: Settings,
    page_url: str | None = None,
    video: VideoRun | None = None,
) -> ReviewOutcome:
    """Pause until a person decides; re-segment and pause again on re-prompt. For a ``video`` (``image`` is its
    chosen frame), each round also offers its ``review_video_frames`` best views to pick from.

    Raises:
        ReviewTimeoutError: the review timed out and the policy says fail.
    """
    views = video.review_views(settings.review_video_frames) if video is not None and video.chosen else []
    machine = ReviewMachine(config, seg=seg, selected=selected, options=options,
                            frames=tuple(v.index for v in views),
                            shown_frame=video.chosen.index if views else None)
    run = _ReviewRun(machine, image, run_plan, storage, settings, page_url, video, views)
    step: Step = machine.start()
    while True:
        match step:
            case Ask():
                step = run.ask(step)
            case Resegment():
                step = run.resegment(step)
            case ReadMask():
                step = run.read_mask(step)
            case ReviewFailed(reason=reason):
                raise ReviewTimeoutError(reason)
            case ReviewOutcome():
                return step
