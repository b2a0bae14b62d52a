"""The review page: ``/review`` (the paused runs) and ``/runs/{id}`` (one run) serve ``static/index.html``."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(include_in_schema=False)


@router.get("/review")
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/runs/{run_id}")
def run_page(run_id: UUID) -> FileResponse:
    return FileResponse(STATIC / "index.html")
