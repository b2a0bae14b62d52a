"""Warm GPU worker sessions, the decisions without Prefect: leases, lost workers, how many sessions to start.

With ``SAM3D_GPU_STAGES=workers`` the model stages are Prefect background tasks served by long-lived worker
sessions (``flows/gpu_worker.py``) that keep each model loaded between photos. Prefect leaves a task run whose
worker was killed in Running forever, and no other worker picks it up, so every task keeps a **lease** in the
pipeline's storage while it runs (``_workers/leases/<task run id>.json``: the session that runs it and a
heartbeat refreshed every ``lease_s / 3``). The submitter reads it while it waits:

- no lease yet: the task is queued (waiting for a free session, or for one to start);
- a fresh lease from a live session: running;
- a stale heartbeat, or a lease whose session has ended: **lost** (the worker was killed: spot interruption,
  out of memory, SIGKILL); the submitter fails that task run and submits the work again. Output keys are
  deterministic and ``*.json`` is written last, so a late duplicate changes nothing.

Sessions scale with the queue: a submitter starts one when work is queued and fewer sessions exist than the
queue needs, up to ``SAM3D_GPU_MAX_WORKERS``; an idle session exits after ``SAM3D_GPU_IDLE_S``. A session keeps
a heartbeat of its own at the output root while it serves (``session_heartbeat_key``): a killed session leaves its
flow run Running forever, and one whose heartbeat went stale (``session_lost``) no longer counts as a session,
so a new one is started for the queue.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from sam3d_pipeline.keys import WORKERS_DIR, worker_key

LeaseVerdict = Literal["queued", "running", "lost"]


def lease_key(task_run_id: str) -> str:
    """Where the lease of one GPU task run lives, relative to the output root."""
    return f"{WORKERS_DIR}/leases/{task_run_id}.json"


class Lease(BaseModel):
    """A running GPU task's claim: who runs it, and since when it last said so (epoch seconds)."""

    task_run_id: str
    session: str
    work: str = ""
    host: str = ""
    pid: int = 0
    started_at: float
    heartbeat_at: float


def lease_verdict(lease: Lease | None, *, now: float, lease_s: float, session_ended: bool = False) -> LeaseVerdict:
    """What a waiting submitter should make of a task's lease.

    Args:
        lease: the lease read from storage, or None when there is none.
        now: the current time (epoch seconds).
        lease_s: how old a heartbeat may get before the worker counts as gone.
        session_ended: the lease's session has a final state (its process is gone).

    Returns:
        ``queued`` (no lease), ``running`` or ``lost``.
    """
    if lease is None:
        return "queued"
    if session_ended or now - lease.heartbeat_at > lease_s:
        return "lost"
    return "running"


def session_heartbeat_key(session: str) -> str:
    """Where a worker session's own heartbeat (a ``Lease`` with no task) lives, relative to the output root."""
    return worker_key(session, "heartbeat.json")


def session_lost(heartbeat: Lease | None, *, now: float, lease_s: float) -> bool:
    """Whether a session whose flow run says Running is gone: its heartbeat is older than ``lease_s``.

    A session with no heartbeat where the submitter looks (a session started by hand, or one whose output root
    differs) is never judged lost: only a heartbeat that stopped proves it.
    """
    return heartbeat is not None and now - heartbeat.heartbeat_at > lease_s


def sessions_to_start(*, queued: int, active: int, max_workers: int) -> int:
    """How many worker sessions to start now.

    Each session runs one GPU task at a time, so the queue needs one session per queued task, within
    ``max_workers`` in all. ``active`` counts sessions starting or running (busy or idle).
    """
    if queued <= 0:
        return 0
    return max(0, min(queued, max_workers - active))


class IdleClock:
    """When a worker session has been idle long enough to exit (``idle_s`` seconds without a task)."""

    def __init__(self, idle_s: float, clock=time.monotonic) -> None:
        self.idle_s = idle_s
        self._clock = clock
        self._last_busy = clock()

    def tick(self, busy: bool) -> bool:
        """Record whether a task is running now; returns True when the session should exit."""
        now = self._clock()
        if busy:
            self._last_busy = now
            return False
        return now - self._last_busy >= self.idle_s


@dataclass
class SessionLedger:
    """What one worker session served: one row per task, for the session's table artifact."""

    session: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def record(self, *, task_run_id: str, work: str, timing: dict[str, Any], status: str) -> None:
        row = {"task_run_id": task_run_id, "work": work, "status": status}
        for stage in ("segment", "reconstruct"):
            if stage in timing:
                row[f"{stage}_model_load_s"] = round(timing[stage]["model_load_s"], 3)
                row[f"{stage}_run_s"] = round(timing[stage]["run_s"], 3)
        self.rows.append(row)

    def summary(self) -> dict[str, Any]:
        loads = {stage: sum(1 for r in self.rows if r.get(f"{stage}_model_load_s", 0) > 0)
                 for stage in ("segment", "reconstruct")}
        return {"session": self.session, "tasks": len(self.rows),
                "failed": sum(1 for r in self.rows if r["status"] != "completed"), "model_loads": loads}


# -- which session serves which stage ----------------------------------------------------------------------------
# A session serves the task of its image's stage: ``segment`` (the SAM 3 image), ``reconstruct`` (the SAM 3D Objects
# image), or ``all`` (both models in one process: the local stack). A batch with both stages (a catalog batch) is
# one ``all`` task when both stages go to the same deployment, else a segment task and then a reconstruct task.
WORKER_STAGES = ("segment", "reconstruct", "all")
TASK_NAMES = {"segment": "gpu-segment", "reconstruct": "gpu-reconstruct", "all": "gpu-stage"}


def served_tasks(worker_stages: str) -> tuple[str, ...]:
    """The task kinds (keys of ``TASK_NAMES``) a session with ``SAM3D_GPU_WORKER_STAGES=worker_stages`` serves.

    Raises:
        ValueError: not one of ``segment``, ``reconstruct``, ``all``.
    """
    if worker_stages not in WORKER_STAGES:
        raise ValueError(f"GPU worker stages must be one of {', '.join(WORKER_STAGES)}, not {worker_stages!r}")
    return WORKER_STAGES if worker_stages == "all" else (worker_stages,)


def stage_deployment(stage: str, *, worker_deployment: str, segment_deployment: str | None = None,
                     reconstruct_deployment: str | None = None) -> str:
    """The deployment (``flow/deployment``) whose sessions serve ``stage`` (``segment``, ``reconstruct``, or ``all``:
    a combined task, sent only where both stages share one deployment). An empty per-stage name means
    ``worker_deployment``."""
    if stage == "reconstruct":
        return reconstruct_deployment or worker_deployment
    return segment_deployment or worker_deployment


def task_kind(stages: tuple[str, ...], *, same_deployment: bool) -> str | None:
    """The task kind a batch running ``stages`` goes as: its one stage, ``all`` for both stages on one deployment,
    or None when the batch must be split (both stages, two deployments)."""
    if len(stages) == 1:
        return stages[0]
    return "all" if same_deployment else None
