"""The local Prefect API that `sam3d-pipeline run` and `catalog` reuse on the embedded default.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server inside every command and stops it at exit:
about 7–12 s of every run on a small machine (importing Prefect's server, migrations, start-up) for a run whose
model work may take 4 s. Instead, the first command starts one server in the background (the same uvicorn
application and environment as Prefect's temporary server, on the same database under ``PREFECT_HOME``) and
every later command attaches to it:

- **Found by a record**: ``$PREFECT_HOME/sam3d-local-api/server.json`` (pid, start time, port, Prefect version,
  Python). A record whose process is gone, is another process (pid reused), does not answer ``/health``, or runs
  another Prefect or Python is replaced. Starting is serialised by a file lock, so two commands started at once
  share one server.
- **Never orphaned**: the server stops itself after ``SAM3D_LOCAL_API_IDLE_S`` seconds without an HTTP request
  and without a live attached command. A command attaches by writing ``clients/<pid>-<start time>`` and removes it
  when it ends; one that was killed is recognised by pid and start time and no longer counts.
- ``SAM3D_LOCAL_API=per-run`` keeps Prefect's own temporary server per command (nothing outlives the command).
- ``sam3d-pipeline local-api`` shows it; ``sam3d-pipeline local-api --stop`` stops it.
- **Warm commands**: next to the server runs a warm-runs server that has imported Prefect, the flows and the
  command line; a later `run` or `catalog` forks from it instead of importing them (:func:`forward_to_warm`).

The server process is ``python -m sam3d_pipeline.cli.local_api serve``; it carries ``OUTLIVES_ENV`` in its
environment, which tells the command's process guard (``cli/local.py``) that it is meant to outlive the command.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

MODES = ("reuse", "per-run")
DEFAULT_IDLE_S = 600.0
OUTLIVES_ENV = "SAM3D_OUTLIVES_COMMAND"  # in the server's environment: the command's process guard leaves it alone
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


class LocalApiError(RuntimeError):
    """The local API server could not be started or reached."""


def mode() -> str:
    value = os.environ.get("SAM3D_LOCAL_API", "reuse").strip().lower() or "reuse"
    if value not in MODES:
        raise LocalApiError(f"SAM3D_LOCAL_API={value!r}: choose reuse or per-run")
    return value


def idle_s() -> float:
    text = os.environ.get("SAM3D_LOCAL_API_IDLE_S", str(DEFAULT_IDLE_S))
    try:
        value = float(text)
    except ValueError:
        raise LocalApiError(f"SAM3D_LOCAL_API_IDLE_S={text!r}: expected seconds") from None
    if not value > 0:
        raise LocalApiError(f"SAM3D_LOCAL_API_IDLE_S={text!r}: must be > 0")
    return value


def state_dir() -> Path:
    """``$PREFECT_HOME/sam3d-local-api`` (the server uses that home's database)."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser() / "sam3d-local-api"


@dataclass(frozen=True)
class ServerRecord:
    pid: int
    create_time: float
    port: int
    prefect_version: str
    python: str
    started_at: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"


def read_record(folder: Path) -> ServerRecord | None:
    try:
        return ServerRecord(**json.loads((folder / "server.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_record(folder: Path, record: ServerRecord) -> None:
    tmp = folder / "server.json.tmp"
    tmp.write_text(json.dumps(asdict(record)))
    tmp.replace(folder / "server.json")


def process_alive(pid: int, create_time: float) -> bool:
    """``pid`` is running and is the process that started at ``create_time`` (not a reused pid; the time as
    recorded, or rounded to milliseconds in a client's file name)."""
    from sam3d_pipeline.stack.local import _is_zombie, _start_time

    started = _start_time(pid)
    return started is not None and abs(started - create_time) < 0.01 and not _is_zombie(pid)


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def running(folder: Path) -> ServerRecord | None:
    """The recorded server when its process is alive and it answers."""
    record = read_record(folder)
    if record is None or not process_alive(record.pid, record.create_time) or not healthy(record.url):
        return None
    return record


def _compatible(record: ServerRecord) -> bool:
    import prefect

    return record.prefect_version == prefect.__version__ and record.python == sys.executable


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def stop(folder: Path, timeout_s: float = 10.0) -> ServerRecord | None:
    """Stop the recorded server (SIGTERM, then SIGKILL); returns its record, None when none was running."""
    record = read_record(folder)
    if record is None:
        return None
    alive = process_alive(record.pid, record.create_time)
    if alive:
        os.kill(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while process_alive(record.pid, record.create_time) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_alive(record.pid, record.create_time):
            os.kill(record.pid, signal.SIGKILL)
    (folder / "server.json").unlink(missing_ok=True)
    return record if alive else None


def _start(folder: Path, idle: float, timeout_s: float, drop_env: tuple[str, ...] = ()) -> ServerRecord:
    import prefect
    import psutil
    from prefect.settings import get_current_settings

    from sam3d_pipeline.stack.local import _free_port

    port = _free_port(0)
    env = {k: v for k, v in os.environ.items() if k not in drop_env and k != "PREFECT_API_URL"}
    env |= get_current_settings().to_environment_variables(exclude_unset=True) | _SERVER_ENV | {OUTLIVES_ENV: "1"}
    env.pop("PREFECT_API_URL", None)
    log = open(folder / "server.log", "ab")  # noqa: SIM115 (the child keeps it; closed here after the start)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sam3d_pipeline.cli.local_api", "serve", str(folder), str(port), str(idle)],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
    finally:
        log.close()
    record = ServerRecord(pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(), port=port,
                          prefect_version=prefect.__version__, python=sys.executable, started_at=time.time())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalApiError(f"the local Prefect API server exited with code {proc.returncode} while starting "
                                f"(its log: {folder / 'server.log'})")
        if healthy(record.url, timeout_s=1.0):
            _write_record(folder, record)
            return record
        time.sleep(0.1)
    proc.terminate()
    raise LocalApiError(f"the local Prefect API server did not answer within {timeout_s:.0f} s (its log: "
                        f"{folder / 'server.log'}); set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher")


def ensure(folder: Path, idle: float, timeout_s: float, drop_env: tuple[str, ...] = ()) -> tuple[ServerRecord, bool]:
    """The running server, started when there is none (without the variables ``drop_env`` in its environment);
    returns (record, started now)."""
    with _locked(folder):
        record = running(folder)
        if record is not None and _compatible(record):
            return record, False
        if record is not None and live_clients(folder):  # another Prefect or Python, still in use: leave it
            raise LocalApiError(f"the local Prefect API server (pid {record.pid}) runs Prefect "
                                f"{record.prefect_version} from {record.python}, and commands are attached to it")
        stop(folder)
        return _start(folder, idle, timeout_s, drop_env), True


# --- commands attached to the server ----------------------------------------------------------------------------

def _client_name(pid: int, create_time: float) -> str:
    return f"{pid}-{create_time:.3f}"


def live_clients(folder: Path) -> list[str]:
    """Attached commands still running (entries of ended or killed ones are removed)."""
    alive = []
    for entry in (folder / "clients").glob("*"):
        pid, _, created = entry.name.partition("-")
        try:
            is_alive = process_alive(int(pid), float(created))
        except ValueError:
            is_alive = False
        if is_alive:
            alive.append(entry.name)
        else:
            entry.unlink(missing_ok=True)
    return alive


@contextlib.contextmanager
def attached(timeout_s: float, drop_env: tuple[str, ...] = ()) -> Iterator[ServerRecord]:
    """Attach this process to the local API server (starting it when needed) for the duration of the block."""
    import psutil

    folder = state_dir()
    (folder / "clients").mkdir(parents=True, exist_ok=True)
    me = folder / "clients" / _client_name(os.getpid(), psutil.Process().create_time())
    me.touch()  # before the server is looked for: it never idles out between here and the first request
    try:
        record, _ = ensure(folder, idle_s(), timeout_s, drop_env)
        yield record
    finally:
        me.unlink(missing_ok=True)


# --- the server process ---------------------------------------------------------------------------------------------

def serve(folder: Path, port: int, idle: float) -> None:
    """Run Prefect's API application on ``port`` until ``idle`` seconds pass with no request and no attached
    command, or SIGTERM."""
    import uvicorn
    from prefect.server.api.server import create_app

    app = create_app(ephemeral=True)
    last_request = [time.monotonic()]

    async def touched(scope, receive, send):  # noqa: ANN001 (ASGI)
        if scope["type"] == "http":
            last_request[0] = time.monotonic()
        await app(scope, receive, send)

    server = uvicorn.Server(uvicorn.Config(touched, host="127.0.0.1", port=port, log_level="error", lifespan="on"))

    def watch() -> None:
        while not server.should_exit:
            time.sleep(min(1.0, idle / 4))
            if time.monotonic() - last_request[0] >= idle and not live_clients(folder):
                server.should_exit = True

    threading.Thread(target=watch, name="idle-watch", daemon=True).start()
    warm = _start_warm_commands(folder)
    try:
        server.run()
    finally:
        if warm is not None:
            warm.terminate()
        record = read_record(folder)
        if record is not None and record.pid == os.getpid():
            (folder / "server.json").unlink(missing_ok=True)


# --- warm commands ----------------------------------------------------------------------------------------------------

WARM_ENV = "SAM3D_WARM_CLI"  # 0: `run` and `catalog` never use the warm server
_WARM_CHILD_ENV = "SAM3D_WARM_CLI_CHILD"  # set in a command forked from it (it runs itself, never forwards again)
WARM_COMMANDS = ("run", "catalog")
WARM_PRELOAD = ("sam3d_pipeline.cli.main", "sam3d_pipeline.cli.local", "sam3d_pipeline.cli.common",
                "sam3d_pipeline.run.report", "rich.console", "typer")


def warm_socket(folder: Path) -> str:
    from sam3d_pipeline.stack.warm_runs import socket_path

    return str(socket_path(folder, "warm-cli"))


def _start_warm_commands(folder: Path) -> subprocess.Popen | None:
    """The local API's companion: a warm-runs server (``stack/warm_runs.py``) that has imported Prefect, the flows
    and the command line, from which `run` and `catalog` fork (:func:`forward_to_warm`) instead of importing them
    (~2 s of every command on a small machine). It lives as long as this server (it stops when its parent is
    gone); ``SAM3D_WARM_CLI=0`` leaves it out."""
    from sam3d_pipeline.project import project_dir
    from sam3d_pipeline.stack.warm_runs import PRELOAD

    project = project_dir()
    if not _warm_on() or not (project / "flows" / "__init__.py").is_file():
        return None  # switched off, or no project folder to import the flows from (the commands would fail anyway)
    with open(folder / "warm-cli.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "sam3d_pipeline.stack.warm_runs", "serve", warm_socket(folder),
             ",".join(PRELOAD + WARM_PRELOAD), str(os.getpid())],
            cwd=project, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True)


def forward_to_warm(argv: list[str]) -> int | None:
    """Run this command (``argv``: its arguments) in a child of the local API's warm server when it is ``run`` or
    ``catalog`` on the embedded default and that server is up; its exit status, or None: then it runs here.
    Standard library only: it is decided before the command line's own imports. The folder is found from
    ``PREFECT_HOME`` (default ``~/.prefect``); a home set only in a Prefect profile is not seen (the command then
    runs here, as before)."""
    command = next((arg for arg in argv if arg != "--debug"), None)  # --debug: the one option before the command
    if (command not in WARM_COMMANDS or os.environ.get(_WARM_CHILD_ENV) or not _warm_on()
            or os.environ.get("PREFECT_API_URL")):
        return None
    try:
        if mode() == "per-run":
            return None
    except LocalApiError:  # the command itself reports the bad setting
        return None
    from sam3d_pipeline.stack.warm_runs import run_warm

    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    name = os.path.basename(sys.argv[0])  # the child's usage lines name the command as it was typed
    prog = name if name and not name.endswith(".py") else "python -m sam3d_pipeline.cli"
    return run_warm(warm_socket(home / "sam3d-local-api"), "sam3d_pipeline.cli", argv, {_WARM_CHILD_ENV: prog})


def _warm_on() -> bool:
    return os.environ.get(WARM_ENV, "1").strip() != "0"


def warm_prog_name() -> str | None:
    """The command's name as its launcher was typed, in a command forked from the warm server (else None: click's
    own)."""
    return os.environ.get(_WARM_CHILD_ENV) or None


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        sys.exit("usage: python -m sam3d_pipeline.cli.local_api serve STATE_DIR PORT IDLE_S")
