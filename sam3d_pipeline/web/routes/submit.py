"""Submitting a job (``POST /v1/jobs``): a multipart form with an ``image`` file part (a photo or a clip), or JSON
naming the image or clip.

The route reads the body (``read_form``, ``read_json``); ``accept`` checks the request and the image, then
``JobService.submit`` creates the run. Nothing is created when the request is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from sam3d_pipeline import jsonsafe
from sam3d_pipeline.errors import ImageTooLargeError, InputError, StorageAccessError
from sam3d_pipeline.run.pipeline import RunOptions
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.web import jobs, uploads
from sam3d_pipeline.web.guards import SUBMIT_PATH
from sam3d_pipeline.web.routes.state import AppSettings, BaseUrl, Service
from sam3d_pipeline.web.service import JobConflict, JobService

router = APIRouter(tags=["jobs"])

_JOB_FIELDS = jobs.JobRequest.model_json_schema()
SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image", "prompt"],
                "properties": {
                    "image": {"type": "string", "format": "binary", "description": "The photo (JPEG, PNG, WebP, "
                              "TIFF, BMP, GIF), or a clip (MP4, MOV, M4V, WebM) within SAM3D_VIDEO_MAX_SECONDS and "
                              "SAM3D_VIDEO_MAX_PIXELS; either within SAM3D_MAX_INPUT_BYTES."},
                    "prompt": {"type": "string"},
                    "review": {"type": "string", "enum": ["none", "auto", "required"]},
                    "boxes": {"type": "string", "description": "JSON: [[x0, y0, x1, y1], ...] in pixels."},
                    "points": {"type": "string", "description": 'JSON: [{"x": .., "y": .., "label": 1}, ...].'},
                    "webhook_url": {"type": "string"},
                    "video_frames": {"type": "integer", "minimum": 1, "maximum": 8,
                                     "description": _JOB_FIELDS["properties"]["video_frames"]["description"]},
                }}},
            "application/json": {"schema": {
                "type": "object", "required": ["image", "prompt"], "$defs": _JOB_FIELDS.get("$defs", {}),
                "properties": {"image": {"type": "string", "description": "s3://bucket/key, or a local path under "
                                         "SAM3D_API_INPUT_ROOTS; a clip by its suffix (.mp4, .mov, .m4v, .webm), "
                                         "or a folder / s3://…/ prefix of frames."}} | _JOB_FIELDS["properties"]}},
        },
    },
}
JOB_ANSWER = {"description": "The job: id, status, status_url, output_prefix, input (kind photo or video, and "
              "what the check found: a clip's size, length, frames) (202 new; 200 an idempotent replay)."}
ANSWERS = {200: JOB_ANSWER, 202: JOB_ANSWER, 409: {"description": "Idempotency-Key reused for a different request"},
           413: {"description": "Too large"},
           422: {"description": "Not an image or a readable clip (truncated, audio only, too long, frames too "
                 "large), or a field is missing or wrong (the detail says which)"}}
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", description="Same key and same request: the same job (200); same key, different "
    "request: 409.")]


@dataclass
class Submission:
    """A submission's body, read: the form or JSON fields, and the photo (uploaded bytes, or a URI)."""

    fields: dict[str, Any] = field(default_factory=dict)
    upload: bytes | None = None
    filename: str | None = None
    uri: str | None = None


