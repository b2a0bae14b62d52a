"""Prefect settings for flows run inside this process on Prefect's ephemeral API (`sam3d-pipeline run` and
`catalog` without ``PREFECT_API_URL``, `make demo`)."""

import os
from collections.abc import Iterator
from contextlib import contextmanager

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
