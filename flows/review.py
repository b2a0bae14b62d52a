"""Pause ``image-to-3d`` for a person to approve, reject, re-prompt or refine the mask (typed ``RunInput``).

The pause happens in the orchestrating flow between segmentation and reconstruction, so no GPU is held while
a person decides. The input model is built per round with the image's and the instances' bounds, so the
Prefect server itself refuses an out-of-range instance or a box outside the image and the run keeps waiting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from prefect import get_run_logger, pause_flow_run, suspend_flow_run
from prefect.client.orchestration import get_client
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput, create_flow_run_input
from prefect.runtime import deployment, flow_run
from prefect.states import Running
from pydantic import Field, create_model

from sam3d_pipeline import backends, clickdecoder, pipeline
from sam3d_pipeline.errors import InputError, ReviewTimeoutError
from sam3d_pipeline.images import LoadedImage, encode_jpeg, encode_png
from sam3d_pipeline.masks import box_from_mask, mask_from_png, overlay, select_instance
from sam3d_pipeline.review.persist import load_round, save_round
from sam3d_pipeline.review.policy import CONTEXT_KEY, ReviewContext, TimeoutPolicy, review_markdown, timeout_action
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import Storage
from sam3d_pipeline.types import Point, Segmentation, bounded_point_model
from tasks import gpu_dispatch as stages

MASK_KEY_PATTERN = r"^review/[A-Za-z0-9._-]{1,100}\.png$"


class ReviewInput(RunInput):
    """What a person answers to a paused run (the Prefect UI shows this as a form)."""

    action: Literal["approve", "reject", "reprompt"] = "approve"
    instance_index: int | None = Field(None, description="Instance to reconstruct (approve).")
    prompt: str | None = Field(None, min_length=1, max_length=500, description="New text prompt (reprompt).")
    boxes: list[tuple[float, float, float, float]] = Field(default_factory=list, description="xyxy pixels.")
    points: list[Point] = Field(default_factory=list, description="Clicks: x, y, label 1/0.")
    score_threshold: float | None = Field(None, ge=0.0, le=1.0, description="New score threshold (reprompt).")
    mask_key: str | None = Field(
        None, pattern=MASK_KEY_PATTERN, description="A mask PNG uploaded by the review page (approve)."
    )
    comment: str | None = Field(None, max_length=1000)


def bounded_input(n_instances: int, width: int, height: int, default_index: int | None = None) -> type[ReviewInput]:
    """``ReviewInput`` whose JSON schema carries this round's bounds (validated by the Prefect server).

    Defaults are set here rather than with ``with_initial_data(**kwargs)``, which would rebuild the fields
    from their bare annotations and drop the bounds.
    """
    x = Annotated[float, Field(ge=0, le=width)]
    y = Annotated[float, Field(ge=0, le=height)]
    point = bounded_point_model(width, height)
    return create_model(
        "ReviewInput",
        __base__=ReviewInput,
        instance_index=(Annotated[int | None, Field(ge=0, le=n_instances - 1)], default_index),
        boxes=(list[tuple[x, y, x, y]], []),
        points=(list[point], []),
    )


@dataclass
class ReviewConfig:
    mode: str
    reason: str
    auto_approve_score: float
    timeout_s: float
    on_timeout: TimeoutPolicy


@dataclass
class ReviewOutcome:
    """What the review decided: status ``approved`` or ``rejected``, and the (possibly new) masks."""

    status: str
    seg: Segmentation
    selected: int | None
    options: pipeline.RunOptions
    edited_mask: np.ndarray | None = None
    record: dict[str, Any] = field(default_factory=dict)


def _publish_round(storage: Storage, prefix: str, round_number: int, image: LoadedImage, seg: Segmentation,
                   selected: int | None, options: pipeline.RunOptions, label: str) -> str:
    """Write what the review page and the pause description show; return the overlay's key."""
    mask = seg.instances[selected].mask if selected is not None else None
    if round_number == 1:  # the EXIF-corrected photo, on the same pixel grid as every mask
        storage.write_bytes(f"{prefix}/review/image.jpg", encode_jpeg(image.rgb), content_type="image/jpeg")
    key = f"{prefix}/review/overlay-r{round_number}.png"
    storage.write_bytes(key, encode_png(overlay(image.rgb, mask, label=label)), content_type="image/png")
    save_round(storage, prefix, round_number, seg, round_request(options))
    return key