def _refused(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


async def read_form(request: Request, max_input_bytes: int) -> Submission:
    """A multipart body: the ``image`` file part and the other fields (form fields only)."""
    try:
        form = await request.form(max_files=1, max_fields=16)
    except HTTPException as exc:
        raise _refused(400, f"malformed multipart body: {exc.detail}") from None
    try:  # the parts are spooled to temporary files: closed whatever happens
        image = form.get("image")
        fields: dict[str, Any] = {}
        for name, value in form.multi_items():
            if name == "image":
                continue
            if isinstance(value, UploadFile):
                raise _refused(422, f"{name}: expected a form field, got a file")
            fields[name] = value
        if not isinstance(image, UploadFile):
            raise _refused(422, "image: required (a file part named 'image' holding the photo or clip)")
        if image.size is not None and image.size > max_input_bytes:
            raise _refused(413, f"{image.filename or 'image'}: {image.size:,} bytes exceeds "
                                f"SAM3D_MAX_INPUT_BYTES={max_input_bytes:,}")
        upload = await image.read(max_input_bytes + 1)
        return Submission(fields, upload, image.filename or "upload")
    finally:
        await form.close()


async def read_json(request: Request) -> Submission:
    """A JSON object: the fields, and ``image`` naming the photo."""
    try:
        fields = jsonsafe.loads(await request.body())
    except jsonsafe.JSONLimitError as exc:
        raise _refused(422, f"the body: {exc}") from None
    except ValueError:
        raise _refused(400, "the body is not valid JSON") from None
    if not isinstance(fields, dict):
        raise _refused(422, "the body must be a JSON object")
    uri = fields.pop("image", None)
    if not isinstance(uri, str) or not uri.strip():
        raise _refused(422, "image: required (s3://bucket/key, or a local path the server may read; or upload the "
                            "file as multipart/form-data)")
    return Submission(fields, uri=uri)


def check_image(submission: Submission, options: RunOptions, service: JobService,
                settings: Settings) -> uploads.Intake:
    """The photo or clip, checked (size, format, a clip's length and frames, whether the server may read it) against
    the request's prompts. Over the byte limit (or a photo over the pixel limit) is 413; every other refusal,
    a clip too long or with frames too large included, is 422 with the reason."""
    try:
        if submission.upload is not None:
            intake = uploads.check_upload(submission.upload, submission.filename or "upload", service.storage(),
                                          settings)
        else:
            intake = uploads.check_uri(submission.uri.strip(), settings)
        uploads.check_prompts(options, intake)
    except ImageTooLargeError as exc:
        raise _refused(413, str(exc)) from None
    except StorageAccessError as exc:
        raise _refused(422, f"image: the server may not read it: {exc}") from None
    except InputError as exc:
        raise _refused(422, str(exc)) from None
    return intake


def accept(submission: Submission, idempotency_key: str | None, service: JobService, settings: Settings,
           base: str) -> JSONResponse:
    """Check the request and the image, then create the job (202), or find the one this key made (200)."""
    try:
        request, options = jobs.parse_request(submission.fields, targets=service.webhook_targets())
        key = jobs.check_idempotency_key(idempotency_key)
    except jobs.JobRequestError as exc:
        raise _refused(422, str(exc)) from None
    if request.webhook_url and not settings.webhook.secret:
        raise _refused(422, "webhook_url: this server signs webhooks with SAM3D_WEBHOOK_SECRET, which is not set")
    intake = check_image(submission, options, service, settings)
    try:
        submitted = service.submit(request, intake, submission.upload, key, base)
    except JobConflict as exc:
        raise _refused(409, str(exc)) from None
    job = submitted.job
    return JSONResponse(jobs.accepted_json(job), status_code=202 if submitted.created else 200,
                        headers={"Location": job["status_url"]})


@router.post(SUBMIT_PATH, status_code=202, openapi_extra=SUBMIT_BODY, responses=ANSWERS)
async def submit(request: Request, service: Service, settings: AppSettings, base: BaseUrl,
                 idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Submit a job: a multipart form with an ``image`` file part, or JSON naming the image
    (``s3://bucket/key``, or a local path the server may read). Answers 202 with the job's id, status,
    ``status_url`` and ``output_prefix``; nothing is created when the request is refused."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        submission = await read_form(request, settings.max_input_bytes)
    elif kind == "application/json":
        submission = await read_json(request)
    else:
        raise _refused(415, "send multipart/form-data with an 'image' file part, or application/json")
    return await run_in_threadpool(accept, submission, idempotency_key, service, settings, base)
