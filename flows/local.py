"""Prefect settings for flows run inside this process on Prefect's ephemeral API (`sam3d-pipeline run` and
`catalog` without ``PREFECT_API_URL``, `make demo`)."""

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings


def uses_ephemeral_api() -> bool:
    """True when no Prefect server is configured: Prefect starts a temporary one inside this process."""
    from prefect.settings import PREFECT_API_URL

    return not (os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value())


@contextmanager
def local_run_settings() -> Iterator[None]:
    """Flow-run heartbeats off for the runs inside this block.

    Heartbeats let a Prefect server mark a run whose process died as crashed; a temporary API server dies with
    the process, so nothing would read them. They also cost about 1 s per flow run: Prefect 3.9's heartbeat
    thread sleeps in one-second steps and every flow run waits for it to stop. Deployed runs (on a worker, with
    a real server) keep Prefect's heartbeats.
    """
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


class LocalApiDidNotStart(RuntimeError):
    """Prefect's temporary API server did not start in time."""


@contextmanager
def cli_run_settings() -> Iterator[None]:
    """What `sam3d-pipeline run` and `catalog` run their flow in: :func:`local_run_settings` on the embedded
    default, Prefect's own settings when a server is configured. A temporary API server that does not start
    becomes :class:`LocalApiDidNotStart`, with what to change."""
    try:
        with local_run_settings() if uses_ephemeral_api() else nullcontext():
            yield
    except RuntimeError as exc:
        if isinstance(exc, LocalApiDidNotStart) or "ephemeral Prefect API" not in str(exc):
            raise
        raise LocalApiDidNotStart(
            f"Prefect's local API server did not start ({exc}); set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
            "higher, or PREFECT_API_URL to a running Prefect server") from exc
