"""A long review of a deployed run pauses in process first (an answer then resumes it at once), then suspends
(its process exits), and the resumed run reuses the persisted segmentation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .photos import encode, object_photo
from .test_review_flow import _schema_saved

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
ROOT = Path(__file__).resolve().parent.parent
SERVE = "from flows.image_to_3d import image_to_3d; image_to_3d.serve(name='suspend-test')"


def _wait(client, run_id, predicate, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if predicate(run):
            return run
        time.sleep(0.5)
    raise TimeoutError(f"flow run {run_id} stuck in {run.state.name if run.state else None}: {run.state.message}")


@pytest.mark.parametrize("answer_while", ["suspended", "paused"])
def test_long_review_pauses_then_suspends_and_resumes_without_resegmenting(tmp_path, answer_while):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL

    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(object_photo()[0]))
    env = os.environ | {
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "SAM3D_REVIEW_SUSPEND_AFTER_S": "2" if answer_while == "suspended" else "300",
        "PYTHONPATH": str(ROOT),
    }
    serve = subprocess.Popen([sys.executable, "-c", SERVE], env=env, cwd=ROOT, start_new_session=True,
                             stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.read_deployment_by_name("image-to-3d/suspend-test")
                    break
                except Exception:  # noqa: BLE001 - not registered yet
                    assert time.monotonic() < deadline and serve.poll() is None, "serve() did not register"
                    time.sleep(0.5)
            run = run_deployment(
                "image-to-3d/suspend-test", timeout=0,
                parameters={"image": str(photo), "prompt": "thing", "output_root": str(tmp_path / "out"),
                            "review": "required", "review_timeout_s": 600},
            )
            paused = _wait(client, run.id, lambda r: r.state.is_paused() and _schema_saved(client, r))
            assert paused.state.name == "Paused"  # in process first
            if answer_while == "suspended":
                paused = _wait(client, run.id, lambda r: r.state.name == "Suspended")
            resume_flow_run(run.id, run_input={"action": "approve"})
            done = _wait(client, run.id, lambda r: r.state.is_final())
            assert done.state.is_completed(), done.state.message
            segment_runs = [
                t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
                if t.task_key.startswith("segment") or t.name.startswith("segment")
            ]
    finally:
        os.kill(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)
    [prefix] = list((tmp_path / "out").iterdir())
    result = json.loads((prefix / "result.json").read_text())
    assert result["status"] == "completed"
    assert len(segment_runs) == 1, [t.name for t in segment_runs]  # not recomputed after the resume
    # Suspended: the run re-executed and reused round 1's persisted segmentation; paused: it simply went on.
    reused = any("reused the persisted segmentation" in m for m in result["messages"])
    assert reused == (answer_while == "suspended"), result["messages"]
