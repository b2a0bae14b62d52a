"""The jobs once submitted: list them, read one, cancel one, read an output file (``/v1/jobs...``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from sam3d_pipeline.keys import content_type
from sam3d_pipeline.web import jobs
from sam3d_pipeline.web.routes.state import BaseUrl, Service
from sam3d_pipeline.web.service import JobEnded, JobNotFound

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

StatusFilter = Annotated[str | None, Query(description="Only these statuses, comma-separated: "
                                           + ", ".join(jobs.STATUSES))]


@router.get("")
def list_jobs(service: Service, base: BaseUrl, status: StatusFilter = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 20) -> dict[str, Any]:
    """The newest jobs (runs of the image-to-3d deployment, however they were started)."""
    wanted = [w.strip() for w in status.split(",") if w.strip()] if status else None
    unknown = sorted(set(wanted or ()) - set(jobs.STATUSES))
    if unknown:
        raise HTTPException(status_code=422, detail=f"status: unknown {', '.join(unknown)} (choose from "
                            f"{', '.join(jobs.STATUSES)})")
    return {"jobs": service.list(wanted, limit, base)}


@router.get("/{job_id}")
async def get_job(job_id: str, service: Service, base: BaseUrl,
                  changed_from: Annotated[str | None, Query(
                      description="With wait_s: answer once the job's status is other than this one")] = None,
                  wait_s: Annotated[float, Query(ge=0, le=30, description=(
                      "Wait up to this many seconds for the status to change from changed_from (then answer "
                      "with the job as it is): a client learns of the change within a fraction of a second "
                      "without polling"))] = 0) -> dict[str, Any]:
    """The job: status, outputs (links), review page while it awaits review, error, webhook attempts, the
    backends that produced what, and the result.json summary."""
    if changed_from is not None and changed_from not in jobs.STATUSES:
        raise HTTPException(status_code=422, detail=f"changed_from: unknown status {changed_from!r} (choose from "
                            f"{', '.join(jobs.STATUSES)})")
    try:
        job = await run_in_threadpool(lambda: service.job(service.run(job_id), base))
        if wait_s and changed_from is not None and job["status"] == changed_from:
            job = await service.job_once_changed(job_id, changed_from, wait_s, base)
        return job
    except JobNotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None


@router.post("/{job_id}/cancel", status_code=202)
def cancel_job(job_id: str, service: Service, base: BaseUrl) -> dict[str, Any]:
    """Cancel a job that has not ended (a running one stops within seconds; its webhook then says
    ``cancelled``)."""
    try:
        return service.cancel(job_id, base)
    except JobNotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except JobEnded as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None


@router.get("/{job_id}/outputs/{name:path}")
def job_output(job_id: str, name: str, service: Service) -> Response:
    """An output file of a job whose outputs are local files (on S3, ``outputs`` links are presigned)."""
    try:
        data = service.output_file(job_id, name)
    except JobNotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    return Response(data, media_type=content_type(name) or "application/octet-stream",
                    headers={"Cache-Control": "private, max-age=300"})
