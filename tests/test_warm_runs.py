"""Warm flow-run processes (``stack/warm_runs.py``): the launcher's run happens in a child forked from the server,
with the launcher's streams, directory, environment and exit status; signals reach it; a dead launcher's child
is ended; without a server the launcher runs the module itself. Servers are stopped by PID."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

PROBE = """
import json, os, sys, time
print(json.dumps({"cwd": os.getcwd(), "marker": os.environ.get("PROBE_MARKER"), "argv": sys.argv[1:],
                  "pid": os.getpid(), "ppid": os.getppid(), "api": _api(),
                  "frozen": __import__("gc").get_freeze_count(), "built": _built()}), flush=True)
if os.environ.get("PROBE_MODE") == "sleep":
    time.sleep(120)
sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
"""
API_PROBE = """
def _api():
    if "boto3" in __import__("sys").modules:  # the warm default session: kept, or dropped for other credentials
        return str(__import__("boto3").DEFAULT_SESSION is not None)
    if "prefect.context" not in __import__("sys").modules:
        return None
    from prefect.settings import get_current_settings
    return str(get_current_settings().api.url)

def _built():  # the flow run model's schema (Prefect builds it on first use) and the clients' TLS context
    if "prefect.context" not in __import__("sys").modules and not __import__("os").environ.get("PROBE_BUILT"):
        return None
    from prefect.client.schemas.objects import FlowRun
    from sam3d_pipeline.prefect_client import _context
    return [FlowRun.__pydantic_complete__, _context.cache_info().currsize]
