"""Restart one process of the local stack (``sam3d-pipeline restart NAME``), as after a crash or a kill.

``up`` records each process's command line, folder and own environment in ``stack.json``; a restart stops the
recorded process group if it still runs (by PID, as ``down`` does) and starts the same command again, with
the same ports and state, its log appended to. It then waits until the part answers: the Prefect server's
health check, PostgreSQL's and moto's ports, or, for the workers and the events bridge, a process that
stays up.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from sam3d_pipeline.project import project_dir
from sam3d_pipeline.stack.local import (
    LocalStack,
    StackConfig,
    StackError,
    _alive,
    _stop_group,
    _wait,
    prefect_healthy,
    read_stack,
)

SETTLE_S = 2.0


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def restart(state_dir: Path, name: str, timeout_s: float = 180.0) -> int:
    """Stop ``name`` if it runs and start it again as ``up`` did. Returns the new PID.

    Raises:
        StackError: no stack recorded, no such part, or it did not come back within ``timeout_s``.
    """
    recorded = read_stack(state_dir)
    if recorded is None:
        raise StackError(f"no stack recorded in {state_dir.resolve()}: start one with `sam3d-pipeline up`")
    processes = recorded.get("processes", {})
    entry = processes.get(name)
    if entry is None or "argv" not in entry:
        raise StackError(f"{name!r} is not a restartable part of this stack (parts: {', '.join(sorted(processes))})")
    if _alive(entry):
        _stop_group(entry["pid"])
    stack = LocalStack(StackConfig(state_dir=state_dir, project_dir=project_dir(), timeout_s=timeout_s))
    stack.processes = dict(processes)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))} | entry["env"]
    proc = stack._spawn(name, entry["argv"], env, Path(entry["cwd"]) if entry.get("cwd") else None)
    log = Path(entry["log"])
    if name == "prefect-server":
        api_url = f"http://127.0.0.1:{_port(entry['argv'])}/api"
        _wait(name, lambda: prefect_healthy(api_url), timeout_s, log, proc)
    elif name in ("postgres", "moto"):
        port = _port(entry["argv"])
        _wait(name, lambda: _port_open(port), timeout_s, log, proc)
    else:
        time.sleep(SETTLE_S)
        if proc.poll() is not None:
            raise StackError(f"{name} exited with status {proc.returncode} after its restart; see {log}")
    return proc.pid


def _port(argv: list[str]) -> int:
    """The port in a recorded command line: ``--port N`` / ``-p N`` (servers) or ``-c port=N`` (PostgreSQL)."""
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in ("--port", "-p"):
            return int(value)
        if flag == "-c" and value.startswith("port="):
            return int(value.split("=", 1)[1])
    raise StackError(f"no port in the recorded command line {' '.join(argv)!r}")
