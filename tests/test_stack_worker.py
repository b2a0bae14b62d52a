"""The local stack's CPU worker (``stack/worker.py``): Prefect's process worker that also polls when woken, and the
job API's wait for a job's next status (``prefect_jobs.next_state_change``), both against a real Prefect server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from sam3d_pipeline.stack.worker import WAKE_ENV, wake


def test_wake_without_a_worker_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.delenv(WAKE_ENV, raising=False)
    assert wake() is False  # no socket configured
    assert wake(str(tmp_path / "nobody.sock")) is False  # nobody listening: no error, no wait


def _state(client, run_id) -> str:
    return client.read_flow_run(run_id).state.type.value


def test_a_woken_worker_submits_a_new_run_at_once_not_at_its_next_poll(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    pool = f"wake-{uuid.uuid4().hex[:8]}"
    path = str(tmp_path / "wake.sock")
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = client.create_flow_from_name("wake-probe")
        # The run's process only has to start: `true` stands for `python -m prefect.engine`.
        deployment = client.create_deployment(flow_id=flow_id, name="wake", work_pool_name=pool,
                                              entrypoint="probe.py:probe", job_variables={"command": "true"})
        env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(), WAKE_ENV: path,
                            "PREFECT_WORKER_QUERY_SECONDS": "300"}  # its own next poll: minutes away
        proc = subprocess.Popen([sys.executable, "-m", "sam3d_pipeline.stack.worker", "--pool", pool, "--name",
                                 "wake-probe", "--limit", "2"], env=env, cwd=tmp_path,
                                stdout=(tmp_path / "worker.log").open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            # Registered, and its first poll for runs made (the pool's queue records it): the next is minutes away.
            while not (client.read_workers_for_work_pool(pool)
                       and all(q.last_polled for q in client.read_work_queues(work_pool_name=pool))):
                assert proc.poll() is None, (tmp_path / "worker.log").read_text()
                assert time.monotonic() < deadline, "the worker never polled"
                time.sleep(0.2)
            assert os.stat(path).st_mode & 0o777 == 0o600
            run = client.create_flow_run_from_deployment(deployment)
            time.sleep(1.5)
            assert _state(client, run.id) == "SCHEDULED"  # no poll yet
            woken_at = time.monotonic()
            assert wake(path) is True
            while _state(client, run.id) == "SCHEDULED" and time.monotonic() - woken_at < 30:
                time.sleep(0.05)
            assert _state(client, run.id) != "SCHEDULED"
            assert time.monotonic() - woken_at < 30
        finally:  # as `down` stops it: SIGTERM to its process group, SIGKILL after a grace period
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.mark.parametrize("change", [True, False])
def test_the_wait_for_a_jobs_next_state_answers_from_the_event_stream(prefect_server, change):
    """With a state change, the wait returns it; without one, it returns None at the timeout, having read the run
    once (when the stream opened) and not every 0.25 s, as the fallback without a stream would."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from sam3d_pipeline.web.prefect_jobs import next_state_change

    with get_client(sync_client=True) as client:
        run_id = client.create_flow_run(_probe_flow()).id
    reads = []

    def changed():
        with get_client(sync_client=True) as c:
            state = _state(c, run_id)
        reads.append(state)
        return state if state == "RUNNING" else None

    async def scenario():
        waiting = asyncio.create_task(next_state_change(str(run_id), 3.0 if change else 2.0, changed))
        await asyncio.sleep(1.0)
        if change:
            with get_client(sync_client=True) as c:
                c.set_flow_run_state(run_id, Running(), force=True)
            set_at = time.monotonic()
            found = await waiting
            return found, time.monotonic() - set_at
        return await waiting, None

    found, after_s = asyncio.run(scenario())
    if change:
        assert found == "RUNNING"
        assert after_s < 1.5
    else:
        assert found is None
        assert len(reads) == 1  # read once, when the stream opened: no polling every 0.25 s


def _probe_flow():
    from prefect import flow

    @flow(name="state-wait-probe")
    def probe() -> None:
        return None

    return probe


REUSED = """
import json
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from prefect.settings.models.root import Settings
from sam3d_pipeline.stack.worker import reuse_settings_environment

calls = []
computed = Settings.to_environment_variables
def counted(self, *args, **kwargs):  # Prefect's own, counted
    calls.append(id(self))
    return computed(self, *args, **kwargs)
Settings.to_environment_variables = counted

settings = get_current_settings()
before = settings.to_environment_variables(exclude_unset=True)
calls.clear()
reuse_settings_environment()
reuse_settings_environment()  # once is enough: not wrapped twice
first = settings.to_environment_variables(exclude_unset=True)
first["CHANGED_BY_A_CALLER"] = "x"
second = settings.to_environment_variables(exclude_unset=True)
computed_once = calls == [id(settings)]
with temporary_settings(updates={PREFECT_API_URL: "http://changed.invalid/api"}):
    changed = get_current_settings().to_environment_variables(exclude_unset=True)
print(json.dumps({"computed_once": computed_once, "same": second == before,
                  "fresh_dict": "CHANGED_BY_A_CALLER" not in second,
                  "all": settings.to_environment_variables() == get_current_settings().to_environment_variables(),
                  "api": before.get("PREFECT_API_URL"), "changed_api": changed.get("PREFECT_API_URL")}))
"""


def test_the_worker_computes_its_settings_environment_once_per_settings_object():
    # Process-wide (as in the worker): run it in a process of its own.
    import json

    env = os.environ | {"PREFECT_API_URL": "http://127.0.0.1:9/api"}
    out = subprocess.run([sys.executable, "-c", REUSED], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["computed_once"]  # two calls on one settings object: Prefect's serialisation ran once
    assert seen["same"] and seen["fresh_dict"] and seen["all"]
    assert seen["api"] == "http://127.0.0.1:9/api"
    assert seen["changed_api"] == "http://changed.invalid/api"  # a changed setting is a new object: computed again
