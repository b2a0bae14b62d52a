"""Flow runs that start warm: a process worker's flow-run process forked from one that has already imported
Prefect and the flows, instead of a new interpreter that imports them for every run.

A process work pool starts ``python -m prefect.engine`` for each flow run: on a small machine 2–4 s of
interpreter start and imports (Prefect alone is ~1.7 s of CPU) before the run reaches Running, paid by every
upload and every studio job. Here:

- **The server** (``python -m sam3d_pipeline.stack.warm_runs serve SOCKET``, a process of the local stack)
  imports Prefect, its engine and the flows' modules (``PRELOAD``) once, then listens on a UNIX socket (mode
  0600). It is single-threaded, so forking is safe.
- **The launcher** (``python -m sam3d_pipeline.stack.warm_runs``, the work pool's ``command``; standard library
  only, so it starts in milliseconds) sends the server its environment (the flow run's id, Prefect's control
  channel, the job's variables), working directory and standard streams (file descriptors over the socket).
  The server forks; the child takes that environment, directory and streams, refreshes Prefect's settings from
  the new environment and runs ``prefect.engine`` as ``__main__``, as the worker's own command would. The
  server's objects are frozen (``gc.freeze``) before each fork: the child's garbage collections and its exit
  leave them alone, which halved a lite upload's CPU in its flow-run process (2.06 → 1.04 CPU-seconds measured
  on the local stack, 2 cores).
- The launcher is the process the worker knows (its pid is the run's infrastructure pid): SIGTERM and SIGINT
  to it are passed to the child (Prefect's cancellation), and it exits with the child's exit status. If the
  launcher dies (SIGKILL), the server kills its child, as if the run's own process had been killed; if the
  server cannot be reached, the launcher runs ``python -m prefect.engine`` itself (``exec``), so a run never
  depends on the server being up.

The code a child runs is what the server imported when it started. The server watches the files of that code
(this project's, not the installed packages'): once one changed, it refuses launchers (each then runs its module
itself, with the new code) and starts itself again when its last child has ended.

The command line's ``run`` and ``catalog`` use a server of their own the same way (``cli/local_api.py``,
:func:`run_warm`).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the launcher imports only what it uses (see launcher_command)
    from pathlib import Path

SOCKET_ENV = "SAM3D_WARM_RUNS_SOCKET"
ENGINE = "prefect.engine"
# Imported by the server before it forks: Prefect, its engine, the flows and what their runs import anyway, lazily:
# S3 (boto3), the GPU stage tasks and their dispatch (Prefect's task worker, FastAPI), USD for the USDZ export
# (UsdSkel alone ~0.17 s), the simplifier. Without the last group a run's process spent ~1.3 s importing them
# (profiled in a forked run); none starts a thread. Then the lite segmenter's module, the deployment's pull step and
# the photo formats, ~70 ms of a run's start (profiled likewise). The server also makes one S3 client
# (``_warm_boto3``) and checks the Prefect server's version once for its runs (``_warm_prefect``).
PRELOAD = ("prefect", "prefect.engine", "prefect.flow_engine", "prefect.task_engine", "flows.image_to_3d",
           "flows.catalog_batch", "numpy", "PIL.Image", "cv2", "scipy.ndimage", "trimesh",
           "boto3", "botocore.session", "s3transfer", "tasks.gpu_tasks", "tasks.gpu_dispatch", "psutil",
           "prefect.utilities.visualization", "pxr.Usd", "pxr.UsdGeom", "pxr.UsdShade", "pxr.UsdUtils",
           "pxr.UsdSkel", "fast_simplification", "boto3.s3.transfer", "sam3d_pipeline.backends.lite_segmenter",
           "prefect.deployments.steps.core", "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "PIL.BmpImagePlugin")
_server_aws_env: dict[str, str] = {}  # the server's AWS_* variables when it warmed boto3 (``_warm_boto3``)
_MAX_REQUEST = 1 << 20  # the request (environment + argv) in bytes


def socket_path(state_dir: Path, name: str = "warm-runs") -> Path:
    """A socket of the stack (this server's, or another named ``name``) in the stack's state folder, or under the
    temporary folder when that path is too long for a UNIX socket (about 100 bytes)."""
    from pathlib import Path

    path = Path(state_dir).resolve() / f"{name}.sock"
    if len(str(path).encode()) <= 100:
        return path
    import hashlib
    import tempfile

    return Path(tempfile.gettempdir()) / f"sam3d-{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:16]}.sock"


def private_socket(path: str, kind: int) -> socket.socket:
    """A UNIX socket of ``kind`` bound at ``path`` (an old socket file there is replaced), for this user only (0600)."""
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, kind)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    return sock


def launcher_command() -> str:
    """The work pool's ``command``: this file as the launcher script, with this interpreter, without the ``site``
    module (``-S``): the launcher needs only the standard library, and skipping the installed packages' path hooks
    shortens each launch (about 48 → 36 ms, measured against a stub server)."""
    import shlex

    return f"{shlex.quote(sys.executable)} -S {shlex.quote(os.path.realpath(__file__))}"


# --- the launcher (the work pool's command) -------------------------------------------------------------------

def launch(module: str = ENGINE) -> int:
    """Run this flow run in a child of the server; return its exit status (falls back to ``exec`` of
    ``python -m module`` when the server is not there, or refuses: see :func:`run_warm`)."""
    status = run_warm(os.environ.get(SOCKET_ENV), module, sys.argv[1:])
    if status is None:
        os.execv(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]])
    return status


def run_warm(path: str | None, module: str, argv: list[str], extra_env: dict[str, str] | None = None) -> int | None:
    """Run ``python -m module *argv`` as a child of the server on ``path``, with this process's environment (plus
    ``extra_env``), directory and standard streams, and return its exit status; None when no server answers there
    or it refuses (another interpreter or project, or its code changed on disk): then the caller runs it itself."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not path:
            raise OSError(f"{SOCKET_ENV} is not set")
        sock.connect(path)
        request = json.dumps({"argv": argv, "env": dict(os.environ) | (extra_env or {}), "cwd": os.getcwd(),
                              "module": module, "python": sys.executable})
        socket.send_fds(sock, [request.encode() + b"\n"], [0, 1, 2])
        answers = sock.makefile("r")
        answer = json.loads(answers.readline() or "{}")
    except (OSError, ValueError):
        sock.close()
        return None
    if "pid" not in answer:  # refused (the reason is in the server's log)
        sock.close()
        return None
    child = answer["pid"]

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    line = answers.readline()  # blocks until the child ends (interrupted calls are retried: PEP 475)
    if not line:
        print("warm-runs: the server went away before the run ended", file=sys.stderr)
        return 1
    return int(json.loads(line)["exit"])


