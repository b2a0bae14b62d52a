"""Retry policy: only transient errors (S3 5xx/throttling, connection resets) are retried, with backoff."""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from sam3d_pipeline.errors import is_transient
from sam3d_pipeline.settings import Settings


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry when the task failed with a transient error, never otherwise."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 - we only classify the stored exception
        return is_transient(exc)
    return False


def retry_options(settings: Settings) -> dict[str, Any]:
    """``task.with_options(**retry_options(s))``: retries and exponential backoff from settings."""
    return {
        "retries": settings.task_retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=settings.task_retry_delay_s)
        if settings.task_retry_delay_s > 0
        else 0,
        "retry_jitter_factor": 0.2 if settings.task_retry_delay_s > 0 else None,
        "retry_condition_fn": retry_if_transient,
    }
