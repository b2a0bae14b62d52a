"""The local Prefect API server that `run` and `catalog` reuse on the embedded default (``cli/local_api.py``):
one server for consecutive and concurrent commands, replaced when stale, never orphaned (it stops when idle and a
killed command leaves nothing else behind), and stopped by PID at the end of every test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sam3d_pipeline.cli import local_api
from sam3d_pipeline.samples import sample_path

LITE = ("--segmenter", "lite", "--reconstructor", "lite")


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = os.environ | {"PREFECT_HOME": str(home), "SAM3D_LOCAL_API": "reuse"} | extra
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture
def home(tmp_path):
    """A PREFECT_HOME of its own; whatever server the test leaves is stopped by the PID it recorded."""
    home = tmp_path / "prefect-home"
    yield home
    folder = home / "sam3d-local-api"
    record = local_api.read_record(folder)
    if record is not None and local_api.process_alive(record.pid, record.create_time):
        os.kill(record.pid, signal.SIGKILL)


def _run(home: Path, out: Path, photo: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sam3d_pipeline.cli", "run", photo, "--prompt", "cup", *LITE,
                           "--out", str(out), "--export", "glb"],
                          env=_env(home, **env), capture_output=True, text=True, timeout=300, cwd=out.parent)


def _clock(out: Path) -> dict:
    (result,) = out.glob("*/result.json")
    return json.loads(result.read_text())["clock"]


@pytest.mark.slow
def test_consecutive_runs_share_one_server_which_stops_when_idle(home, tmp_path):
    first = _run(home, tmp_path / "a", str(sample_path("coffee")), SAM3D_LOCAL_API_IDLE_S="8")
    assert first.returncode == 0, first.stderr[-3000:]
    folder = home / "sam3d-local-api"
    record = local_api.read_record(folder)
    assert record is not None and local_api.process_alive(record.pid, record.create_time)
    assert local_api.live_clients(folder) == []  # the command detached when it ended

    warm = _warm_server(folder)
    assert psutil.Process(warm).ppid() == record.pid  # the API server's companion

    second = _run(home, tmp_path / "b", str(sample_path("coffee")), SAM3D_LOCAL_API_IDLE_S="8")
    assert second.returncode == 0, second.stderr[-3000:]
    assert local_api.read_record(folder) == record  # the same server, not a new one
    # The first run paid the server's start inside its Prefect time; the second attached to a running one.
    assert _clock(tmp_path / "b")["prefect_s"] < _clock(tmp_path / "a")["prefect_s"]
    # ... and was forked from the warm server: no interpreter start or imports of its own.
    assert _clock(tmp_path / "a")["process_start_s"] > 0.5
    assert _clock(tmp_path / "b")["process_start_s"] == 0.0
    assert "in pid" in (folder / "warm-cli.log").read_text()
    cold = _run(home, tmp_path / "c", str(sample_path("coffee")), SAM3D_LOCAL_API_IDLE_S="8", SAM3D_WARM_CLI="0")
    assert cold.returncode == 0 and _clock(tmp_path / "c")["process_start_s"] > 0.5  # switched off: runs itself

    status = subprocess.run([sys.executable, "-m", "sam3d_pipeline.cli", "local-api"], env=_env(home),
                            capture_output=True, text=True, timeout=60)
    assert f"pid {record.pid}" in status.stdout and record.url in status.stdout, status.stdout

    deadline = time.monotonic() + 60  # idle 8 s after the last request (the status check above)
    while local_api.process_alive(record.pid, record.create_time):
        assert time.monotonic() < deadline, "the idle server did not stop"
        time.sleep(0.2)
    assert local_api.read_record(folder) is None  # it removed its record
    deadline = time.monotonic() + 30
    while psutil.pid_exists(warm) and psutil.Process(warm).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the warm server outlived the API server"
        time.sleep(0.2)


def _warm_server(folder: Path, timeout_s: float = 120.0) -> int:
    """The pid of the local API's warm server once it is ready (its log says so)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = folder / "warm-cli.log"
        for line in (log.read_text().splitlines() if log.exists() else []):
            if line.startswith("warm-runs: ready on"):
                return int(line.split("(pid ")[1].split(",")[0])
        time.sleep(0.2)
    raise AssertionError("the warm server did not get ready")


