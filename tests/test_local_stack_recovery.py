"""`up` after an `up` that was killed while starting, and a Prefect server that answers 503 while it warms up."""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sam3d_pipeline.stack import local as localstack
from sam3d_pipeline.stack.local import LocalStack, _alive, _start_time, complete, stop_leftovers
from sam3d_pipeline.stack.unresponsive import unresponsive_runs_automation


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "120"], start_new_session=True)


def _record(state_dir, processes: dict, env: dict | None = None) -> dict:
    recorded = {"processes": {name: {"pid": p.pid, "start_time": _start_time(p.pid), "log": "x"}
                              for name, p in processes.items()}}
    if env is not None:
        recorded["env"] = env
    (state_dir / localstack.STACK_FILE).write_text(json.dumps(recorded))
    return recorded


def test_a_stack_whose_up_did_not_finish_is_incomplete_and_its_leftovers_are_stopped(tmp_path):
    moto, server = _sleeper(), _sleeper()
    try:
        recorded = _record(tmp_path, {"moto": moto, "prefect-server": server})  # killed before the env was written
        assert localstack.running(tmp_path) and not complete(recorded)
        lines = stop_leftovers(tmp_path)
        assert sorted(lines) == [f"stopped moto (pid {moto.pid})", f"stopped prefect-server (pid {server.pid})"]
        assert moto.wait(timeout=20) is not None and server.wait(timeout=20) is not None
        assert localstack.running(tmp_path) is None and not (tmp_path / localstack.STACK_FILE).exists()
    finally:
        for proc in (moto, server):
            proc.kill()


def test_a_finished_stack_is_complete_until_a_part_is_gone(tmp_path):
    moto, bridge = _sleeper(), _sleeper()
    try:
        recorded = _record(tmp_path, {"moto": moto, "events-bridge": bridge}, env={"SAM3D_WEB_URL": "http://x"})
        assert complete(recorded)
        bridge.kill()
        bridge.wait()
        assert not _alive(recorded["processes"]["events-bridge"]) and not complete(recorded)
    finally:
        moto.kill()


def test_up_stops_an_incomplete_stack_and_starts_again(tmp_path, monkeypatch, capsys):
    from sam3d_pipeline.cli import stack as stack_cli

    left = _sleeper()
    _record(tmp_path, {"moto": left})
    started = []
    env = {k: "v" for k in ("PREFECT_UI_URL", "PREFECT_API_URL", "AWS_ENDPOINT_URL", "SAM3D_BUCKET",
                            "SAM3D_UPLOAD_PREFIX", "SAM3D_OUTPUT_ROOT", "SAM3D_WEB_URL", "SAM3D_API_TOKEN",
                            "SAM3D_REVIEW_PAGE_URL", "SAM3D_REVIEW_TOKEN")}
    monkeypatch.setattr(LocalStack, "up", lambda self: started.append(self.config.state_dir) or env)
    monkeypatch.setattr("sam3d_pipeline.web.assets.ensure_browser_packages", lambda: [])
    try:
        stack_cli.up(state_dir=tmp_path)
    except SystemExit:
        pass
    finally:
        left.kill()
    assert started == [tmp_path]
    assert left.wait(timeout=20) is not None
    assert f"stopped moto (pid {left.pid})" in capsys.readouterr().err


def test_the_automation_is_created_through_a_server_that_answers_503_at_first(monkeypatch):
    monkeypatch.setattr(localstack.time, "sleep", lambda s: None)
    calls: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.answer(422, b'{"detail": "CSRF protection is disabled."}')  # as a Prefect server without CSRF

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            calls.append(("POST", self.path))
            busy = len(calls) <= 2
            body = b"" if busy else (b"[]" if self.path.endswith("/filter") else f'{{"id": "{uuid.uuid4()}"}}'.encode())
            self.answer(503 if busy else 200, body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        LocalStack._replace_automation(f"http://127.0.0.1:{server.server_port}/api", unresponsive_runs_automation(30))
    finally:
        server.shutdown()
    assert calls[-1] == ("POST", "/api/automations/") and len(calls) == 4


def test_the_stack_database_auto_is_postgres_where_installed_unless_the_state_dir_has_sqlite(tmp_path, monkeypatch):
    from sam3d_pipeline.stack import db
    from sam3d_pipeline.stack.local import StackConfig

    def stack(name: str, **kw) -> LocalStack:
        return LocalStack(StackConfig(state_dir=tmp_path / name, project_dir=tmp_path, **kw))

    monkeypatch.setattr(db, "installed", lambda: True)
    assert stack("new").database == "postgres"
    assert stack("chosen", db="sqlite").database == "sqlite"
    old = stack("old")
    old.prefect_home.mkdir(parents=True)
    (old.prefect_home / "prefect.db").touch()  # an earlier `up` on SQLite: its runs stay where they are
    assert old.database == "sqlite"
    monkeypatch.setattr(db, "installed", lambda: False)
    assert stack("bare").database == "sqlite"
    assert stack("asked", db="postgres").database == "postgres"  # asked for: its start says what is missing


def test_up_marks_the_gpu_sessions_a_stopped_stack_left_running_as_crashed(prefect_server):
    # `down` stops a session's process without a word to Prefect: its run stayed Running and held a session slot.
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Completed, Pending, Running

    from sam3d_pipeline.stack.local import crash_stopped_sessions

    name = f"sessions-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("session-probe")
        deployment = client.create_deployment(flow_id=flow_id, name=name, entrypoint="probe.py:probe")
        runs = {state: client.create_flow_run_from_deployment(deployment) for state in ("running", "pending",
                                                                                         "completed", "scheduled")}
        for state, new in (("running", Running()), ("pending", Pending()), ("completed", Completed())):
            client.set_flow_run_state(runs[state].id, new, force=True)
        other = client.create_flow_run_from_deployment(
            client.create_deployment(flow_id=flow_id, name=f"{name}-other", entrypoint="probe.py:probe"))
        client.set_flow_run_state(other.id, Running(), force=True)

        assert crash_stopped_sessions(PREFECT_API_URL.value(), name) == 2
        after = {state: client.read_flow_run(run.id).state for state, run in runs.items()}
        assert after["running"].type.value == after["pending"].type.value == "CRASHED"
        assert "stopped" in after["running"].message
        assert after["completed"].type.value == "COMPLETED"  # an ended session stays as it ended
        assert after["scheduled"].type.value == "SCHEDULED"  # one not started yet starts with the new stack
        assert client.read_flow_run(other.id).state.type.value == "RUNNING"  # another deployment's run: untouched
        assert crash_stopped_sessions(PREFECT_API_URL.value(), name) == 0
