"""Every Prefect API call of the job API and its webhooks, in one place (the review page's are in
``review/prefect_api.py``, whose client and error handling these share: a configured Prefect server only, and
:class:`~sam3d_pipeline.review.prefect_api.PrefectUnreachable` when it does not answer).

Prefect is the only job store: a job is a flow run of the ``image-to-3d`` deployment, its request fingerprint,
planned output prefix and webhook URL are labels of the run (written with it, in one call), the runs whose
webhook is still due carry the tag ``sam3d-webhook-pending``, and the delivery attempts are a table artifact of
the run (``webhook-<run id>``, a new version per attempt): people see them in the Prefect UI, and a restarted web
server reads them back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from uuid import UUID

from sam3d_pipeline.review.prefect_api import _client
from sam3d_pipeline.stack.worker import wake as wake_worker
from sam3d_pipeline.web.jobs import FINAL_STATE_TYPES, LABEL_REQUEST_ID, WEBHOOK_PENDING_TAG, RunView

DEPLOYMENT = "image-to-3d/image-to-3d"
T = TypeVar("T")
ATTEMPTS_ARTIFACT_PREFIX = "webhook-"


class DeploymentMissing(LookupError):
    """The Prefect server has no ``image-to-3d`` deployment (the web server answers 503)."""


_known_deployment: dict[tuple[str, str], UUID] = {}  # (API URL, name) → its id when last read (``read`` checks it)


def _deployment_id(client: Any, cached: bool = False) -> UUID:
    """The ``image-to-3d`` deployment's id: read from the API, or with ``cached`` the id read last (a caller that
    finds a run of another deployment reads it again: the deployment may have been registered anew)."""
    from prefect.exceptions import ObjectNotFound

    key = (str(client.api_url), DEPLOYMENT)
    if cached and key in _known_deployment:
        return _known_deployment[key]
    try:
        _known_deployment[key] = client.read_deployment_by_name(DEPLOYMENT).id
    except ObjectNotFound:
        raise DeploymentMissing(f"the Prefect server has no {DEPLOYMENT} deployment: register it with "
                                "`prefect deploy --all` (or start the local stack with `sam3d-pipeline up`)") from None
    return _known_deployment[key]


def _iso(value: Any) -> str:
    return value.isoformat() if value is not None else ""


def view(run: Any) -> RunView:
    """The job API's view of a Prefect flow run."""
    state = run.state
    updated = max((t for t in (run.updated, state.timestamp if state else None) if t is not None), default=None)
    return RunView(
        id=str(run.id),
        state_type=state.type.value if state else "SCHEDULED",
        state_name=state.name if state else "Scheduled",
        state_message=(state.message or None) if state else None,
        created_at=_iso(run.created),
        updated_at=_iso(updated),
        parameters=dict(run.parameters or {}),
        labels=dict(run.labels or {}),
        tags=tuple(run.tags or ()),
    )


def _uuid(job_id: str) -> UUID | None:
    try:
        return UUID(str(job_id))
    except ValueError:
        return None


def find_by_idempotency_key(key: str) -> RunView | None:
    """The job created earlier with this (already namespaced) idempotency key, if any."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey

    with _client() as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[key])),
            limit=1)
    return view(runs[0]) if runs else None


def create(parameters: dict[str, Any], labels: dict[str, str], tags: Iterable[str],
           idempotency_key: str | None) -> tuple[RunView, bool]:
    """Create the job's flow run (or find the one created earlier with ``idempotency_key``).

    Returns:
        (the run, True when this call created it). Prefect answers an existing key with the existing run; the
        ``sam3d.request_id`` label in ``labels`` (new for every call) tells the two apart.

    Raises:
        DeploymentMissing: no ``image-to-3d`` deployment.
        PrefectUnreachable: the API is not set or does not answer.
    """
    with _client() as client:
        run = client.create_flow_run_from_deployment(
            _deployment_id(client), parameters=parameters, labels=labels, tags=list(tags),
            idempotency_key=idempotency_key)
    created = (run.labels or {}).get(LABEL_REQUEST_ID) == labels[LABEL_REQUEST_ID]
    if created:
        wake_worker()  # the local stack's worker starts it now, not at its next poll
    return view(run), created


def read(job_id: str) -> RunView | None:
    """The job's run, or None when there is no such run of the ``image-to-3d`` deployment."""
    from prefect.exceptions import ObjectNotFound

    run_id = _uuid(job_id)
    if run_id is None:
        return None
    with _client() as client:
        try:
            run = client.read_flow_run(run_id)
        except ObjectNotFound:
            return None
        # The deployment's id as last read (a job's page polls this ~4 times a second), else read again.
        if run.deployment_id != _deployment_id(client, cached=True) and run.deployment_id != _deployment_id(client):
            return None
    return view(run)


