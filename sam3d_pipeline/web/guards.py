"""What the web server does to every request before and after its route: refuse a token in the URL query, cap the
body's size (an upload to ``SUBMIT_PATH`` may be as large as ``SAM3D_MAX_INPUT_BYTES``, every other body
``MAX_BODY_BYTES``), set the isolation headers; and the answers for the errors routes let through (Prefect or
storage unreachable: 503 with ``Retry-After``)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from sam3d_pipeline.errors import PipelineError, StorageAccessError, TransientError
from sam3d_pipeline.review import prefect_api
from sam3d_pipeline.review.routes.answers import MAX_BODY_BYTES
from sam3d_pipeline.web.auth import QUERY_TOKEN_REFUSED, REALM
from sam3d_pipeline.web.prefect_jobs import DeploymentMissing

SUBMIT_PATH = "/v1/jobs"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
FORM_OVERHEAD_BYTES = 1024 * 1024  # room for the form fields and multipart boundaries around an upload
ISOLATION_HEADERS = {
    # Cross-origin isolation lets the in-browser decoder use threads (SharedArrayBuffer).
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}
VERSIONED_PATHS = ("/static/ort/", "/vendor/")  # versioned by the npm lock files: cached for a week


def refuse(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The answer to a refused request, shaped as FastAPI's own (``{"detail": ...}``)."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def body_refusal(request: Request, max_input_bytes: int) -> JSONResponse | None:
    """The refusal of a request whose body is too large or not announced, or None."""
    limit = MAX_BODY_BYTES
    upload = request.url.path == SUBMIT_PATH
    if upload:
        limit = max(limit, max_input_bytes + FORM_OVERHEAD_BYTES)
    length = request.headers.get("content-length")
    if length is None:
        if request.method in BODY_METHODS and "transfer-encoding" in request.headers:
            return refuse(411, "send a Content-Length header with the request body")  # else the limit is bypassed
        return None
    if not length.isdigit():
        return refuse(400, "malformed Content-Length header")
    if int(length) > limit:
        what = f"an upload over SAM3D_MAX_INPUT_BYTES={max_input_bytes:,}" if upload else "request body"
        return refuse(413, f"{what}: {int(length):,} bytes (the limit is {limit:,})")
    return None


async def limit_and_isolate(request: Request, call_next):
    """The HTTP middleware: the refusals above, then the route, then the headers every answer carries."""
    if "token" in request.query_params:
        return refuse(401, QUERY_TOKEN_REFUSED, {"WWW-Authenticate": REALM})
    refusal = body_refusal(request, request.app.state.settings.max_input_bytes)
    if refusal is not None:
        return refusal
    response = await call_next(request)
    response.headers.update(ISOLATION_HEADERS)
    if request.url.path.startswith(VERSIONED_PATHS):
        response.headers["Cache-Control"] = "public, max-age=604800"
    return response


async def prefect_unreachable(request: Request, exc: prefect_api.PrefectUnreachable) -> JSONResponse:
    return refuse(503, str(exc), {"Retry-After": "10"})


async def deployment_missing(request: Request, exc: DeploymentMissing) -> JSONResponse:
    return refuse(503, str(exc), {"Retry-After": "30"})


async def storage_failed(request: Request, exc: PipelineError) -> JSONResponse:
    # Storage failing or refusing while answering (not the request's fault: its own inputs are checked first).
    return refuse(503, f"storage: {exc}", {"Retry-After": "10"})


def add_guards(app: FastAPI) -> None:
    """Add the middleware and the error answers to ``app`` (whose ``state.settings`` the middleware reads)."""
    app.middleware("http")(limit_and_isolate)
    app.add_exception_handler(prefect_api.PrefectUnreachable, prefect_unreachable)
    app.add_exception_handler(DeploymentMissing, deployment_missing)
    app.add_exception_handler(TransientError, storage_failed)
    app.add_exception_handler(StorageAccessError, storage_failed)
