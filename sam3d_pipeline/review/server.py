"""The review page: list paused runs, show the photo and candidate masks, refine, approve or reject.

It is part of the one web server (``sam3d_pipeline.web.app``: studio, job API, review page), which adds it with
:func:`add_review_routes`; the routes are in ``routes`` by resource, and every Prefect API call is in
``prefect_api``. The page is static (``static/``), needs no build step, and talks to the JSON API with a bearer
token, which it reads from the URL fragment (``/review#token=...``: never sent to a server, never in access logs).
A token in the query string is refused. When the Prefect API cannot be reached, API routes answer 503 with the
reason.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from sam3d_pipeline.review.routes import answers, pages, runs
from sam3d_pipeline.review.routes.pages import STATIC

# onnxruntime-web from npm (``make install`` runs ``npm ci`` in ``review/web``); served, never from a CDN.
ORT_DIST = Path(__file__).parent / "web" / "node_modules" / "onnxruntime-web" / "dist"


def add_review_routes(app: FastAPI, auth: list) -> None:
    """Add the review page (``/review``, ``/runs/{id}``), its API (``/api/runs/...``, each behind ``auth``) and
    its static files (``/static/...``) to ``app``, whose ``state.settings`` the API reads."""
    app.include_router(pages.router)
    app.include_router(runs.router, dependencies=auth)
    app.include_router(answers.router, dependencies=auth)
    if ORT_DIST.is_dir():
        app.mount("/static/ort", StaticFiles(directory=ORT_DIST), name="ort")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