def round_request(options: pipeline.RunOptions) -> dict[str, Any]:
    """What a round's segmentation was made for (a persisted round is reused only for the same request)."""
    return {"prompt": options.prompt, **options.selection()}


def segment_or_reuse(image: LoadedImage, options: pipeline.RunOptions, run_plan: pipeline.RunPlan,
                     settings: Settings, storage: Storage, round_number: int) -> Segmentation:
    """Segment, unless this round's segmentation was persisted before a suspension (the run re-executes)."""
    info = backends.get_segmenter(run_plan.segmenter.name, settings).info()
    reused = load_round(storage, run_plan.prefix, round_number, round_request(options), info,
                        (image.width, image.height))
    if reused is not None:
        get_run_logger().info("review round %d: reusing the persisted segmentation", round_number)
        return reused
    return stages.segment(image, options, run_plan, settings, storage.root, review_assets=round_number == 1)


def decoder_files(storage: Storage, run_plan: pipeline.RunPlan, settings: Settings) -> dict[str, str]:
    """The in-browser click decoder's files for this run, when its segmenter stored them."""
    keys = {"embeddings_key": clickdecoder.embeddings_key(run_plan.prefix),
            "decoder_key": clickdecoder.decoder_key(run_plan.segmenter_info["version"],
                                                    settings.review_decoder_weights)}
    return keys if all(storage.exists(k) for k in keys.values()) else {}


