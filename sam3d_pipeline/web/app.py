"""The one web server (``sam3d-pipeline web``): the studio page, the job API (``/v1/jobs``) and the review page.

Routes are in this file; the work behind the job API is ``service.JobService`` (Prefect calls in
``prefect_jobs``, decisions in ``jobs`` and ``webhooks``); the review page's routes are
``review.server.add_review_routes``. Pages:

- ``/`` and ``/jobs/{id}``: the studio (``static/studio/index.html``; it reads the job id from the path), its
  files under ``/studio/``, and ``<model-viewer>`` from npm under ``/vendor/model-viewer/`` (no CDN);
- ``/review`` and ``/runs/{id}``: the review page (the list of paused runs, one run), files under ``/static/``.

Every ``/v1`` and ``/api`` call needs ``Authorization: Bearer <token>``; the pages read the token from the URL
fragment (``#token=...``). OpenAPI at ``/openapi.json``, interactive docs at ``/docs``. When a webhook secret is
set, a background thread delivers the webhooks of jobs that ended (``webhooks.WebhookDeliverer``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile

from sam3d_pipeline import __version__, jsonsafe
from sam3d_pipeline.errors import ImageTooLargeError, InputError, PipelineError, StorageAccessError, TransientError
from sam3d_pipeline.keys import content_type
from sam3d_pipeline.review import prefect_api
from sam3d_pipeline.review.server import MAX_BODY_BYTES, add_review_routes
from sam3d_pipeline.settings import Settings, get_settings
from sam3d_pipeline.web import jobs, uploads
from sam3d_pipeline.web.auth import QUERY_TOKEN_REFUSED, REALM, bearer
from sam3d_pipeline.web.prefect_jobs import DeploymentMissing
from sam3d_pipeline.web.service import JobConflict, JobEnded, JobNotFound, JobService

STUDIO = Path(__file__).parent / "static" / "studio"
# @google/model-viewer from npm (``make install`` runs ``npm ci`` in ``gallery/``); served, never from a CDN.
MODEL_VIEWER_DIST = Path(__file__).resolve().parents[1] / "gallery" / "node_modules" / "@google/model-viewer/dist"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
FORM_OVERHEAD_BYTES = 1024 * 1024  # room for the form fields and multipart boundaries around an upload
SUBMIT_PATH = "/v1/jobs"

log = logging.getLogger(__name__)

_JOB_FIELDS = jobs.JobRequest.model_json_schema()
SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image", "prompt"],
                "properties": {
                    "image": {"type": "string", "format": "binary", "description": "The photo."},
                    "prompt": {"type": "string"},
                    "review": {"type": "string", "enum": ["none", "auto", "required"]},
                    "boxes": {"type": "string", "description": "JSON: [[x0, y0, x1, y1], ...] in pixels."},
                    "points": {"type": "string", "description": 'JSON: [{"x": .., "y": .., "label": 1}, ...].'},
                    "webhook_url": {"type": "string"},
                }}},
            "application/json": {"schema": {
                "type": "object", "required": ["image", "prompt"], "$defs": _JOB_FIELDS.get("$defs", {}),
                "properties": {"image": {"type": "string", "description": "s3://bucket/key, or a local path under "
                                         "SAM3D_API_INPUT_ROOTS."}} | _JOB_FIELDS["properties"]}},
        },
    },
}
JOB_ANSWER = {"description": "The job: id, status, status_url, output_prefix (202 new; 200 an idempotent replay)."}


def _refuse(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(tokens: Iterable[str], settings: Settings | None = None, deliver_webhooks: bool = True) -> FastAPI:
    """The web server.

    Args:
        tokens: accepted bearer tokens (at least one).
        settings: default: from the environment.
        deliver_webhooks: run the webhook loop while the app runs (needs ``SAM3D_WEBHOOK_SECRET``).
    """
    s = settings or get_settings()
    service = JobService(s)
    auth = [Depends(bearer(tokens))]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        deliverer = service.deliverer() if deliver_webhooks else None
        if deliverer is not None:
            deliverer.start()
        elif deliver_webhooks:
            log.warning("no SAM3D_WEBHOOK_SECRET: jobs asking for a webhook are refused")
        try:
            yield
        finally:
            if deliverer is not None:
                deliverer.stop()

    app = FastAPI(title="sam3d-pipeline", version=__version__, lifespan=lifespan, redoc_url=None,
                  description="Photos to 3D assets. Submit a job (a photo and a prompt), follow it, get its "
                  "outputs, and a signed webhook when it ends. Jobs are runs of the image-to-3d Prefect deployment.")
    app.state.service = service

    @app.exception_handler(prefect_api.PrefectUnreachable)
    async def prefect_unreachable(request: Request, exc: prefect_api.PrefectUnreachable) -> JSONResponse:
        return _refuse(503, str(exc), {"Retry-After": "10"})

    @app.exception_handler(DeploymentMissing)
    async def deployment_missing(request: Request, exc: DeploymentMissing) -> JSONResponse:
        return _refuse(503, str(exc), {"Retry-After": "30"})

    async def storage_failed(request: Request, exc: PipelineError) -> JSONResponse:
        return _refuse(503, f"storage: {exc}", {"Retry-After": "10"})

    # Storage failing or refusing while answering (not the request's fault: its own inputs are checked above).
    app.add_exception_handler(TransientError, storage_failed)
    app.add_exception_handler(StorageAccessError, storage_failed)

    @app.middleware("http")
    async def limit_and_isolate(request: Request, call_next):
        if "token" in request.query_params:
            return _refuse(401, QUERY_TOKEN_REFUSED, {"WWW-Authenticate": REALM})
        limit = MAX_BODY_BYTES
        if request.url.path == SUBMIT_PATH:
            limit = max(limit, s.max_input_bytes + FORM_OVERHEAD_BYTES)
        length = request.headers.get("content-length")
        if length is None and request.method in BODY_METHODS and "transfer-encoding" in request.headers:
            return _refuse(411, "send a Content-Length header with the request body")  # else the limit is bypassed
        if length is not None and (not length.isdigit() or int(length) > limit):
            if not length.isdigit():
                return _refuse(400, "malformed Content-Length header")
            what = (f"an upload over SAM3D_MAX_INPUT_BYTES={s.max_input_bytes:,}" if request.url.path == SUBMIT_PATH
                    else "request body")
            return _refuse(413, f"{what}: {int(length):,} bytes (the limit is {limit:,})")
        response = await call_next(request)
        # Cross-origin isolation lets the in-browser decoder use threads (SharedArrayBuffer).
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        response.headers["Cross-Origin-Embedder-Policy"] = "require-corp"
        response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
        response.headers["X-Content-Type-Options"] = "nosniff"
        if request.url.path.startswith(("/static/ort/", "/vendor/")):  # versioned by the npm lock files
            response.headers["Cache-Control"] = "public, max-age=604800"
        return response

    def base_url(request: Request) -> str:
        return service.base(str(request.base_url))

    # -- pages -------------------------------------------------------------------------------------------------
    def studio_page() -> FileResponse:
        index = STUDIO / "index.html"
        if not index.is_file():
            raise HTTPException(status_code=404, detail="the studio page is not installed")
        return FileResponse(index)

    @app.get("/", include_in_schema=False)
    def studio() -> FileResponse:
        return studio_page()

    @app.get("/jobs/{job_id}", include_in_schema=False)
    def studio_job(job_id: str) -> FileResponse:
        return studio_page()

    # -- the job API -------------------------------------------------------------------------------------------
    @app.post(SUBMIT_PATH, dependencies=auth, status_code=202, openapi_extra=SUBMIT_BODY, tags=["jobs"],
              responses={200: JOB_ANSWER, 202: JOB_ANSWER, 409: {"description": "Idempotency-Key reused for a "
                         "different request"}, 413: {"description": "Too large"}, 422: {"description": "Not an "
                         "image, or a field is missing or wrong (the detail says which)"}})
    async def submit(request: Request, idempotency_key: Annotated[str | None, Header(
            alias="Idempotency-Key", description="Same key and same request: the same job (200); same key, "
            "different request: 409.")] = None) -> JSONResponse:
        """Submit a job: a multipart form with an ``image`` file part, or JSON naming the image
        (``s3://bucket/key``, or a local path the server may read). Answers 202 with the job's id, status,
        ``status_url`` and ``output_prefix``; nothing is created when the request is refused."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        upload: bytes | None = None
        filename = uri = None
        if kind == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=16)
            except HTTPException as exc:
                return _refuse(400, f"malformed multipart body: {exc.detail}")
            try:  # the parts are spooled to temporary files: closed whatever happens
                image = form.get("image")
                fields: dict[str, Any] = {}
                for name, value in form.multi_items():
                    if name == "image":
                        continue
                    if isinstance(value, UploadFile):
                        return _refuse(422, f"{name}: expected a form field, got a file")
                    fields[name] = value
                if not isinstance(image, UploadFile):
                    return _refuse(422, "image: required (a file part named 'image' holding the photo)")
                if image.size is not None and image.size > s.max_input_bytes:
                    return _refuse(413, f"{image.filename or 'image'}: {image.size:,} bytes exceeds "
                                        f"SAM3D_MAX_INPUT_BYTES={s.max_input_bytes:,}")
                upload = await image.read(s.max_input_bytes + 1)
                filename = image.filename or "upload"
            finally:
                await form.close()
        elif kind == "application/json":
            try:
                fields = jsonsafe.loads(await request.body())
            except jsonsafe.JSONLimitError as exc:
                return _refuse(422, f"the body: {exc}")
            except ValueError:
                return _refuse(400, "the body is not valid JSON")
            if not isinstance(fields, dict):
                return _refuse(422, "the body must be a JSON object")
            uri = fields.pop("image", None)
            if not isinstance(uri, str) or not uri.strip():
                return _refuse(422, "image: required (s3://bucket/key, or a local path the server may read; or "
                                    "upload the file as multipart/form-data)")
        else:
            return _refuse(415, "send multipart/form-data with an 'image' file part, or application/json")
        return await run_in_threadpool(accept, fields, upload, filename, uri, idempotency_key, base_url(request))

    def accept(fields: dict[str, Any], upload: bytes | None, filename: str | None, uri: str | None,
               idempotency_key: str | None, base: str) -> JSONResponse:
        try:
            request, options = jobs.parse_request(fields, targets=service.webhook_targets())
            key = jobs.check_idempotency_key(idempotency_key)
        except jobs.JobRequestError as exc:
            return _refuse(422, str(exc))
        if request.webhook_url and not s.webhook_secret:
            return _refuse(422, "webhook_url: this server signs webhooks with SAM3D_WEBHOOK_SECRET, which is not set")
        try:
            if upload is not None:
                intake = uploads.check_upload(upload, filename or "upload", service.storage(), s)
            else:
                intake = uploads.check_uri(uri.strip(), s)
            uploads.check_prompts(options, intake)
        except ImageTooLargeError as exc:
            return _refuse(413, str(exc))
        except StorageAccessError as exc:
            return _refuse(422, f"image: the server may not read it: {exc}")
        except InputError as exc:
            return _refuse(422, str(exc))
        try:
            submitted = service.submit(request, intake, upload, key, base)
        except JobConflict as exc:
            return _refuse(409, str(exc))
        job = submitted.job
        return JSONResponse(jobs.accepted_json(job), status_code=202 if submitted.created else 200,
                            headers={"Location": job["status_url"]})

    @app.get("/v1/jobs", dependencies=auth, tags=["jobs"])
    def list_jobs(request: Request,
                  status: Annotated[str | None, Query(description="Only these statuses, comma-separated: "
                                                      + ", ".join(jobs.STATUSES))] = None,
                  limit: Annotated[int, Query(ge=1, le=200)] = 20) -> dict[str, Any]:
        """The newest jobs (runs of the image-to-3d deployment, however they were started)."""
        wanted = [w.strip() for w in status.split(",") if w.strip()] if status else None
        unknown = sorted(set(wanted or ()) - set(jobs.STATUSES))
        if unknown:
            raise HTTPException(status_code=422, detail=f"status: unknown {', '.join(unknown)} (choose from "
                                f"{', '.join(jobs.STATUSES)})")
        return {"jobs": service.list(wanted, limit, base_url(request))}

    @app.get("/v1/jobs/{job_id}", dependencies=auth, tags=["jobs"])
    def get_job(request: Request, job_id: str) -> dict[str, Any]:
        """The job: status, outputs (links), review page while it awaits review, error, webhook attempts, the
        backends that produced what, and the result.json summary."""
        try:
            return service.job(service.run(job_id), base_url(request))
        except JobNotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=auth, tags=["jobs"], status_code=202)
    def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
        """Cancel a job that has not ended (a running one stops within seconds; its webhook then says
        ``cancelled``)."""
        try:
            return service.cancel(job_id, base_url(request))
        except JobNotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        except JobEnded as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None

    @app.get("/v1/jobs/{job_id}/outputs/{name:path}", dependencies=auth, tags=["jobs"])
    def job_output(job_id: str, name: str) -> Response:
        """An output file of a job whose outputs are local files (on S3, ``outputs`` links are presigned)."""
        try:
            data = service.output_file(job_id, name)
        except JobNotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        return Response(data, media_type=content_type(name) or "application/octet-stream",
                        headers={"Cache-Control": "private, max-age=300"})

    # -- the review page, then the static files (mounts last: routes above win) ------------------------------
    add_review_routes(app, auth, s)
    if STUDIO.is_dir():
        app.mount("/studio", StaticFiles(directory=STUDIO), name="studio")
    if MODEL_VIEWER_DIST.is_dir():
        app.mount("/vendor/model-viewer", StaticFiles(directory=MODEL_VIEWER_DIST), name="model-viewer")
    return app
