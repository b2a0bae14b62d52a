"""A small Python client of the job API (``sam3d-pipeline web``): submit a photo or a URI, wait with progress,
download the outputs.

    from sam3d_pipeline.web.client import JobClient

    client = JobClient("http://127.0.0.1:8765", token)          # SAM3D_WEB_URL, SAM3D_API_TOKEN
    job = client.submit("chair.jpg", prompt="red chair")        # uploaded; client.submit_uri("s3://...", ...)
    job = client.wait(job["id"], on_progress=lambda j: print(j["status"]))
    paths = client.download(job, "outputs/chair")               # every output, as files

Errors of the API raise :class:`ApiError` with its status code and the server's reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

FINAL_STATUSES = frozenset({"completed", "no_object", "rejected", "failed", "cancelled"})


class ApiError(RuntimeError):
    """The API refused or failed a call.

    Attributes:
        status: the HTTP status code (401 token, 404 no such job, 409 conflict, 413 too large, 422 bad request,
            503 Prefect or storage unreachable).
        detail: the server's reason.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class JobClient:
    """Calls the job API with a bearer token.

    Args:
        base_url: the web server, e.g. ``http://127.0.0.1:8765``.
        token: its token (``SAM3D_API_TOKEN``).
        timeout_s: per request.
    """

    def __init__(self, base_url: str, token: str, timeout_s: float = 60.0) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s,
                                 headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, response: Any) -> Any:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, detail if isinstance(detail, str) else json.dumps(detail))
        return response

    def submit(self, image: str | Path, prompt: str, *, review: str = "none", boxes: list | None = None,
               points: list | None = None, webhook_url: str | None = None,
               idempotency_key: str | None = None, video_frames: int = 1) -> dict[str, Any]:
        """Submit a job for a local photo or clip (uploaded) or an ``s3://`` URI (named; the run reads it).

        Args:
            image: a local file (a photo, or an MP4 / MOV / M4V / WebM clip), or ``s3://bucket/key``.
            prompt: what to segment.
            review: ``none``, ``auto`` or ``required``.
            boxes: ``[[x0, y0, x1, y1], ...]`` in pixels; points: ``[{"x", "y", "label"}, ...]``.
            webhook_url: gets the signed job JSON when the job ends.
            idempotency_key: a repeat with the same key and request returns the first job.
            video_frames: for a clip, how many of its best tracked frames to try (1: the best only).

        Returns:
            ``{"id", "status", "status_url", "output_prefix"}``.

        Raises:
            ApiError: 409 (key reused for another request), 413, 422 (the reason names the field), ...
        """
        if str(image).startswith("s3://"):
            return self.submit_uri(str(image), prompt, review=review, boxes=boxes, points=points,
                                   webhook_url=webhook_url, idempotency_key=idempotency_key, video_frames=video_frames)
        form = self._fields(prompt, review, webhook_url, video_frames)
        form |= ({"boxes": json.dumps(boxes)} if boxes else {}) | ({"points": json.dumps(points)} if points else {})
        path = Path(image)
        with path.open("rb") as fh:
            response = self.http.post("/v1/jobs", data=form, files={"image": (path.name, fh)},
                                      headers=self._key(idempotency_key))
        return self._check(response).json()

    def submit_uri(self, uri: str, prompt: str, *, review: str = "none", boxes: list | None = None,
                   points: list | None = None, webhook_url: str | None = None,
                   idempotency_key: str | None = None, video_frames: int = 1) -> dict[str, Any]:
        """Submit a job for a photo or clip the server reads itself: ``s3://bucket/key``, or a path on the server
        under its ``SAM3D_API_INPUT_ROOTS`` (arguments as :meth:`submit`)."""
        body = self._fields(prompt, review, webhook_url, video_frames) | {"image": uri}
        body |= ({"boxes": boxes} if boxes else {}) | ({"points": points} if points else {})
        return self._check(self.http.post("/v1/jobs", json=body, headers=self._key(idempotency_key))).json()

    @staticmethod
    def _fields(prompt: str, review: str, webhook_url: str | None, video_frames: int = 1) -> dict[str, Any]:
        return ({"prompt": prompt, "review": review} | ({"webhook_url": webhook_url} if webhook_url else {})
                | ({"video_frames": video_frames} if video_frames != 1 else {}))

    @staticmethod
    def _key(idempotency_key: str | None) -> dict[str, str]:
        return {"Idempotency-Key": idempotency_key} if idempotency_key else {}

    def get(self, job_id: str, changed_from: str | None = None, wait_s: float = 0.0) -> dict[str, Any]:
        """The job JSON (status, outputs, review_url, error, webhook attempts, backends, result); with
        ``changed_from``, the server answers once the status is another (or after ``wait_s`` seconds)."""
        if not changed_from or wait_s <= 0:
            return self._check(self.http.get(f"/v1/jobs/{job_id}")).json()
        import httpx

        t = self.http.timeout
        timeout = httpx.Timeout(connect=t.connect, read=(t.read or 0) + wait_s, write=t.write, pool=t.pool)
        return self._check(self.http.get(f"/v1/jobs/{job_id}", params={"changed_from": changed_from, "wait_s": wait_s},
                                         timeout=timeout)).json()

    def list(self, status: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        params = {"limit": limit} | ({"status": status} if status else {})
        return self._check(self.http.get("/v1/jobs", params=params)).json()["jobs"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.post(f"/v1/jobs/{job_id}/cancel")).json()

    def wait(self, job_id: str, *, timeout_s: float = 600.0, poll_s: float = 1.0,
             on_progress: Callable[[dict[str, Any]], None] | None = None,
             until: frozenset[str] = FINAL_STATUSES) -> dict[str, Any]:
        """Poll until the job's status is one of ``until`` (default: any final status).

        Args:
            on_progress: called with the job JSON whenever its status changes.

        Raises:
            TimeoutError: not there within ``timeout_s`` (the message has the last status).
        """
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            asked = time.monotonic()
            # After the first read, the server holds the request until the status changes (up to 10 s).
            job = self.get(job_id, changed_from=last, wait_s=max(0.0, min(10.0, deadline - asked)))
            changed = job["status"] != last
            if changed:
                last = job["status"]
                if on_progress is not None:
                    on_progress(job)
            if job["status"] in until:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s:g} s")
            if not changed and time.monotonic() - asked < poll_s:
                time.sleep(poll_s)  # a server that answered at once (one that does not wait): poll

    def download(self, job: dict[str, Any], folder: str | Path, names: list[str] | None = None) -> dict[str, Path]:
        """Save the job's outputs (all, or ``names``) under ``folder``, keeping their relative names
        (``objects/0/object.glb``). Presigned links are fetched without the token; this server's routes with it.

        Returns:
            Output name → the file written.
        """
        import httpx

        folder = Path(folder)
        written = {}
        for name, url in job.get("outputs", {}).items():
            if names is not None and name not in names:
                continue
            relative = PurePosixPath(name)
            if relative.is_absolute() or ".." in relative.parts:
                raise ValueError(f"refusing output name {name!r}")
            own = url.startswith(self.base_url) or url.startswith("/")
            response = self.http.get(url) if own else httpx.get(url, timeout=self.http.timeout)
            self._check(response)
            target = folder.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(response.content)
            written[name] = target
        return written
