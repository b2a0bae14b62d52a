"""Flows run on the embedded default (no Prefect server configured) send no flow-run heartbeats; others do."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prefect import flow
from prefect.settings import PREFECT_API_URL

from sam3d_pipeline.cli.local import local_run_settings

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


@flow
def short_flow() -> int:
    return 1


def _heartbeats(run_id) -> int:
    body = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                       "resource": {"id": [f"prefect.flow-run.{run_id}"]},
                       "occurred": {"since": (datetime.now(UTC) - timedelta(hours=1)).isoformat()}}}
    response = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10)
    response.raise_for_status()
    return len(response.json()["events"])


def test_local_runs_send_no_heartbeats_and_default_runs_do():
    with local_run_settings():
        local = short_flow(return_state=True)
    default = short_flow(return_state=True)
    assert local.is_completed() and default.is_completed()
    deadline = time.monotonic() + 60
    while _heartbeats(default.state_details.flow_run_id) == 0:  # events are stored asynchronously
        assert time.monotonic() < deadline, "the default run's heartbeat never arrived"
        time.sleep(0.5)
    assert _heartbeats(local.state_details.flow_run_id) == 0
