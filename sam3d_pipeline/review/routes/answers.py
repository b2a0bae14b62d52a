"""The reviewer's work on a paused run: refine a mask on the server, then approve, reject or reprompt (each of
these three resumes the run with the answer)."""

from __future__ import annotations

import base64
import uuid
from uuid import UUID

import numpy as np
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from sam3d_pipeline import backends
from sam3d_pipeline.errors import ImageTooLargeError, InputError, PipelineError
from sam3d_pipeline.images import load_image
from sam3d_pipeline.keys import RunKeys
from sam3d_pipeline.masks import mask_from_png, mask_to_png
from sam3d_pipeline.review import prefect_api
from sam3d_pipeline.review.policy import ReviewContext
from sam3d_pipeline.review.routes.common import AppSettings, review_context, storage_for
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import Box, PointList, SegmentRequest

MAX_BODY_BYTES = 8 * 1024 * 1024  # a review call's body (an uploaded mask as base64)
REFINE_WORK_SIZE_PX = 360

router = APIRouter(prefix="/api/runs/{run_id}")


class RefineIn(BaseModel):
    points: PointList = Field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    instance_index: int | None = Field(None, ge=0, description="Candidate mask being refined.")


class ApproveIn(BaseModel):
    instance_index: int | None = Field(None, ge=0)
    mask_png_base64: str | None = Field(None, max_length=MAX_BODY_BYTES)
    frame: int | None = Field(None, ge=0, description="Video: the offered frame (source index) to reconstruct from.")


class RejectIn(BaseModel):
    comment: str | None = Field(None, max_length=1000)


class RepromptIn(BaseModel):
    prompt: str | None = Field(None, min_length=1, max_length=500)
    boxes: list[tuple[float, float, float, float]] = Field(default_factory=list, max_length=16)
    points: PointList = Field(default_factory=list)
    score_threshold: float | None = Field(None, ge=0, le=1)


def resume(run_id: UUID, answer: dict) -> dict:
    """Resume the paused run with the reviewer's answer."""
    try:
        prefect_api.resume(run_id, answer)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    except prefect_api.RunNotReviewable as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    return {"resumed": True, "answer": answer}


def refine_request(ctx: ReviewContext, body: RefineIn, settings: Settings) -> SegmentRequest:
    """The clicks and box, checked against the photo, with the candidate being refined as the prior mask."""
    for p in body.points:
        if not (0 <= p.x < ctx.width and 0 <= p.y < ctx.height):
            raise HTTPException(status_code=422, detail=f"point ({p.x}, {p.y}) is outside the image")
    if not body.points and body.box is None:
        raise HTTPException(status_code=422, detail="give at least one click or a box")
    boxes = ()
    if body.box is not None:
        x0, y0, x1, y1 = body.box
        if not (x1 > x0 and y1 > y0):
            raise HTTPException(status_code=422, detail="box needs x0 < x1 and y0 < y1")
        boxes = (Box(x0, y0, x1, y1),)
    prior = None
    if body.instance_index is not None and body.instance_index < len(ctx.instances) and not boxes:
        key = RunKeys(ctx.prefix).review_round(ctx.round, f"mask-{body.instance_index}.png")
        prior = mask_from_png(storage_for(ctx, settings).read_bytes(key), size=(ctx.width, ctx.height),
                              max_pixels=settings.max_pixels)
    return SegmentRequest(prompt=ctx.prompt, boxes=boxes, prior_mask=prior, points=tuple(body.points))


@router.post("/refine")
def refine(run_id: UUID, body: RefineIn, settings: AppSettings) -> dict:
    """Server-side refinement with the lite segmenter (used when no in-browser decoder exists)."""
    ctx = review_context(run_id)
    request = refine_request(ctx, body, settings)
    data = storage_for(ctx, settings).read_bytes(RunKeys(ctx.prefix).review_image)
    photo = load_image(data, source="review image", max_pixels=settings.max_pixels)
    # Interactive refinement works on a smaller copy (faster clicks); masks come back at full size.
    interactive = settings.model_copy(
        update={"lite_work_size_px": min(settings.lite_work_size_px, REFINE_WORK_SIZE_PX)})
    seg = backends.get_segmenter("lite", interactive).segment(photo.rgb, request)
    if not seg.instances:
        return {"mask_png_base64": None, "score": 0.0, "backend": "lite", "message": "no region found"}
    best = seg.instances[0]
    return {
        "mask_png_base64": base64.b64encode(mask_to_png(best.mask)).decode(),
        "score": round(best.score, 4),
        "backend": "lite",
        "message": "refined on the server with the lite segmenter",
    }


def store_mask(ctx: ReviewContext, mask_png_base64: str, settings: Settings) -> tuple[str, int]:
    """Check the uploaded mask (its size is read from the PNG header before anything is decompressed) and store
    it with the run; its key (relative to the run) and its pixel count."""
    try:
        png = base64.b64decode(mask_png_base64, validate=True)
        mask = mask_from_png(png, size=(ctx.width, ctx.height), source="uploaded mask", max_pixels=settings.max_pixels)
    except ImageTooLargeError as exc:
        raise HTTPException(status_code=413, detail=str(exc)) from None
    except (ValueError, InputError) as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    key = RunKeys.review_upload_name(uuid.uuid4().hex[:12])
    try:
        storage_for(ctx, settings).write_bytes(RunKeys(ctx.prefix).file(key), mask_to_png(mask),
                                               content_type="image/png")
    except PipelineError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from None
    return key, int(np.count_nonzero(mask))


@router.post("/approve")
def approve(run_id: UUID, body: ApproveIn, settings: AppSettings) -> dict:
    ctx = review_context(run_id)
    answer: dict = {"action": "approve"}
    if body.instance_index is not None:
        answer["instance_index"] = body.instance_index
    if body.frame is not None:  # the run's input schema accepts only the frames this round offers
        answer["frame"] = body.frame
    pixels = None
    if body.mask_png_base64:
        answer["mask_key"], pixels = store_mask(ctx, body.mask_png_base64, settings)
    return resume(run_id, answer) | {"mask_pixels": pixels}


@router.post("/reject")
def reject(run_id: UUID, body: RejectIn) -> dict:
    review_context(run_id)
    return resume(run_id, {"action": "reject"} | ({"comment": body.comment} if body.comment else {}))


@router.post("/reprompt")
def reprompt(run_id: UUID, body: RepromptIn) -> dict:
    review_context(run_id)
    answer = {"action": "reprompt"} | body.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    return resume(run_id, answer)
