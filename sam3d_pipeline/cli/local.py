"""Prefect settings for flows run inside this process on Prefect's ephemeral API (`sam3d-pipeline run` and
`catalog` without ``PREFECT_API_URL``, `make demo`), and what keeps such a run tidy: the console shows progress
and one line per failure, and nothing the process starts outlives it.

Prefect's temporary API server is a child process (``uvicorn``, ~290 MB). Prefect stops it at interpreter exit
(``atexit``), which never runs when the process is killed (SIGKILL, SIGTERM's default action, an out-of-memory
kill). :func:`guard_children` starts a small watcher process that records this process's descendants while it
lives and ends them as soon as it is gone, however it died. Run as ``python -m sam3d_pipeline.cli.local --guard
PID``; it imports the standard library and psutil only.
"""

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

GUARD_POLL_S = 0.2  # how often the watcher looks at the process tree (and notices its parent is gone)
GUARD_GRACE_S = 3.0  # SIGTERM first (the API server shuts down cleanly), SIGKILL whatever is left after this
GUARD_SETTLE_S = 0.5  # after the parent is gone, keep looking this long for processes still starting
GUARD_ENV = "SAM3D_CLI_GUARD"  # a random token every process started from here inherits in its environment


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
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


class LocalApiDidNotStart(RuntimeError):
    """Prefect's temporary API server did not start in time."""


@contextmanager
def cli_run_settings(debug: bool = False) -> Iterator[None]:
    """What `sam3d-pipeline run` and `catalog` run their flow in.

    - :func:`guard_children`: the temporary API server (and anything else started here) ends with this process.
    - :func:`local_run_settings` on the embedded default, Prefect's own settings when a server is configured.
    - Unless ``debug``: :class:`QuietFailures` on Prefect's console handler, so a failed run prints no
      tracebacks (the caller prints the reason once); the Prefect API still stores every log, tracebacks
      included.

    A temporary API server that does not start becomes :class:`LocalApiDidNotStart`, with what to change.
    """
    guard_children()
    quiet = nullcontext() if debug else quiet_console_failures()
    embedded = uses_ephemeral_api()
    try:
        with quiet, local_api() if embedded else nullcontext(), local_run_settings() if embedded else nullcontext():
            yield
    except RuntimeError as exc:
        if isinstance(exc, LocalApiDidNotStart) or "ephemeral Prefect API" not in str(exc):
            raise
        raise LocalApiDidNotStart(
            f"Prefect's local API server did not start ({exc}); set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
            "higher, or PREFECT_API_URL to a running Prefect server") from exc


