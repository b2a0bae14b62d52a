"""The paused runs (``/api/runs``), one run's review context, and its files: the photo, the candidate masks, a
video's frames to pick from, and, for a segmenter with a click decoder, the decoder and the photo's embeddings."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from sam3d_pipeline.keys import RunKeys
from sam3d_pipeline.review import prefect_api
from sam3d_pipeline.review.policy import ReviewContext
from sam3d_pipeline.review.routes.common import (
    PRESIGNED_TTL_S,
    AppSettings,
    review_context,
    serve_key,
    storage_for,
)
from sam3d_pipeline.storage import S3Storage

router = APIRouter(prefix="/api/runs")


def decoder_fields(ctx: ReviewContext, url) -> dict[str, Any]:
    """How the page refines clicks: in the browser with the segmenter's click decoder, or on the server."""
    if ctx.embeddings_key and ctx.decoder_key:
        return {
            "decoder": "onnx-web",
            "decoder_label": f"clicks are decoded in this browser by {ctx.segmenter}'s click decoder "
            "(onnxruntime-web); no server round trip per click",
            "decoder_url": url("decoder", ctx.decoder_key),
            "decoder_cache_key": ctx.decoder_key,
            "embeddings_url": url("embeddings", ctx.embeddings_key),
        }
    return {
        "decoder": "lite-server",
        "decoder_label": "clicks are refined on the server with the lite segmenter (GrabCut); "
        "no in-browser decoder for this backend",
    }


def decoder_file(ctx: ReviewContext, key: str | None, what: str) -> str:
    if not key:
        raise HTTPException(status_code=404, detail=f"no {what} for this run: segmenter {ctx.segmenter} "
                            "has no click decoder")
    return key


@router.get("")
def runs() -> list[dict]:
    return prefect_api.list_paused_runs()


@router.get("/{run_id}")
def run(run_id: UUID, settings: AppSettings) -> dict:
    """The run's review context, with the URLs of its files: 5-minute presigned URLs when storage is S3
    (the browser fetches them directly, without the review token), else this server's routes."""
    ctx = review_context(run_id)
    storage = storage_for(ctx, settings)
    presign = isinstance(storage, S3Storage)

    def url(route: str, key: str) -> str:
        return storage.link(key, expires_s=PRESIGNED_TTL_S) if presign else f"/api/runs/{run_id}/{route}"

    review = f"{ctx.prefix}/review"
    files = {
        "image": url("image", f"{review}/image.jpg"),
        "masks": [url(f"masks/{i}", f"{review}/r{ctx.round}-mask-{i}.png") for i in range(len(ctx.instances))],
        "frames": [url(f"frames/{f['index']}", RunKeys(ctx.prefix).review_frame(f["index"])) for f in ctx.frames],
    }
    return ctx.model_dump() | {"id": str(run_id), "files": files} | decoder_fields(ctx, url)


@router.get("/{run_id}/embeddings")
def run_embeddings(run_id: UUID, settings: AppSettings) -> Response:
    ctx = review_context(run_id)
    key = decoder_file(ctx, ctx.embeddings_key, "embeddings")
    return serve_key(storage_for(ctx, settings), key, "application/octet-stream")


@router.get("/{run_id}/decoder")
def run_decoder(run_id: UUID, settings: AppSettings) -> Response:
    """The ONNX click decoder; the page keeps it in its cache under ``decoder_cache_key`` (one per model)."""
    ctx = review_context(run_id)
    key = decoder_file(ctx, ctx.decoder_key, "click decoder")
    return serve_key(storage_for(ctx, settings), key, "application/octet-stream", cache="private, max-age=86400")


@router.get("/{run_id}/image")
def image(run_id: UUID, settings: AppSettings) -> Response:
    ctx = review_context(run_id)
    return serve_key(storage_for(ctx, settings), RunKeys(ctx.prefix).review_image, "image/jpeg")


@router.get("/{run_id}/masks/{index}")
def candidate_mask(run_id: UUID, index: int, settings: AppSettings) -> Response:
    ctx = review_context(run_id)
    if not 0 <= index < len(ctx.instances):
        raise HTTPException(status_code=404, detail=f"instance {index} out of range ({len(ctx.instances)})")
    return serve_key(storage_for(ctx, settings), RunKeys(ctx.prefix).review_round(ctx.round, f"mask-{index}.png"),
                     "image/png")


@router.get("/{run_id}/frames/{index}")
def frame(run_id: UUID, index: int, settings: AppSettings) -> Response:
    """A video's tracked frame ``index`` (source index) with its mask, small: only a frame this round offers."""
    ctx = review_context(run_id)
    if index not in {f["index"] for f in ctx.frames}:
        raise HTTPException(status_code=404, detail=f"frame {index} is not offered in this round")
    return serve_key(storage_for(ctx, settings), RunKeys(ctx.prefix).review_frame(index), "image/png")
