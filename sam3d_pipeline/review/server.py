"""The review page's routes: list paused runs, show the photo and candidate masks, refine, approve or reject.

They are part of the one web server (``sam3d_pipeline.web.app``: studio, job API, review page), which adds them
with :func:`add_review_routes`. Every Prefect API call is in ``prefect_api``. The page is static (``static/``),
needs no build step, and talks to the JSON API below with a bearer token, which it reads from the URL
fragment (``/review#token=...``: never sent to a server, never in access logs). A token in the query string is
refused. When the Prefect API cannot be reached, API routes answer 503 with the reason.
"""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from uuid import UUID

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from sam3d_pipeline import backends
from sam3d_pipeline.backends.sam3.embeddings import GZIP_MAGIC
from sam3d_pipeline.errors import ImageTooLargeError, InputError, InputNotFoundError, PipelineError
from sam3d_pipeline.images import load_image
from sam3d_pipeline.keys import RunKeys
from sam3d_pipeline.masks import mask_from_png, mask_to_png
from sam3d_pipeline.review import prefect_api
from sam3d_pipeline.review.policy import ReviewContext
from sam3d_pipeline.settings import Settings, get_settings
from sam3d_pipeline.storage import S3Storage, open_storage
from sam3d_pipeline.types import Box, PointList, SegmentRequest

STATIC = Path(__file__).parent / "static"
# onnxruntime-web from npm (``make install`` runs ``npm ci`` in ``review/web``); served, never from a CDN.
ORT_DIST = Path(__file__).parent / "web" / "node_modules" / "onnxruntime-web" / "dist"
MAX_BODY_BYTES = 8 * 1024 * 1024  # a review call's body (an uploaded mask as base64)
PRESIGNED_TTL_S = 300
REFINE_WORK_SIZE_PX = 360


class RefineIn(BaseModel):
    points: PointList = Field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    instance_index: int | None = Field(None, ge=0, description="Candidate mask being refined.")


class ApproveIn(BaseModel):
    instance_index: int | None = Field(None, ge=0)
    mask_png_base64: str | None = Field(None, max_length=MAX_BODY_BYTES)


class RejectIn(BaseModel):
    comment: str | None = Field(None, max_length=1000)


class RepromptIn(BaseModel):
    prompt: str | None = Field(None, min_length=1, max_length=500)
    boxes: list[tuple[float, float, float, float]] = Field(default_factory=list, max_length=16)
    points: PointList = Field(default_factory=list)
    score_threshold: float | None = Field(None, ge=0, le=1)


