"""The job API's work behind the routes: submit, read, list and cancel jobs, and the webhook store.

It joins the pure decisions (``jobs``, ``webhooks``), the Prefect calls (``prefect_jobs``) and storage (uploads,
``result.json``, links to the outputs). The routes (``app``) only turn HTTP into these calls and errors into
status codes.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from sam3d_pipeline.errors import InputNotFoundError, PipelineError
from sam3d_pipeline.keys import RunKeys
from sam3d_pipeline.run.pipeline import content_id
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import S3Storage, Storage, open_storage, read_input
from sam3d_pipeline.web import jobs, prefect_jobs, uploads
from sam3d_pipeline.web.jobs import JobRequest, RunView
from sam3d_pipeline.web.webhook_targets import TargetPolicy
from sam3d_pipeline.web.webhooks import Schedule, WebhookDeliverer


class JobConflict(Exception):
    """The Idempotency-Key was used before for a different request (the API answers 409)."""


class JobNotFound(LookupError):
    """No job with this id (404)."""


class JobEnded(Exception):
    """The job has ended and cannot be cancelled (409)."""


@dataclass
class Submitted:
    job: dict[str, Any]
    created: bool


class JobService:
    """Jobs for one web server.

    Args:
        settings: the server's settings (output root, limits, webhook secret and schedule).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._prefixes: dict[str, str | None] = {}  # run id → planned output prefix, for runs not made here
        self._lock = threading.Lock()

    # -- storage ---------------------------------------------------------------------------------------------
    def storage(self, root: str | None = None) -> Storage:
        return open_storage(root or self.settings.output_root, self.settings)

    def output_prefix(self, run: RunView) -> str | None:
        """Where the run writes: the label written at submission, or, for a run started otherwise (an upload to
        the bucket, the Prefect UI), planned once from its parameters and input (None when that fails)."""
        if run.labels.get(jobs.LABEL_OUTPUT_PREFIX):
            return run.labels[jobs.LABEL_OUTPUT_PREFIX]
        with self._lock:
            if run.id in self._prefixes:
                return self._prefixes[run.id]
        prefix = None
        try:
            options = jobs.run_options_of(run.parameters)
            image = run.parameters["image"]
            data = read_input(image, self.settings)
            root = self.storage(run.parameters.get("output_root")).root
            intake = uploads.Intake(uri=image, content_id=content_id(data), width=0, height=0)
            prefix = uploads.planned_run(intake, options, run.parameters.get("review", "none"), root,
                                         self.settings)[0]
        except (PipelineError, KeyError, ValueError):
            prefix = None
        with self._lock:
            self._prefixes[run.id] = prefix
        return prefix

    def result(self, run: RunView, prefix: str | None) -> dict[str, Any] | None:
        """The run's ``result.json`` once it ended (None before, or when there is none)."""
        if prefix is None or run.state_type not in ("COMPLETED", "FAILED", "CRASHED"):
            return None
        root, name = prefix.rsplit("/", 1)
        try:
            return json.loads(self.storage(root).read_bytes(RunKeys(name).result))
        except InputNotFoundError:
            return None
        except ValueError:
            return None

    def output_links(self, run: RunView, prefix: str | None, result: dict[str, Any] | None,
                     base_url: str) -> dict[str, str]:
        """Output name → URL a browser fetches: presigned on S3 (``SAM3D_LINK_EXPIRES_S``), else this server's
        ``/v1/jobs/{id}/outputs/{name}`` (with the bearer token)."""
        if prefix is None or not result or not result.get("outputs"):
            return {}
        root, name = prefix.rsplit("/", 1)
        storage = self.storage(root)
        keys = RunKeys(name)
        if isinstance(storage, S3Storage):
            return {out: storage.link(keys.file(out)) for out in result["outputs"]}
        return {out: f"{base_url}/v1/jobs/{run.id}/outputs/{out}" for out in result["outputs"]}

    def early_links(self, run: RunView, prefix: str | None, base_url: str) -> dict[str, str]:
        """While a running job publishes: links to the files a viewer waits for (``finish.EARLY_FILES``), written
        before the rest. A run removes its prefix's ``result.json`` before it writes them, so those files without
        a ``result.json`` are this run's, never an earlier run's."""
        if prefix is None or run.state_type != "RUNNING":
            return {}
        from sam3d_pipeline.run.finish import EARLY_FILES

        root, name = prefix.rsplit("/", 1)
        storage, keys = self.storage(root), RunKeys(name)
        ready = [out for out in EARLY_FILES if storage.exists(keys.file(out))]
        if not ready or storage.exists(keys.result):
            return {}
        if isinstance(storage, S3Storage):
            return {out: storage.link(keys.file(out)) for out in ready}
        return {out: f"{base_url}/v1/jobs/{run.id}/outputs/{out}" for out in ready}

    def output_file(self, job_id: str, name: str) -> bytes:
        """An output's bytes, for local storage (S3 outputs are fetched through presigned links).

        Raises:
            JobNotFound: no such job, or no such output.
        """
        run = self.run(job_id)
        prefix = self.output_prefix(run)
        result = self.result(run, prefix)
        published = set(result.get("outputs", {})) if result else set(self.early_links(run, prefix, ""))
        if prefix is None or name not in published:
            raise JobNotFound(f"job {job_id} has no output {name!r}")
        root, folder = prefix.rsplit("/", 1)
        return self.storage(root).read_bytes(RunKeys(folder).file(name))

    # -- jobs ------------------------------------------------------------------------------------------------
    def base(self, request_base: str | None) -> str:
        return (self.settings.web_url or request_base or "").rstrip("/")

    def run(self, job_id: str) -> RunView:
        run = prefect_jobs.read(job_id)
        if run is None:
            raise JobNotFound(f"no job {job_id}")
        return run

    def job(self, run: RunView, base_url: str, attempts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The job JSON of ``run`` (its webhook attempts read from Prefect unless given)."""
        prefix = self.output_prefix(run)
        result = self.result(run, prefix)
        if attempts is None:
            attempts = prefect_jobs.read_attempts([run.id])[run.id] if run.webhook_url else []
        return jobs.job_json(run, result=result, output_prefix=prefix,
                             outputs=self.output_links(run, prefix, result, base_url),
                             early_outputs={} if result else self.early_links(run, prefix, base_url),
                             status_url=f"{base_url}/v1/jobs/{run.id}",
                             review_url=f"{base_url}/runs/{run.id}", attempts=attempts)

    async def job_once_changed(self, job_id: str, status: str, wait_s: float, base_url: str) -> dict[str, Any]:
        """The job JSON once its status is other than ``status``, or as it is after ``wait_s`` seconds."""
        import anyio

        def current() -> dict[str, Any]:
            return self.job(self.run(job_id), base_url)

        def changed() -> dict[str, Any] | None:
            job = current()
            return job if job["status"] != status else None

        found = await prefect_jobs.next_state_change(job_id, wait_s, changed)
        return found if found is not None else await anyio.to_thread.run_sync(current)

    def submit(self, request: JobRequest, intake: uploads.Intake, upload: bytes | None,
               idempotency_key: str | None, base_url: str) -> Submitted:
        """Create the job's run (after storing an upload), or answer an idempotent replay.

        Raises:
            JobConflict: the key was used before for a different request.
            PipelineError: storing the upload failed.
        """
        options = request.options()
        storage = self.storage()
        fingerprint = jobs.fingerprint(request, intake.uri, intake.content_id)
        key = jobs.prefect_idempotency_key(idempotency_key) if idempotency_key else None
        if key is not None and (earlier := prefect_jobs.find_by_idempotency_key(key)) is not None:
            return self._replay(earlier, fingerprint, base_url)
        if upload is not None:
            uploads.store_upload(intake, upload, storage)
        prefix, segmenter, reconstructor = uploads.planned_run(intake, options, request.review, storage.root,
                                                               self.settings)
        labels = {jobs.LABEL_FINGERPRINT: fingerprint, jobs.LABEL_REQUEST_ID: uuid.uuid4().hex,
                  jobs.LABEL_OUTPUT_PREFIX: prefix, jobs.LABEL_SEGMENTER: segmenter,
                  jobs.LABEL_RECONSTRUCTOR: reconstructor} | jobs.input_labels(intake.describe())
        tags = [jobs.JOB_TAG]
        if request.webhook_url:
            labels[jobs.LABEL_WEBHOOK_URL] = request.webhook_url
            tags.append(jobs.WEBHOOK_PENDING_TAG)
        run, created = prefect_jobs.create(jobs.flow_parameters(request, intake.uri, storage.root), labels, tags, key)
        if not created:  # created by a concurrent request with the same key in between
            return self._replay(run, fingerprint, base_url)
        return Submitted(self.job(run, base_url, attempts=[]), created=True)

    def _replay(self, earlier: RunView, fingerprint: str, base_url: str) -> Submitted:
        if earlier.labels.get(jobs.LABEL_FINGERPRINT) != fingerprint:
            raise JobConflict(f"Idempotency-Key was already used for a different request (job {earlier.id}); "
                              "send a new key for a new request")
        return Submitted(self.job(earlier, base_url), created=False)

    def list(self, statuses: list[str] | None, limit: int, base_url: str) -> list[dict[str, Any]]:
        """The newest jobs, optionally only with these statuses (at most ``limit``)."""
        state_types = None
        if statuses:
            state_types = sorted({t for s in statuses for t in jobs.STATE_TYPES_OF_STATUS[s]})
        found: list[dict[str, Any]] = []
        offset, page = 0, max(limit, 20)
        while len(found) < limit:
            runs = prefect_jobs.list_runs(state_types, limit=page, offset=offset)
            attempts = prefect_jobs.read_attempts([r.id for r in runs if r.webhook_url])
            for run in runs:
                job = self.job(run, base_url, attempts=attempts.get(run.id, []))
                if not statuses or job["status"] in statuses:
                    found.append(job)
            if len(runs) < page or offset > 10 * page:  # the end, or enough scanned for one answer
                break
            offset += page
        return found[:limit]

    def cancel(self, job_id: str, base_url: str) -> dict[str, Any]:
        """Cancel a job that has not ended.

        Raises:
            JobNotFound, JobEnded.
        """
        run = self.run(job_id)
        if run.state_type in jobs.FINAL_STATE_TYPES:
            raise JobEnded(f"job {job_id} has already ended ({self.job(run, base_url)['status']})")
        return self.job(prefect_jobs.cancel(run), base_url)

    # -- the webhook store (webhooks.WebhookStore) -----------------------------------------------------------
    def pending(self) -> list[tuple[str, str]]:
        return [(r.id, r.webhook_url) for r in prefect_jobs.ended_with_webhook_due() if r.webhook_url]

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        return prefect_jobs.read_attempts([job_id])[job_id]

    def record(self, job_id: str, attempts: list[dict[str, Any]]) -> None:
        prefect_jobs.write_attempts(job_id, attempts)

    def settle(self, job_id: str) -> None:
        prefect_jobs.settle(job_id)

    def job_body(self, job_id: str, attempts: list[dict[str, Any]]) -> dict[str, Any]:
        return self.job(self.run(job_id), self.base(None), attempts=attempts)

    def deliverer(self) -> WebhookDeliverer | None:
        """The webhook loop of this server, or None without ``SAM3D_WEBHOOK_SECRET``.

        Raises:
            ValueError: a bad ``SAM3D_WEBHOOK_ALLOW_*`` entry (the server does not start).
        """
        hooks = self.settings.webhook
        if not hooks.secret:
            return None
        return WebhookDeliverer(self, hooks.secret, Schedule(hooks.max_attempts, hooks.backoff_s, hooks.backoff_max_s),
                                timeout_s=hooks.timeout_s, poll_s=hooks.poll_s, targets=self.webhook_targets(),
                                max_response_bytes=hooks.max_response_bytes, workers=hooks.workers)

    def webhook_targets(self) -> TargetPolicy:
        """Where this server's webhooks may go (``SAM3D_WEBHOOK_ALLOW_*``; never its own services).

        Raises:
            ValueError: a bad allow-list entry (names the setting).
        """
        return TargetPolicy.from_settings(self.settings)
