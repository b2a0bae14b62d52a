"""What the review routes share: the run under review, its storage, serving one of its files, and the settings
(from ``app.state``, set by ``web.app.create_app``)."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import Depends, HTTPException, Request
from fastapi.responses import RedirectResponse, Response

from sam3d_pipeline.backends.sam3.embeddings import GZIP_MAGIC
from sam3d_pipeline.errors import InputNotFoundError
from sam3d_pipeline.review import prefect_api
from sam3d_pipeline.review.policy import ReviewContext
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import S3Storage, Storage, open_storage

PRESIGNED_TTL_S = 300


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


AppSettings = Annotated[Settings, Depends(app_settings)]


def review_context(run_id: UUID) -> ReviewContext:
    """The paused run's review context (404 when the run is not awaiting review)."""
    try:
        return prefect_api.review_context(run_id)
    except prefect_api.RunNotReviewable as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None


def storage_for(ctx: ReviewContext, settings: Settings) -> Storage:
    return open_storage(ctx.output_root, settings)


def serve_key(storage: Storage, key: str, media_type: str, cache: str = "no-store") -> Response:
    """A file of the run: a short-lived presigned URL on S3 (no bytes through this server), else its bytes."""
    if isinstance(storage, S3Storage):
        return RedirectResponse(storage.link(key, expires_s=PRESIGNED_TTL_S))
    try:
        data = storage.read_bytes(key)
    except InputNotFoundError:
        raise HTTPException(status_code=404, detail=f"{key.rsplit('/', 1)[-1]} not found for this run") from None
    headers = {"Cache-Control": cache}
    if data[:2] == GZIP_MAGIC and media_type == "application/octet-stream":  # stored gzip-encoded
        headers["Content-Encoding"] = "gzip"
    return Response(data, media_type=media_type, headers=headers)