def add_review_routes(app: FastAPI, auth: list, settings: Settings | None = None) -> None:
    """Add the review page (``/review``, ``/runs/{id}``), its API (``/api/runs/...``, each behind ``auth``) and
    its static files (``/static/...``) to ``app``."""
    s = settings or get_settings()

    def context(run_id: UUID) -> ReviewContext:
        try:
            return prefect_api.review_context(run_id)
        except prefect_api.RunNotReviewable as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    def storage_for(ctx: ReviewContext):
        return open_storage(ctx.output_root, s)

    def serve_key(ctx: ReviewContext, key: str, media_type: str, cache: str = "no-store") -> Response:
        storage = storage_for(ctx)
        if isinstance(storage, S3Storage):  # short-lived presigned URL, no bytes through this server
            return RedirectResponse(storage.link(key, expires_s=PRESIGNED_TTL_S))
        try:
            data = storage.read_bytes(key)
        except InputNotFoundError:
            raise HTTPException(status_code=404, detail=f"{key.rsplit('/', 1)[-1]} not found for this run") from None
        headers = {"Cache-Control": cache}
        if data[:2] == GZIP_MAGIC and media_type == "application/octet-stream":  # stored gzip-encoded
            headers["Content-Encoding"] = "gzip"
        return Response(data, media_type=media_type, headers=headers)

    def do_resume(run_id: UUID, answer: dict) -> dict:
        try:
            prefect_api.resume(run_id, answer)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        except prefect_api.RunNotReviewable as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        return {"resumed": True, "answer": answer}

    @app.get("/review", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/runs/{run_id}", include_in_schema=False)
    def run_page(run_id: UUID) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/runs", dependencies=auth)
    def runs() -> list[dict]:
        return prefect_api.list_paused_runs()

    @app.get("/api/runs/{run_id}", dependencies=auth)
    def run(run_id: UUID) -> dict:
        """The run's review context, with the URLs of its files: 5-minute presigned URLs when storage is S3
        (the browser fetches them directly, without the review token), else this server's routes."""
        ctx = context(run_id)
        storage = storage_for(ctx)
        presign = isinstance(storage, S3Storage)

        def url(route: str, key: str) -> str:
            return storage.link(key, expires_s=PRESIGNED_TTL_S) if presign else f"/api/runs/{run_id}/{route}"

        review = f"{ctx.prefix}/review"
        files = {
            "image": url("image", f"{review}/image.jpg"),
            "masks": [url(f"masks/{i}", f"{review}/r{ctx.round}-mask-{i}.png") for i in range(len(ctx.instances))],
        }
        if ctx.embeddings_key and ctx.decoder_key:
            decoder = {
                "decoder": "onnx-web",
                "decoder_label": f"clicks are decoded in this browser by {ctx.segmenter}'s click decoder "
                "(onnxruntime-web); no server round trip per click",
                "decoder_url": url("decoder", ctx.decoder_key),
                "decoder_cache_key": ctx.decoder_key,
                "embeddings_url": url("embeddings", ctx.embeddings_key),
            }
        else:
            decoder = {
                "decoder": "lite-server",
                "decoder_label": "clicks are refined on the server with the lite segmenter (GrabCut); "
                "no in-browser decoder for this backend",
            }
        return ctx.model_dump() | {"id": str(run_id), "files": files} | decoder

    def decoder_file(ctx: ReviewContext, key: str | None, what: str) -> str:
        if not key:
            raise HTTPException(status_code=404, detail=f"no {what} for this run: segmenter {ctx.segmenter} "
                                "has no click decoder")
        return key

    @app.get("/api/runs/{run_id}/embeddings", dependencies=auth)
    def run_embeddings(run_id: UUID) -> Response:
        ctx = context(run_id)
        return serve_key(ctx, decoder_file(ctx, ctx.embeddings_key, "embeddings"), "application/octet-stream")

    @app.get("/api/runs/{run_id}/decoder", dependencies=auth)
    def run_decoder(run_id: UUID) -> Response:
        """The ONNX click decoder; the page keeps it in its cache under ``decoder_cache_key`` (one per model)."""
        ctx = context(run_id)
        return serve_key(ctx, decoder_file(ctx, ctx.decoder_key, "click decoder"), "application/octet-stream",
                         cache="private, max-age=86400")

    @app.get("/api/runs/{run_id}/image", dependencies=auth)
    def image(run_id: UUID) -> Response:
        ctx = context(run_id)
        return serve_key(ctx, RunKeys(ctx.prefix).review_image, "image/jpeg")

    @app.get("/api/runs/{run_id}/masks/{index}", dependencies=auth)
    def candidate_mask(run_id: UUID, index: int) -> Response:
        ctx = context(run_id)
        if not 0 <= index < len(ctx.instances):
            raise HTTPException(status_code=404, detail=f"instance {index} out of range ({len(ctx.instances)})")
        return serve_key(ctx, RunKeys(ctx.prefix).review_round(ctx.round, f"mask-{index}.png"), "image/png")

    @app.post("/api/runs/{run_id}/refine", dependencies=auth)
    def refine(run_id: UUID, body: RefineIn) -> dict:
        """Server-side refinement with the lite segmenter (used when no in-browser decoder exists)."""
        ctx = context(run_id)
        for p in body.points:
            if not (0 <= p.x < ctx.width and 0 <= p.y < ctx.height):
                raise HTTPException(status_code=422, detail=f"point ({p.x}, {p.y}) is outside the image")
        if not body.points and body.box is None:
            raise HTTPException(status_code=422, detail="give at least one click or a box")
        run_keys = RunKeys(ctx.prefix)
        data = storage_for(ctx).read_bytes(run_keys.review_image)
        photo = load_image(data, source="review image", max_pixels=s.max_pixels)
        boxes = ()
        if body.box is not None:
            x0, y0, x1, y1 = body.box
            if not (x1 > x0 and y1 > y0):
                raise HTTPException(status_code=422, detail="box needs x0 < x1 and y0 < y1")
            boxes = (Box(x0, y0, x1, y1),)
        prior = None
        if body.instance_index is not None and body.instance_index < len(ctx.instances) and not boxes:
            prior = mask_from_png(
                storage_for(ctx).read_bytes(run_keys.review_round(ctx.round, f"mask-{body.instance_index}.png")),
                size=(ctx.width, ctx.height), max_pixels=s.max_pixels,
            )
        request = SegmentRequest(prompt=ctx.prompt, boxes=boxes, prior_mask=prior,
                                 points=tuple(body.points))
        # Interactive refinement works on a smaller copy (faster clicks); masks come back at full size.
        interactive = s.model_copy(update={"lite_work_size_px": min(s.lite_work_size_px, REFINE_WORK_SIZE_PX)})
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

    @app.post("/api/runs/{run_id}/approve", dependencies=auth)
    def approve(run_id: UUID, body: ApproveIn) -> dict:
        ctx = context(run_id)
        answer: dict = {"action": "approve"}
        if body.instance_index is not None:
            answer["instance_index"] = body.instance_index
        if body.mask_png_base64:
            # The size is read from the PNG header and checked before anything is decompressed.
            try:
                png = base64.b64decode(body.mask_png_base64, validate=True)
                mask = mask_from_png(png, size=(ctx.width, ctx.height), source="uploaded mask",
                                     max_pixels=s.max_pixels)
            except ImageTooLargeError as exc:
                raise HTTPException(status_code=413, detail=str(exc)) from None
            except (ValueError, InputError) as exc:
                raise HTTPException(status_code=422, detail=str(exc)) from None
            key = RunKeys.review_upload_name(uuid.uuid4().hex[:12])
            try:
                storage_for(ctx).write_bytes(RunKeys(ctx.prefix).file(key), mask_to_png(mask), content_type="image/png")
            except PipelineError as exc:
                raise HTTPException(status_code=503, detail=str(exc)) from None
            answer["mask_key"] = key
            answer["mask_pixels"] = int(np.count_nonzero(mask))
        return do_resume(run_id, {k: v for k, v in answer.items() if k != "mask_pixels"}) | {
            "mask_pixels": answer.get("mask_pixels")
        }

    @app.post("/api/runs/{run_id}/reject", dependencies=auth)
    def reject(run_id: UUID, body: RejectIn) -> dict:
        context(run_id)
        return do_resume(run_id, {"action": "reject"} | ({"comment": body.comment} if body.comment else {}))

    @app.post("/api/runs/{run_id}/reprompt", dependencies=auth)
    def reprompt(run_id: UUID, body: RepromptIn) -> dict:
        context(run_id)
        answer = {"action": "reprompt"} | body.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
        return do_resume(run_id, answer)

    if ORT_DIST.is_dir():
        app.mount("/static/ort", StaticFiles(directory=ORT_DIST), name="ort")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