# --- the server -----------------------------------------------------------------------------------------------------

def _exit_status(status: int) -> int:
    """A wait status as a shell reports it (a signal N → 128 + N)."""
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _become_the_run(request: dict, fds: list[int]) -> None:
    """In the forked child: take the launcher's streams, directory and environment, then run the module."""
    import runpy

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    for stream in (sys.stdout, sys.stderr):  # buffered for the server's log file: line by line on a terminal
        if stream is not None and stream.isatty():
            stream.reconfigure(line_buffering=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [request["module"], *request["argv"]]
    if "boto3" in sys.modules and _aws_env(os.environ) != _server_aws_env:
        import boto3

        boto3.DEFAULT_SESSION = None  # warmed with other credentials or configuration: this run starts its own
    if "sam3d_pipeline.settings" in sys.modules:  # read once per process (cached): this run reads its own
        sys.modules["sam3d_pipeline.settings"].get_settings.cache_clear()
    if "prefect.context" in sys.modules:  # settings read at import: read them again from this environment
        import prefect.context

        prefect.context.refresh_global_settings_context()
        from sam3d_pipeline.prefect_client import share_tls_context

        share_tls_context()  # the run's ~20 Prefect clients share one TLS context instead of building one each
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


def _aws_env(env: os._Environ | dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if name.startswith("AWS_")}


def _warm_boto3() -> None:
    """Make one S3 client on boto3's default session (no request: no connection, no thread): a run's first client
    then takes ~15 ms instead of ~140 ms (the session keeps the service models it parsed). The client is given
    placeholder credentials, so the session neither looks for nor keeps any: each run resolves its own. It may
    keep configuration read from this environment: a run whose ``AWS_*`` variables differ gets a fresh session
    (``_become_the_run``)."""
    import boto3

    boto3.setup_default_session()
    boto3.client("s3", region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                 aws_access_key_id="warm-up", aws_secret_access_key="warm-up")
    _server_aws_env.update(_aws_env(os.environ))


def _warm_prefect() -> None:
    """Check the Prefect API's version here, once: Prefect checks it once per process (its events client does,
    before a run's deployment pull step reports itself), so each run would otherwise make the request (and build
    a TLS context for it) before it reaches Running. A failed check is not remembered: each run then checks."""
    import asyncio
    import logging

    from prefect._internal.version_checking import check_server_version
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        asyncio.run(check_server_version(str(url), logging.getLogger("sam3d.warm_runs"), raise_on_error=False))


def _warm_models() -> None:
    """Build here, once, what every run would otherwise build for itself on first use:

    - the schemas of the pydantic models loaded so far that are still incomplete (Prefect's client and event
      models are built lazily: the flow run model alone took ~20 ms of a run's start, before Running);
    - the TLS context of Prefect's clients for the current settings (:func:`prefect_client.tls_context`, ~30 ms
      before Running): a run whose settings name the same CA bundle takes it, another builds its own.

    A model whose references cannot be resolved yet is left lazy, as it was."""
    import pydantic

    from sam3d_pipeline.prefect_client import tls_context

    pending, seen = [pydantic.BaseModel], set()
    while pending:
        for model in pending.pop().__subclasses__():
            if model in seen:
                continue
            seen.add(model)
            pending.append(model)
            if not model.__dict__.get("__pydantic_complete__", True):
                try:
                    model.model_rebuild()
                except Exception:  # noqa: BLE001 (left to be built on first use, as before)
                    pass
    tls_context()


def _own_code() -> dict[str, float]:
    """Modification times of the imported modules' files that are not part of the Python installation (this
    project's code: ``sam3d_pipeline``, ``flows``, ``tasks``, and any other module imported from outside it)."""
    installed = tuple({os.path.join(p, "") for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    files = {}
    for module in list(sys.modules.values()):
        name = getattr(module, "__file__", None)
        if name and not name.startswith(installed):
            files[name] = _mtime(name)
    return files


def _refusal(request: dict, code: dict[str, float]) -> str | None:
    """Why this server cannot run ``request`` as its launcher would (None: it can): the launcher runs another
    interpreter or project folder, or code the server imported changed on disk since."""
    if request.get("python", sys.executable) != sys.executable:
        return f"the launcher runs {request['python']}, this server {sys.executable}"
    for name in ("SAM3D_PROJECT_DIR", "PYTHONPATH"):
        if request["env"].get(name) != os.environ.get(name):
            return f"the launcher's {name} is not this server's"
    changed = [name for name, mtime in code.items() if _mtime(name) != mtime]
    if changed:
        return f"{changed[0]} changed since this server imported it"
    return None


def _mtime(name: str) -> float:
    try:
        return os.stat(name).st_mtime
    except OSError:
        return -1.0


def serve(path: str, preload: tuple[str, ...] = PRELOAD, parent: int | None = None) -> None:
    """Import ``preload``, then fork a child per launcher on ``path`` until SIGTERM (children get SIGTERM too), or
    until the process ``parent`` is no longer this one's parent.

    A launcher this server cannot serve (:func:`_refusal`) is refused, and runs its module itself. When the
    refusal is changed code, the server starts itself again (the same command, so fresh imports) as soon as
    none of its children is still running.
    """
    import importlib
    import selectors

    for name in preload:
        importlib.import_module(name)
    if "boto3" in preload:
        _warm_boto3()
    if "prefect" in preload:
        _warm_prefect()
        _warm_models()
    listener = private_socket(path, socket.SOCK_STREAM)
    listener.listen(64)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    signal.signal(signal.SIGCHLD, lambda *_: None)
    wake_r, wake_w = socket.socketpair()  # a signal (a child ended, SIGTERM) wakes select() at once
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # child pid → its launcher's connection
    code, stale = _own_code(), []
    print(f"warm-runs: ready on {path} (pid {os.getpid()}, {len(preload)} modules preloaded, {len(code)} files of "
          "this project watched)", flush=True)
    while not stopping:
        for key, _ in selector.select(timeout=5.0):
            if key.fileobj is wake_r:
                wake_r.recv(4096)
            elif key.fileobj is listener:
                conn, _ = listener.accept()
                child = _fork_for(conn, [listener, wake_r, wake_w, *children.values()], selector, code, stale)
                if child:
                    children[child] = conn
                    selector.register(conn, selectors.EVENT_READ)
            else:  # a launcher's connection: readable only when it closed (the launcher died, e.g. SIGKILL)
                conn = key.fileobj
                selector.unregister(conn)
                for pid, owner in children.items():
                    if owner is conn:  # as if the run's own process had been killed: the worker reports it
                        _signal(pid, signal.SIGKILL)
        _reap(children, selector)
        if parent is not None and os.getppid() != parent:
            print(f"warm-runs: parent {parent} is gone: stopping", flush=True)
            break
        if stale and not children:
            print("warm-runs: starting again with the changed code", flush=True)
            listener.close()
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    for pid in children:
        _signal(pid, signal.SIGTERM)
    listener.close()
    if os.path.exists(path):
        os.unlink(path)


def _fork_for(conn: socket.socket, inherited: list[socket.socket], selector,  # noqa: ANN001
              code: dict[str, float], stale: list[bool]) -> int | None:
    """Read a launcher's request and fork its child; returns the child's pid (None: request refused).
    ``inherited``: the server's other sockets, closed in the child; ``code``: the watched files (:func:`_own_code`);
    ``stale`` gets an entry once they changed."""
    try:
        data, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
        while not data.endswith(b"\n") and len(data) < _MAX_REQUEST:
            more = conn.recv(_MAX_REQUEST)
            if not more:
                break
            data += more
        request = json.loads(data)
        if len(fds) != 3:
            raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
    except (OSError, ValueError) as exc:
        print(f"warm-runs: refused a launcher: {exc}", file=sys.stderr, flush=True)
        conn.close()
        return None
    reason = None if stale else _refusal(request, code)
    if stale or reason:
        for fd in fds:
            os.close(fd)
        if reason and "changed since" in reason:
            stale.append(True)
        print(f"warm-runs: refused a launcher: {reason or 'the code changed; starting again'}", flush=True)
        try:
            conn.sendall(json.dumps({"refused": reason or "the code changed"}).encode() + b"\n")
        except OSError:
            pass
        conn.close()
        return None
    # The preloaded modules' objects move to the collector's permanent generation first: the child's collections
    # (a run triggers several) and its exit then skip them, instead of walking every one and so copying every page
    # of the server's heap into the child (gc.freeze's documented use before fork).
    gc.freeze()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the server's loop
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            selector.close()
            for sock in (*inherited, conn):
                sock.close()
            _become_the_run(request, fds)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 (printed, then the child's exit status says it failed)
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        sys.exit(code)  # a normal interpreter exit: Prefect's atexit hooks flush logs and events
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    run_id = request["env"].get("PREFECT__FLOW_RUN_ID")
    what = f"flow run {run_id}" if run_id else " ".join([request["module"], *request["argv"][:1]])
    print(f"warm-runs: {what} in pid {pid}", flush=True)
    return pid


def _reap(children: dict[int, socket.socket], selector) -> None:  # noqa: ANN001
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        try:
            conn.sendall(json.dumps({"exit": _exit_status(status)}).encode() + b"\n")
        except OSError:
            pass
        try:
            selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        serve(sys.argv[2], tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 and sys.argv[3] else PRELOAD,
              int(sys.argv[4]) if len(sys.argv) > 4 else None)
    else:
        sys.exit(launch())
