"""The studio pages: ``/`` and ``/jobs/{id}`` serve ``static/studio/index.html`` (it reads the job id from the
path); its other files are under ``/studio/`` (mounted by ``web.app``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STUDIO = Path(__file__).resolve().parents[1] / "static" / "studio"

router = APIRouter(include_in_schema=False)


def studio_page() -> FileResponse:
    index = STUDIO / "index.html"
    if not index.is_file():
        raise HTTPException(status_code=404, detail="the studio page is not installed")
    return FileResponse(index)


@router.get("/")
def studio() -> FileResponse:
    return studio_page()


@router.get("/jobs/{job_id}")
def studio_job(job_id: str) -> FileResponse:
    return studio_page()