"""
LAUNCH = "import sys; from sam3d_pipeline.stack.warm_runs import launch; sys.exit(launch('probe_run'))"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(tmp_path):
    """A warm-runs server preloading Prefect; yields (socket path, server process)."""
    yield from _serve(tmp_path, "prefect,prefect.context")


def _serve(tmp_path: Path, preload: str, **env: str):
    (tmp_path / "probe_run.py").write_text(API_PROBE + PROBE)
    path = str(tmp_path / "warm.sock")
    env = os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
                        "PREFECT_API_URL": "http://server.invalid/api"} | env
    proc = subprocess.Popen([sys.executable, "-m", "sam3d_pipeline.stack.warm_runs", "serve", path, preload],
                            env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert "ready on" in proc.stdout.readline()
        yield path, proc
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        assert not os.path.exists(path)  # the server removed its socket


def _launch(tmp_path: Path, path: str, **env: str) -> subprocess.Popen:
    cwd = tmp_path / "work"
    cwd.mkdir(exist_ok=True)
    full = os.environ | {"SAM3D_WARM_RUNS_SOCKET": path, "PROBE_MARKER": "from-the-launcher",
                         "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
                         "PREFECT_API_URL": "http://launcher.invalid/api"} | env
    return subprocess.Popen([sys.executable, "-c", LAUNCH], env=full, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_the_run_is_a_warm_child_with_the_launchers_streams_directory_environment_and_status(server, tmp_path):
    path, proc = server
    launcher = _launch(tmp_path, path, PROBE_EXIT="7")
    out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 7, err
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["ppid"] == proc.pid  # forked from the server, not started by the launcher
    assert seen["cwd"] == str(tmp_path / "work") and seen["marker"] == "from-the-launcher"
    assert seen["api"] == "http://launcher.invalid/api"  # Prefect's settings read again from the run's environment
    # The server's objects (Prefect's, preloaded) sit in the collector's permanent generation: the run's collections
    # and its exit skip them rather than copy the server's heap page by page.
    assert seen["frozen"] > 50_000
    assert seen["built"] == [True, 1]  # built once in the server, before the fork, not in every run


def test_signals_reach_the_run_and_a_dead_launchers_run_is_ended(server, tmp_path):
    path, _ = server
    launcher = _launch(tmp_path, path, PROBE_MODE="sleep")
    child = json.loads(launcher.stdout.readline())["pid"]
    launcher.send_signal(signal.SIGTERM)  # Prefect cancels a run by signalling its infrastructure pid
    assert launcher.wait(timeout=30) == 128 + signal.SIGTERM
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE

    launcher = _launch(tmp_path, path, PROBE_MODE="sleep")
    child = json.loads(launcher.stdout.readline())["pid"]
    launcher.kill()  # the launcher dies without passing anything on
    launcher.wait(timeout=30)
    deadline = time.monotonic() + 15
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the dead launcher's run is still running"
        time.sleep(0.05)


def test_without_a_server_the_launcher_runs_the_module_itself(tmp_path):
    (tmp_path / "probe_run.py").write_text(API_PROBE + PROBE)
    launcher = _launch(tmp_path, str(tmp_path / "no-server.sock"), PROBE_EXIT="3", PROBE_BUILT="1")
    out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 3, err
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["pid"] == launcher.pid  # exec'd in place: the worker's pid is the run's
    assert seen["frozen"] == 0
    assert seen["built"] == [False, 0]  # a run of its own builds them on first use (here: not yet)
    assert seen["marker"] == "from-the-launcher"


def test_the_preloaded_modules_import_and_start_no_python_thread():
    # The server forks after importing them: a thread started by an import would be missing from every run.
    code = ("import importlib, threading; from sam3d_pipeline.stack import warm_runs\n"
            "[importlib.import_module(name) for name in warm_runs.PRELOAD]\n"
            "warm_runs._warm_boto3(); warm_runs._warm_prefect()\n"
            "print(threading.active_count())")
    env = os.environ | {"PYTHONPATH": str(ROOT), "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nobody answers
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "1"


def test_a_run_keeps_the_warm_s3_session_only_with_the_servers_aws_environment(tmp_path):
    aws = {"AWS_ACCESS_KEY_ID": "server-key", "AWS_SECRET_ACCESS_KEY": "server-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    serving = _serve(tmp_path, "boto3", **aws)
    path, _ = next(serving)
    try:
        seen = {}
        for case, env in (("same", aws), ("other key", aws | {"AWS_ACCESS_KEY_ID": "run-key"}),
                          ("other profile", aws | {"AWS_PROFILE": "elsewhere"})):
            launcher = _launch(tmp_path, path, **env)
            out, err = launcher.communicate(timeout=60)
            assert launcher.returncode == 0, err
            seen[case] = json.loads(out.splitlines()[-1])["api"]
        # The session the server made (service models parsed once) is reused only where nothing AWS differs.
        assert seen == {"same": "True", "other key": "False", "other profile": "False"}
    finally:
        serving.close()


def test_changed_code_is_never_run_warm_and_the_server_starts_again_with_it(tmp_path):
    (tmp_path / "probe_dep.py").write_text("VERSION = 1\n")
    serving = _serve(tmp_path, "probe_dep")
    path, proc = next(serving)
    try:
        first = _launch(tmp_path, path)
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0 and json.loads(out.splitlines()[-1])["ppid"] == proc.pid, err

        dep = tmp_path / "probe_dep.py"  # the preloaded module changes on disk
        os.utime(dep, (dep.stat().st_atime, dep.stat().st_mtime + 10))
        second = _launch(tmp_path, path)
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
        assert json.loads(out.splitlines()[-1])["pid"] == second.pid  # refused: the launcher ran it itself

        lines = []  # the server, with no child left, starts again (the same pid, fresh imports)
        while not any(line.startswith("warm-runs: ready on") for line in lines):
            lines.append(proc.stdout.readline())
            assert lines[-1], "the server ended instead of starting again"
        assert any("probe_dep.py changed since" in line for line in lines), lines
        third = _launch(tmp_path, path)
        out, err = third.communicate(timeout=60)
        assert third.returncode == 0 and json.loads(out.splitlines()[-1])["ppid"] == proc.pid, err
    finally:
        serving.close()


def test_a_launcher_of_another_interpreter_or_project_runs_its_module_itself(server, tmp_path, monkeypatch):
    from sam3d_pipeline.stack import warm_runs

    path, _ = server
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{ROOT}")  # as the server's
    assert warm_runs.run_warm(path, "probe_run", [], {"PROBE_EXIT": "5"}) == 5  # served
    with monkeypatch.context() as patch:
        patch.setattr(sys, "executable", "/another/python")
        assert warm_runs.run_warm(path, "probe_run", []) is None
    with monkeypatch.context() as patch:
        patch.setenv("SAM3D_PROJECT_DIR", str(tmp_path / "another-checkout"))
        assert warm_runs.run_warm(path, "probe_run", []) is None
    assert warm_runs.run_warm(str(tmp_path / "nobody.sock"), "probe_run", []) is None


def test_the_pools_command_runs_the_flow_run_in_a_warm_child(server, tmp_path):
    # The work pool's command, as the worker runs it (``-S``: the launcher script needs no installed package).
    from sam3d_pipeline.stack.warm_runs import launcher_command

    path, proc = server
    argv = shlex.split(launcher_command())
    assert argv[1] == "-S" and Path(argv[2]).is_file()
    run_id = str(uuid.uuid4())
    env = os.environ | {"SAM3D_WARM_RUNS_SOCKET": path, "PREFECT__FLOW_RUN_ID": run_id,
                        "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "PREFECT_API_URL": "http://127.0.0.1:9/api",
                        "PREFECT_CLIENT_MAX_RETRIES": "0"}
    launcher = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.stdout.readline().startswith(f"warm-runs: flow run {run_id} in pid ")  # forked by the server
    assert launcher.returncode != 0  # the engine found no API there: its exit status came back to the worker