def should_suspend(timeout_s: float, settings: Settings) -> bool:
    """Suspend (leave the infrastructure) for long reviews of deployed runs; pause in process otherwise."""
    if timeout_s <= settings.review_suspend_after_s:
        return False
    if deployment.get_id() is None:
        get_run_logger().info("a long review would suspend, but this run has no deployment: pausing in process")
        return False
    return True


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
) -> ReviewOutcome:
    """Pause until a person decides; re-segment and pause again on re-prompt.

    Raises:
        ReviewTimeoutError: the review timed out and the policy says fail.
    """
    logger = get_run_logger()
    record: dict[str, Any] = {"mode": config.mode, "reason": config.reason, "on_timeout": config.on_timeout,
                              "timeout_s": config.timeout_s, "rounds": []}
    started = time.monotonic()
    note = None
    round_number = 0
    while True:
        round_number += 1
        label = f"review round {round_number}: segmenter {pipeline.backend_label(run_plan.segmenter_info)}"
        overlay_key = _publish_round(storage, run_plan.prefix, round_number, image, seg, selected, options, label)
        instances = [inst.summary(i) for i, inst in enumerate(seg.instances)]
        description = review_markdown(
            input_uri=image.source, prompt=options.prompt, instances=instances, selected=selected,
            overlay_link=storage.link(overlay_key),
            page_link=f"{page_url.rstrip('/')}/runs/{flow_run.get_id()}" if page_url else None,
            round_number=round_number, reason=config.reason, note=note,
        )
        model = bounded_input(len(seg.instances), image.width, image.height, selected)
        _save_context(
            f"{CONTEXT_KEY}-r{round_number}",
            ReviewContext(
                output_root=storage.root, prefix=run_plan.prefix, round=round_number, input_uri=image.source,
                prompt=options.prompt, width=image.width, height=image.height, instances=instances,
                selected=selected, segmenter=run_plan.segmenter_info["name"],
                **decoder_files(storage, run_plan, settings),
            ),
        )
        remaining = max(1.0, config.timeout_s - (time.monotonic() - started))
        suspend = should_suspend(config.timeout_s, settings)
        logger.info("waiting for review (round %d, up to %.0f s, %s)", round_number, remaining,
                    "suspended: the run leaves its infrastructure" if suspend else "paused in process")
        try:
            if suspend:
                answer = suspend_flow_run(
                    wait_for_input=model.with_initial_data(description=description),
                    timeout=int(np.ceil(config.timeout_s)),
                    key=f"review-round-{round_number}",
                )
            else:
                answer = pause_flow_run(
                    wait_for_input=model.with_initial_data(description=description),
                    timeout=int(np.ceil(remaining)),
                    poll_interval=settings.review_poll_interval_s,
                    key=f"review-round-{round_number}",
                )
        except FlowPauseTimeout:
            action, why = timeout_action(config.on_timeout, seg.instances, config.auto_approve_score)
            record["rounds"].append({"round": round_number, "action": f"timeout-{action}", "by": "policy"})
            record |= {"outcome": f"timeout-{action}", "detail": why,
                       "waited_s": round(time.monotonic() - started, 1)}
            logger.warning(why)
            _leave_expired_pause(why)
            if action == "fail" or selected is None:
                raise ReviewTimeoutError(why) from None
            return ReviewOutcome("approved", seg, selected, options, record=record)

        entry = {"round": round_number, "by": "person"} | answer.model_dump(
            mode="json", exclude_none=True, exclude={"metadata"}
        )
        record["rounds"].append(entry)
        logger.info("review round %d: %s", round_number, answer.action)
        if answer.action == "reject":
            record |= {"outcome": "rejected", "waited_s": round(time.monotonic() - started, 1)}
            return ReviewOutcome("rejected", seg, selected, options, record=record)
        if answer.action == "reprompt":
            updates: dict[str, Any] = {}
            if answer.prompt:
                updates["prompt"] = answer.prompt.strip()
            if answer.boxes:
                updates["boxes"] = [tuple(b) for b in answer.boxes]
            if answer.points:
                updates["points"] = [Point(**p.model_dump()) for p in answer.points]
            if not updates and answer.score_threshold is None:
                note = "re-prompt needs a new prompt, boxes, points or score_threshold; still waiting"
                continue
            options = options.model_copy(update=updates | {"instance_index": None})
            seg_settings = settings if answer.score_threshold is None else settings.model_copy(
                update={"score_threshold": answer.score_threshold})
            try:
                seg = segment_or_reuse(image, options, run_plan, seg_settings, storage, round_number + 1)
            except InputError as exc:
                note = f"re-prompt refused: {exc}; still waiting"
                continue
            selected = select_instance(seg.instances, None)
            note = f"re-segmented for prompt {options.prompt!r}: {len(seg.instances)} instance(s)"
            continue
        # approve
        if answer.mask_key:
            try:
                mask = mask_from_png(storage.read_bytes(f"{run_plan.prefix}/{answer.mask_key}"),
                                     size=(image.width, image.height), source=answer.mask_key)
            except InputError as exc:
                note = f"approval refused: {exc}; still waiting"
                continue
            base = answer.instance_index if answer.instance_index is not None else selected
            record |= {"outcome": "approved", "edited_mask": answer.mask_key,
                       "edited_mask_box": list(box_from_mask(mask)),
                       "waited_s": round(time.monotonic() - started, 1)}
            return ReviewOutcome("approved", seg, base, options, edited_mask=mask, record=record)
        chosen = answer.instance_index if answer.instance_index is not None else selected
        if chosen is None:
            note = "nothing to approve: no instance found; re-prompt or reject"
            continue
        record |= {"outcome": "approved", "waited_s": round(time.monotonic() - started, 1)}
        return ReviewOutcome("approved", seg, chosen, options, record=record)