@contextmanager
def local_api() -> Iterator[None]:
    """The embedded default's Prefect API for the block: the reused background server (``cli/local_api.py``), or
    Prefect's own temporary server per command with ``SAM3D_LOCAL_API=per-run``."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    from sam3d_pipeline.cli import local_api as server

    try:
        if server.mode() == "per-run":
            yield
            return
        with server.attached(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()),
                             drop_env=(GUARD_ENV,)) as record, \
                temporary_settings(updates={PREFECT_API_URL: record.url}):
            yield
    except server.LocalApiError as exc:
        raise LocalApiDidNotStart(f"{exc}; or set PREFECT_API_URL to a running Prefect server, or "
                                  "SAM3D_LOCAL_API=per-run") from exc


# --- console: progress, not tracebacks ---------------------------------------------------------------------------

_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class QuietFailures(logging.Filter):
    """Console filter for command-line runs: keeps the progress of flow and task runs, drops how they failed.

    Dropped (from Prefect's flow-run and task-run loggers only): records at ERROR and above, records carrying a
    traceback, and a flow run's final "Finished in state <not Completed>" line. Those all restate the failure
    the command line reports itself, in one line. Other loggers are untouched: a problem outside the run still
    shows. The filter sits on the console handler alone; the API handler still sends every record to Prefect.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(_RUN_LOGGERS):
            return True
        if record.levelno >= logging.ERROR or record.exc_info:
            return False
        if record.name.startswith("prefect.flow_runs"):
            message = record.getMessage()
            if message.startswith("Finished in state ") and not message.startswith("Finished in state Completed"):
                return False
        return True


@contextmanager
def quiet_console_failures() -> Iterator[None]:
    """:class:`QuietFailures` on Prefect's console handlers for the duration of the block."""
    import prefect  # noqa: F401 (configures Prefect's logging)
    from prefect.logging.handlers import PrefectConsoleHandler

    handlers = {h for name in ("", *_RUN_LOGGERS, "prefect") for h in logging.getLogger(name).handlers
                if isinstance(h, PrefectConsoleHandler)}
    quiet = QuietFailures()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


# --- nothing outlives the command ---------------------------------------------------------------------------------

_guard: subprocess.Popen | None = None


def guard_children() -> subprocess.Popen:
    """Start (once per process) the watcher that ends this process's descendants when this process is gone.

    Why a watcher and not ``PR_SET_PDEATHSIG``: Prefect starts its API server itself, from whichever thread first
    needs the API, and a parent-death signal fires when that *thread* ends, not the process; a process group
    would take the server out of the terminal's foreground group (Ctrl-C) and killing ours could hit the shell's
    job. The watcher is a separate, small process (the standard library and psutil): it ignores SIGINT, SIGTERM
    and SIGHUP and waits for its parent to change (this process died or exited). Which processes are ours:

    - those carrying this process's random token in their environment (``GUARD_ENV``, set here before anything
      starts; Prefect hands its server our whole environment), read with psutil once the parent is gone, so a
      server started a moment before a kill is found too, though it was never seen alive;
    - every descendant seen while the parent lived (listed every ``GUARD_POLL_S``; pid + start time, so a reused
      pid is never hit): that also covers systems where another user's environment cannot be read.

    Those still alive get SIGTERM, then SIGKILL after ``GUARD_GRACE_S``; then the watcher exits. On a normal
    exit Prefect has already stopped its server and the watcher finds nothing to do.
    """
    global _guard
    if _guard is None or _guard.poll() is not None:
        os.environ[GUARD_ENV] = f"{os.getpid()}-{secrets.token_hex(8)}"
        _guard = subprocess.Popen(
            [sys.executable, "-m", "sam3d_pipeline.cli.local", "--guard", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
        )
    return _guard


Identity = tuple[int, float]  # (pid, start time): a pid alone may be reused by an unrelated process


def _proc_table() -> dict[int, tuple[int, float, bool]]:
    """pid → (parent pid, start time, alive) for every process (psutil)."""
    import psutil

    table: dict[int, tuple[int, float, bool]] = {}
    for proc in psutil.process_iter(["ppid", "create_time", "status"]):
        info = proc.info
        if info["create_time"] is None:  # ended while we looked
            continue
        alive = info["status"] not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        table[proc.pid] = (info["ppid"] or 0, info["create_time"], alive)
    return table


def _descendants(root: int, table: dict[int, tuple[int, float, bool]]) -> set[Identity]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[Identity] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if table[pid][2]:
            found.add((pid, table[pid][1]))
        todo.extend(children.get(pid, []))
    return found


def _alive(targets: set[Identity], table: dict[int, tuple[int, float, bool]] | None = None) -> set[Identity]:
    table = _proc_table() if table is None else table
    return {(pid, start) for pid, start in targets if pid in table and table[pid][1] == start and table[pid][2]}


def _signal_all(targets: set[Identity], sig: int) -> None:
    for pid, _ in targets:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _marked(token: str, table: dict[int, tuple[int, float, bool]]) -> set[Identity]:
    """Live processes whose environment holds ``GUARD_ENV=token`` (where the system lets us read it)."""
    import psutil

    found: set[Identity] = set()
    for pid, (_, start, alive) in table.items():
        try:
            marked = psutil.Process(pid).environ().get(GUARD_ENV) == token
        except (psutil.Error, OSError):  # ended, not ours to read
            continue
        if alive and marked:
            found.add((pid, start))
    return found


def _outlives(pid: int) -> bool:
    """A process meant to outlive the command: the reused local API server (``local_api.py``)."""
    import psutil

    from sam3d_pipeline.cli.local_api import OUTLIVES_ENV

    try:
        return OUTLIVES_ENV in psutil.Process(pid).environ()
    except (psutil.Error, OSError):
        return False


def run_guard(parent: int, token: str | None = None, poll_s: float = GUARD_POLL_S,
              grace_s: float = GUARD_GRACE_S) -> int:
    """The watcher's loop (see :func:`guard_children`); returns how many processes it had to end."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # outlive the parent on purpose; exit right after it
    me = os.getpid()
    seen: set[Identity] = set()
    while os.getppid() == parent:
        seen |= {(pid, start) for pid, start in _descendants(parent, _proc_table()) if pid != me}
        time.sleep(poll_s)
    # Look again for a while: a process forked just before the parent died may exec (and show its token) later.
    known: set[Identity] = set(seen)
    signalled: dict[Identity, float] = {}  # → when it got SIGTERM
    settle_until = time.monotonic() + GUARD_SETTLE_S
    give_up = settle_until + grace_s + 5.0  # a process stuck in the kernel ignores even SIGKILL: do not wait forever
    while True:
        table = _proc_table()
        if token:
            known |= _marked(token, table)
        for pid, _ in list(_alive(known, table)):  # started after the last look, by a process we know
            known |= _descendants(pid, table)
        now = time.monotonic()
        alive = {identity for identity in _alive(known, table) if identity[0] != me and not _outlives(identity[0])}
        fresh = alive - signalled.keys()
        _signal_all(fresh, signal.SIGTERM)
        signalled |= dict.fromkeys(fresh, now)
        _signal_all({i for i in alive if now - signalled[i] > grace_s}, signal.SIGKILL)
        if (not alive and now > settle_until) or now > give_up:
            return len(signalled)
        time.sleep(0.05)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--guard" and sys.argv[2].isdigit():
        run_guard(int(sys.argv[2]), os.environ.get(GUARD_ENV))
    else:
        sys.exit("usage: python -m sam3d_pipeline.cli.local --guard PARENT_PID")
