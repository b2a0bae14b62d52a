"""Shared fixtures. Servers are started here by the tests that need them and stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest

# Isolate from any real AWS account and keep Prefect quiet and fast before anything imports them.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "SAM3D_TASK_RETRY_DELAY_S": "0",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Commands run by the tests use Prefect's temporary server per command (each test has its own
        # PREFECT_HOME); tests/test_local_api.py covers the reused local server, the default for users.
        "SAM3D_LOCAL_API": "per-run",
    }
)
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("AWS_ENDPOINT_URL", None)

from sam3d_pipeline import backends  # noqa: E402
from sam3d_pipeline.settings import get_settings  # noqa: E402
from sam3d_pipeline.stack.local import _alive, read_stack  # noqa: E402
from sam3d_pipeline.storage import _s3_client  # noqa: E402

from .servers import FaultyProxy, MotoServer, free_port, wait_for_port  # noqa: E402
from .stack import CLI, STACK_MAX_INPUT_BYTES, Stack  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_settings():
    """Each test reads settings from its own environment."""
    get_settings.cache_clear()
    _s3_client.cache_clear()
    backends.clear_cache()
    yield
    get_settings.cache_clear()
    _s3_client.cache_clear()


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def s3(moto_server, monkeypatch):
    """A fresh bucket on the moto server, with ``AWS_ENDPOINT_URL`` pointing at it. Yields (client, bucket)."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    client = boto3.client("s3", endpoint_url=moto_server.url)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    yield client, bucket


@pytest.fixture
def faulty_s3(moto_server, monkeypatch):
    """A fault-injecting proxy in front of moto; botocore's own retries are off so our classification shows."""
    proxy = FaultyProxy(moto_server.url).start()
    monkeypatch.setenv("SAM3D_S3_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("SAM3D_S3_MAX_ATTEMPTS", "1")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server (SQLite) for the session; flows called in-process report to it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REVIEW_TOKEN = "test-token-123"


@pytest.fixture
def review_server():
    from prefect.settings import PREFECT_API_URL

    port = free_port()
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(), "SAM3D_REVIEW_TOKEN": REVIEW_TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "sam3d_pipeline.cli", "review-server", "--port", str(port)],
                            env=env, start_new_session=True)
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One local stack (``sam3d-pipeline up``) for the session, stopped with ``down``, checked by PID."""
    state_dir = tmp_path_factory.mktemp("stack")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_"))}
    env["SAM3D_PROMPT_BY_PREFIX"] = json.dumps({"mugs/": "mug"})
    env["SAM3D_MAX_INPUT_BYTES"] = str(STACK_MAX_INPUT_BYTES)
    up = [*CLI, "up", "--state-dir", str(state_dir), "--prefect-port", "0", "--moto-port", "0", "--upload-prefix", ""]
    started = subprocess.run(up, env=env, capture_output=True, text=True, timeout=300)
    recorded = (read_stack(state_dir) or {}).get("processes", {})
    holder = None
    try:  # whatever fails below, `down` stops what `up` started
        assert started.returncode == 0, started.stdout + started.stderr
        assert "Prefect UI:" in started.stdout
        # PostgreSQL is Prefect's database where it is installed (``up --db auto``), else the SQLite file.
        assert set(recorded) - {"postgres"} == {"moto", "prefect-server", "worker", "warm-runs", "gpu-worker",
                                                "events-bridge", "review-server"}
        holder = Stack(state_dir)
        yield holder
    finally:
        for proc in holder.replacement_bridges if holder else []:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
        stopped = subprocess.run([*CLI, "down", "--state-dir", str(state_dir)], env=env, capture_output=True,
                                 text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        for name in ("moto", "prefect-server", "worker", "warm-runs", "gpu-worker", "review-server",
                     *(["postgres"] if "postgres" in recorded else [])):
            assert f"stopped {name} (pid {recorded[name]['pid']})" in stopped.stdout
        assert not any(_alive(entry) for entry in recorded.values())
        assert not (state_dir / "stack.json").exists()
