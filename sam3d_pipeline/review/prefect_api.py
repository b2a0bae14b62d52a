"""Every Prefect API call the review server makes, in one place."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from .policy import CONTEXT_KEY, ReviewContext


class RunNotReviewable(LookupError):
    """The flow run does not exist or is not waiting for a review."""


def list_paused_runs(limit: int = 100) -> list[dict[str, Any]]:
    """Paused ``image-to-3d`` runs, newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
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
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
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
    """
    from prefect.flow_runs import resume_flow_run

    try:
        resume_flow_run(run_id, run_input=answer)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None
