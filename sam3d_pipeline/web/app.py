"""The one web server (``sam3d-pipeline web``): the studio page, the job API (``/v1/jobs``) and the review page.

``create_app`` puts together the routes, by resource in ``routes`` (studio pages, job submission, jobs) and
``review.server`` (the review page), the request guards (``guards``) and the job service behind the API
(``service.JobService``: Prefect calls in ``prefect_jobs``, decisions in ``jobs`` and ``webhooks``), kept in
``app.state``. Pages:

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

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles

from sam3d_pipeline import __version__
from sam3d_pipeline.review.server import add_review_routes
from sam3d_pipeline.settings import Settings, get_settings
from sam3d_pipeline.web.auth import bearer
from sam3d_pipeline.web.guards import add_guards
from sam3d_pipeline.web.routes import jobs, pages, submit
from sam3d_pipeline.web.routes.pages import STUDIO
from sam3d_pipeline.web.service import JobService

# @google/model-viewer from npm (``make install`` runs ``npm ci`` in ``gallery/``); served, never from a CDN.
MODEL_VIEWER_DIST = Path(__file__).resolve().parents[1] / "gallery" / "node_modules" / "@google/model-viewer/dist"
DESCRIPTION = ("Photos to 3D assets. Submit a job (a photo and a prompt), follow it, get its outputs, and a signed "
               "webhook when it ends. Jobs are runs of the image-to-3d Prefect deployment.")

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI):
    """While the app runs: the webhook loop, when ``app.state.deliver_webhooks`` asks for it."""
    deliver = app.state.deliver_webhooks
    deliverer = app.state.service.deliverer() if deliver else None
    if deliverer is not None:
        deliverer.start()
    elif deliver:
        log.warning("no SAM3D_WEBHOOK_SECRET: jobs asking for a webhook are refused")
    try:
        yield
    finally:
        if deliverer is not None:
            deliverer.stop()


def create_app(tokens: Iterable[str], settings: Settings | None = None, deliver_webhooks: bool = True) -> FastAPI:
    """The web server.

    Args:
        tokens: accepted bearer tokens (at least one).
        settings: default: from the environment.
        deliver_webhooks: run the webhook loop while the app runs (needs ``SAM3D_WEBHOOK_SECRET``).
    """
    s = settings or get_settings()
    auth = [Depends(bearer(tokens))]
    app = FastAPI(title="sam3d-pipeline", version=__version__, lifespan=lifespan, redoc_url=None,
                  description=DESCRIPTION)
    app.state.settings = s
    app.state.service = JobService(s)
    app.state.deliver_webhooks = deliver_webhooks
    add_guards(app)
    app.include_router(pages.router)
    app.include_router(submit.router, dependencies=auth)
    app.include_router(jobs.router, dependencies=auth)
    # The review page, then the static files (mounts last: routes above win).
    add_review_routes(app, auth)
    if STUDIO.is_dir():
        app.mount("/studio", StaticFiles(directory=STUDIO), name="studio")
    if MODEL_VIEWER_DIST.is_dir():
        app.mount("/vendor/model-viewer", StaticFiles(directory=MODEL_VIEWER_DIST), name="model-viewer")
    return app