async def next_state_change(job_id: str, timeout_s: float, changed: Callable[[], T | None]) -> T | None:
    """Wait up to ``timeout_s`` for the job's run to enter a state in which ``changed()`` (called in a worker
    thread, after every state change) returns something, and return it; None at the timeout.

    The changes come from Prefect's event stream (the API's ``/events/out`` websocket, filtered to this run's
    state events), so the answer leaves within tens of milliseconds of the state change instead of at a client's
    next poll. ``changed()`` is also called once the stream is open, for a change that came before it. Without the
    stream (it cannot be opened, or it breaks), ``changed()`` is called every 0.25 s instead.
    """
    import anyio

    run_id = _uuid(job_id)
    with anyio.move_on_after(timeout_s):
        if run_id is not None:
            try:
                async with _state_events(run_id) as events:
                    if (found := await anyio.to_thread.run_sync(changed)) is not None:
                        return found
                    async for _event in events:
                        if (found := await anyio.to_thread.run_sync(changed)) is not None:
                            return found
            except Exception:  # noqa: BLE001 (no event stream, e.g. one that is switched off: poll instead)
                pass
        while (found := await anyio.to_thread.run_sync(changed)) is None:
            await anyio.sleep(0.25)
        return found
    return None


def _state_events(run_id: UUID) -> Any:
    """A subscriber to the state changes of one flow run, from now on (no replay of earlier events)."""
    from datetime import UTC, datetime

    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    return get_events_subscriber(filter=EventFilter(
        occurred=EventOccurredFilter(since=datetime.now(UTC)),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
        event=EventNameFilter(prefix=["prefect.flow-run."], exclude_prefix=["prefect.flow-run.heartbeat",
                                                                            "prefect.flow-run.pull-step"])))


def list_runs(state_types: Iterable[str] | None, limit: int, offset: int = 0) -> list[RunView]:
    """Runs of the ``image-to-3d`` deployment, newest first, optionally only in ``state_types``."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with _client() as client:
        deployment = _deployment_id(client)
        run_filter = FlowRunFilter()
        if state_types is not None:
            run_filter = FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType(t) for t in state_types])))
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment])),
            flow_run_filter=run_filter, sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit, offset=offset)
    return [view(r) for r in runs]


def cancel(run: RunView) -> RunView:
    """Cancel a job that has not ended: at once when no process runs it (queued, or a suspended review), else
    through ``Cancelling`` (its worker stops the process, then marks the run Cancelled)."""
    from prefect.states import Cancelled, Cancelling

    idle = run.state_type == "SCHEDULED" or (run.state_type == "PAUSED" and run.state_name == "Suspended")
    with _client() as client:
        state = Cancelled(message="cancelled through the job API") if idle else \
            Cancelling(message="cancel requested through the job API")
        client.set_flow_run_state(UUID(run.id), state, force=idle)
        return view(client.read_flow_run(UUID(run.id)))


def ended_with_webhook_due(limit: int = 200) -> list[RunView]:
    """Jobs in a final state whose webhook is not settled yet (tag ``sam3d-webhook-pending``), oldest first."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with _client() as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[WEBHOOK_PENDING_TAG]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(t) for t in FINAL_STATE_TYPES]))),
            sort=FlowRunSort.END_TIME_DESC, limit=limit)
    return [view(r) for r in reversed(runs)]


def settle(job_id: str) -> None:
    """Remove the ``sam3d-webhook-pending`` tag: the loop stops looking at this job."""
    with _client() as client:
        run = client.read_flow_run(UUID(job_id))
        client.update_flow_run(run.id, tags=[t for t in run.tags if t != WEBHOOK_PENDING_TAG])


def _artifact_key(job_id: str) -> str:
    return f"{ATTEMPTS_ARTIFACT_PREFIX}{job_id}"


def read_attempts(job_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Job id → its recorded webhook attempts (the latest version of its table artifact; [] when none)."""
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    keys = {_artifact_key(j): j for j in job_ids}
    found: dict[str, list[dict[str, Any]]] = {j: [] for j in keys.values()}
    if not keys:
        return found
    with _client() as client:
        latest = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=list(keys))),
            limit=len(keys))
    for artifact in latest:
        data = artifact.data
        rows = json.loads(data) if isinstance(data, str) else data
        found[keys[artifact.key]] = list(rows or [])
    return found


def write_attempts(job_id: str, attempts: list[dict[str, Any]]) -> None:
    """Record every attempt so far as a new version of the run's ``webhook-<id>`` table artifact."""
    from prefect.client.schemas.actions import ArtifactCreate

    last = attempts[-1] if attempts else {}
    verdict = "delivered" if last.get("ok") else f"attempt {len(attempts)} failed"
    with _client() as client:
        client.create_artifact(ArtifactCreate(
            key=_artifact_key(job_id), type="table", data=json.dumps(attempts), flow_run_id=UUID(job_id),
            description=f"Webhook deliveries of this job: {verdict}"))