def _descendants(pid: int) -> set[tuple[int, float]]:
    try:
        return {(p.pid, p.create_time()) for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


@pytest.mark.slow
def test_a_killed_command_leaves_only_the_reused_server_which_stop_ends(home, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sam3d_pipeline.cli", "run", str(sample_path("coffee")),
                             "--prompt", "cup", *LITE, "--out", str(out)], env=_env(home), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = home / "sam3d-local-api"
    seen: set[tuple[int, float]] = set()
    try:
        deadline = time.monotonic() + 120
        while local_api.read_record(folder) is None or not list((folder / "clients").glob("*")):
            assert proc.poll() is None and time.monotonic() < deadline, "the command never attached"
            seen |= _descendants(proc.pid)
            time.sleep(0.02)
        seen |= _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        record = local_api.read_record(folder)
        server = (record.pid, record.create_time)
        outliving = {server} | _descendants(record.pid)  # the server and its warm companion
        deadline = time.monotonic() + 15
        while {i for i in seen - outliving if local_api.process_alive(*i)}:
            assert time.monotonic() < deadline, "the killed command's other processes are still running"
            time.sleep(0.05)
        assert local_api.process_alive(*server)  # meant to outlive the command
        assert local_api.live_clients(folder) == []  # the killed command no longer counts as attached
    finally:
        proc.kill()

    stopped = subprocess.run([sys.executable, "-m", "sam3d_pipeline.cli", "local-api", "--stop"], env=_env(home),
                             capture_output=True, text=True, timeout=60)
    assert f"stopped the local Prefect API (pid {record.pid})" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not local_api.process_alive(*server)
    assert local_api.read_record(folder) is None
    deadline = time.monotonic() + 15
    while {i for i in outliving if local_api.process_alive(*i)}:
        assert time.monotonic() < deadline, "the warm companion outlived the stopped server"
        time.sleep(0.1)


_ATTACH = """
import sys, time
from sam3d_pipeline.cli import local_api
with local_api.attached(120.0) as record:
    print(record.pid, record.url, flush=True)
    time.sleep(float(sys.argv[1]))
"""


@pytest.mark.slow
def test_concurrent_commands_start_one_server_and_a_stale_record_is_replaced(home):
    env = _env(home)
    procs = [subprocess.Popen([sys.executable, "-c", _ATTACH, "1"], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    answers = {p.communicate(timeout=180)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(answers) == 1, answers  # both attached to the same server
    folder = home / "sam3d-local-api"
    record = local_api.read_record(folder)

    os.kill(record.pid, signal.SIGKILL)  # a server that died without tidying up: its record is stale
    deadline = time.monotonic() + 10
    while local_api.process_alive(record.pid, record.create_time) and time.monotonic() < deadline:
        time.sleep(0.05)
    again = subprocess.run([sys.executable, "-c", _ATTACH, "0"], env=env, capture_output=True, text=True,
                           timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]
    fresh = local_api.read_record(folder)
    assert fresh is not None and fresh.pid != record.pid and again.stdout.split()[0] == str(fresh.pid)


def test_settings_of_the_local_api_are_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("SAM3D_LOCAL_API", "sometimes")
    with pytest.raises(local_api.LocalApiError, match="reuse or per-run"):
        local_api.mode()
    monkeypatch.setenv("SAM3D_LOCAL_API_IDLE_S", "0")
    with pytest.raises(local_api.LocalApiError, match="must be > 0"):
        local_api.idle_s()
    clients = tmp_path / "clients"
    clients.mkdir()
    me = psutil.Process()
    (clients / f"{me.pid}-{me.create_time():.3f}").touch()
    (clients / f"{me.pid}-{me.create_time() - 100:.3f}").touch()  # same pid, another process: ended
    (clients / "junk").touch()
    assert local_api.live_clients(tmp_path) == [f"{me.pid}-{me.create_time():.3f}"]
    assert sorted(p.name for p in clients.iterdir()) == [f"{me.pid}-{me.create_time():.3f}"]
