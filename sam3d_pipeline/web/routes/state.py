"""What the routes share, as FastAPI dependencies reading ``app.state`` (set by ``web.app.create_app``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from sam3d_pipeline.settings import Settings
from sam3d_pipeline.web.service import JobService


def job_service(request: Request) -> JobService:
    return request.app.state.service


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def base_url(request: Request) -> str:
    """The base of the URLs in answers (``SAM3D_WEB_URL`` when set, else the request's)."""
    return job_service(request).base(str(request.base_url))


Service = Annotated[JobService, Depends(job_service)]
AppSettings = Annotated[Settings, Depends(app_settings)]
BaseUrl = Annotated[str, Depends(base_url)]
