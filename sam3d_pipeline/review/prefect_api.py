"""Every Prefect API call the review server makes, in one place.

The review server only ever talks to a configured Prefect server (``PREFECT_API_URL``): with none set,
Prefect's client would quietly start a temporary server of its own, with no runs in it, so every call here
refuses instead. A call that cannot reach the API raises :class:`PrefectUnreachable` (the server answers 503).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from sam3d_pipeline.review.policy import CONTEXT_KEY, ReviewContext
from sam3d_pipeline.stack.worker import wake as wake_worker

HEALTH_TIMEOUT_S = 5.0
# Statuses a proxy or load balancer in front of Prefect answers when the API behind it is gone.
_GONE_STATUSES = frozenset({502, 503, 504})


class RunNotReviewable(LookupError):
    """The flow run does not exist or is not waiting for a review."""


class PrefectUnreachable(Exception):
    """``PREFECT_API_URL`` is not set, or the Prefect API there does not answer.

    Attributes:
        url: the API URL (None when not set).
        reason: what went wrong, in words.
    """

    def __init__(self, url: str | None, reason: str) -> None:
        self.url = url
        self.reason = reason
        if url is None:
            super().__init__(f"PREFECT_API_URL is not set: {reason}")
        else:
            super().__init__(f"Prefect API at {url} is not reachable: {reason}")


def api_url() -> str | None:
    """The Prefect API URL in effect (environment, profile or temporary settings), or None."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _required_url() -> str:
    url = api_url()
    if url is None:
        raise PrefectUnreachable(None, "the review server needs the API of a Prefect server "
                                       "(e.g. PREFECT_API_URL=http://127.0.0.1:4200/api)")
    return url


def _reason(exc: BaseException) -> str:
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):  # the client's own message spans lines and links to MDN
        response = exc.response
        return f"{response.request.method} {response.request.url.path} answered {response.status_code} " \
               f"{response.reason_phrase}".rstrip()
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def _reachable(url: str) -> Iterator[None]:
    """Turn a transport failure (refused, reset, timed out) or a gateway status into ``PrefectUnreachable``."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    try:
        yield
    except httpx.TransportError as exc:
        raise PrefectUnreachable(url, _reason(exc)) from exc
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code in _GONE_STATUSES:
            raise PrefectUnreachable(url, _reason(exc)) from exc
        raise


@contextmanager
def _client() -> Iterator[Any]:
    """A sync Prefect client for the configured API (never an ephemeral one)."""
    from sam3d_pipeline.prefect_client import sync_client

    url = _required_url()
    with _reachable(url), sync_client() as client:
        yield client


def check_api(timeout_s: float = HEALTH_TIMEOUT_S) -> str:
    """Ask the configured Prefect API's health endpoint once (no retries).

    Returns:
        The API URL.

    Raises:
        PrefectUnreachable: ``PREFECT_API_URL`` is not set, or the API did not answer in time or said it is
            not healthy.
    """
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from sam3d_pipeline.prefect_client import sync_client

    url = _required_url()
    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}), sync_client(timeout=timeout_s) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise PrefectUnreachable(url, _reason(error))
    return url


def list_paused_runs(limit: int = 100) -> list[dict[str, Any]]:
    """Paused ``image-to-3d`` runs, newest first.

    Raises:
        PrefectUnreachable: the API is not set or does not answer.
    """
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with _client() as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["image-to-3d"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))),
            sort=FlowRunSort.START_TIME_DESC,
            limit=limit,
        )
    return [
        {
            "id": str(run.id),
            "name": run.name,
            "image": run.parameters.get("image"),
            "prompt": run.parameters.get("prompt"),
            "pause_key": run.state.state_details.pause_key if run.state else None,
            "paused_at": run.state.timestamp.isoformat() if run.state else None,
        }
        for run in runs
    ]


def review_context(run_id: UUID) -> ReviewContext:
    """The context of the round the run is paused in.

    Raises:
        RunNotReviewable: unknown run, not paused, or not paused for a review.
        PrefectUnreachable: the API is not set or does not answer.
    """
    from prefect.exceptions import ObjectNotFound

    with _client() as client:
        try:
            run = client.read_flow_run(run_id)
        except ObjectNotFound:
            raise RunNotReviewable(f"flow run {run_id} not found") from None
        if run.state is None or not run.state.is_paused():
            state = run.state.name if run.state else "unknown"
            raise RunNotReviewable(f"flow run {run_id} is not waiting for review (state {state})")
        key = run.state.state_details.pause_key or ""
        if not key.startswith("review-round-"):
            raise RunNotReviewable(f"flow run {run_id} is paused, but not for a mask review")
        round_number = key.removeprefix("review-round-")
        try:
            value = client.read_flow_run_input(run_id, f"{CONTEXT_KEY}-r{round_number}")
        except ObjectNotFound:
            raise RunNotReviewable(f"flow run {run_id} has no review context yet; retry in a moment") from None
    return ReviewContext.model_validate_json(value)


def resume(run_id: UUID, answer: dict[str, Any]) -> None:
    """Resume the paused run with ``answer``.

    Raises:
        ValueError: the Prefect server refused the answer (it validates against the round's schema).
        RunNotReviewable: the run is no longer paused (answered elsewhere, or timed out).
        PrefectUnreachable: the API is not set or does not answer.
    """
    from prefect.exceptions import FlowPauseTimeout, NotPausedError
    from prefect.flow_runs import resume_flow_run

    url = _required_url()
    try:
        with _reachable(url):
            resume_flow_run(run_id, run_input=answer)
        wake_worker()  # a suspended run is Scheduled again: the local stack's worker starts it now
    except (NotPausedError, FlowPauseTimeout):
        raise RunNotReviewable(f"flow run {run_id} is no longer waiting for review") from None
    except RuntimeError as exc:  # the server's reason for refusing the answer
        raise ValueError(str(exc)) from None
