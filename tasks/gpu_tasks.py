"""The GPU stages as Prefect background tasks, and the loop that serves them in a warm worker session.

Three tasks with one body (``run_gpu_batch`` of a ``GpuBatch``, ``sam3d_pipeline.gpu.stages``): ``gpu-segment``
(served by SAM 3 sessions), ``gpu-reconstruct`` (SAM 3D Objects sessions) and ``gpu-stage`` (a batch with both
stages, served only by a session with both models: ``SAM3D_GPU_WORKER_STAGES=all``). Flows submit them with
``.delay()`` (``tasks/gpu_dispatch.py``); ``serve_gpu_tasks`` executes those of its stages inside a worker session
(``flows/gpu_worker.py``), one task at a time, with every model cached in the process between tasks, until the
session has been idle for ``idle_s``. While a task runs it keeps its lease fresh in storage
(``sam3d_pipeline.gpu.workers``), so a submitter can tell a killed worker from a slow one.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.client.subscriptions import Subscription
from prefect.logging import get_logger
from prefect.runtime import task_run
from prefect.settings import get_current_settings
from prefect.task_worker import TaskWorker

from sam3d_pipeline.errors import InputError
from sam3d_pipeline.gpu.stages import GpuBatch, batch_stages, run_gpu_batch
from sam3d_pipeline.gpu.workers import (
    TASK_NAMES,
    IdleClock,
    Lease,
    SessionLedger,
    lease_key,
    served_tasks,
    session_heartbeat_key,
)
from sam3d_pipeline.settings import get_settings
from sam3d_pipeline.storage import Storage, open_storage

# The session this process serves for (set by ``serve_gpu_tasks``); "" outside a session.
_SESSION: dict[str, Any] = {"id": "", "ledger": None}


@contextmanager
def held_lease(storage: Storage, task_run_id: str, session: str, lease_s: float, work: str = "",
               key: str | None = None) -> Iterator[Lease]:
    """Write the task's lease (at ``key``, default ``lease_key(task_run_id)``) and refresh its heartbeat every
    ``lease_s / 3`` until the block ends."""
    now = time.time()
    lease = Lease(task_run_id=task_run_id, session=session, work=work, host=socket.gethostname(), pid=os.getpid(),
                  started_at=now, heartbeat_at=now)
    key = key or lease_key(task_run_id)
    storage.write_bytes(key, lease.model_dump_json().encode(), content_type="application/json")
    stop = threading.Event()

    interval = max(0.5, lease_s / 3)

    def beat() -> None:
        wait_s, failures = interval, 0
        while not stop.wait(wait_s):
            lease.heartbeat_at = time.time()
            try:
                storage.write_bytes(key, lease.model_dump_json().encode(), content_type="application/json")
            except Exception as exc:  # noqa: BLE001 - any failure to write is logged and tried again soon
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    get_logger("gpu_worker").warning(
                        "lease %s: heartbeat not written (%s: %s; %d in a row), trying again in 1 s: the submitter "
                        "counts this worker lost after %.0f s without one", key, type(exc).__name__, exc, failures,
                        lease_s)
                wait_s = min(1.0, interval)
                continue
            if failures:
                get_logger("gpu_worker").info("lease %s: heartbeat written again after %d failure(s)", key, failures)
            wait_s, failures = interval, 0

    thread = threading.Thread(target=beat, name=f"lease-{task_run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join(timeout=5)
        storage.delete(key)


def run_batch_task(batch: GpuBatch, submission: str, kind: str) -> dict[str, Any]:
    """The body of every GPU stage task: run one GPU batch here, keeping its lease while it runs.

    Args:
        batch: what to segment and reconstruct (storage keys, never pixels).
        submission: unique per submission, so a resubmitted batch is a new task run, never a cached result.
        kind: the task's stage (``segment``, ``reconstruct``) or ``all``; a batch with other stages is refused.

    Returns:
        ``run_gpu_batch``'s result, with ``timing[stage]`` completed by ``worker`` and ``started_at``.

    Raises:
        InputError: the batch runs a stage this task is not for (a session of that image lacks the model).
    """
    if kind != "all" and batch_stages(batch) not in ((), (kind,)):
        raise InputError(f"{TASK_NAMES[kind]} got a batch that runs {', '.join(batch_stages(batch))}")
    logger = get_run_logger()
    settings = get_settings()
    run_id = str(task_run.get_id())
    session = _SESSION["id"] or f"pid-{os.getpid()}"
    storage = open_storage(batch.output_root, settings)
    started_at = time.time()
    logger.info("session %s: %s", session, batch.describe())
    status = "failed"
    result: dict[str, Any] = {"timing": {}}
    try:
        with held_lease(storage, run_id, session, settings.gpu_lease_s, batch.describe()):
            result = run_gpu_batch(batch, settings)
        status = "completed"
    finally:
        ledger: SessionLedger | None = _SESSION["ledger"]
        if ledger is not None:
            ledger.record(task_run_id=run_id, work=batch.describe(), timing=result["timing"], status=status)
    for timing in result["timing"].values():
        timing |= {"worker": session, "started_at": started_at}
    logger.info("session %s: done (%s)", session, ", ".join(
        f"{stage}: load {t['model_load_s']:.2f} s, run {t['run_s']:.2f} s" for stage, t in result["timing"].items()))
    return result | {"submission": submission}  # the submitter checks the run is its own


@task(name=TASK_NAMES["segment"], cache_policy=NO_CACHE, persist_result=True)
def gpu_segment(batch: GpuBatch, submission: str) -> dict[str, Any]:
    """Segment a batch's photos (SAM 3 sessions). See ``run_batch_task``."""
    return run_batch_task(batch, submission, "segment")


@task(name=TASK_NAMES["reconstruct"], cache_policy=NO_CACHE, persist_result=True)
def gpu_reconstruct(batch: GpuBatch, submission: str) -> dict[str, Any]:
    """Reconstruct a batch's masks (SAM 3D Objects sessions). See ``run_batch_task``."""
    return run_batch_task(batch, submission, "reconstruct")


@task(name=TASK_NAMES["all"], cache_policy=NO_CACHE, persist_result=True)
def gpu_stage(batch: GpuBatch, submission: str) -> dict[str, Any]:
    """Segment, select and reconstruct in one task (sessions with both models). See ``run_batch_task``."""
    return run_batch_task(batch, submission, "all")


GPU_TASKS = {"segment": gpu_segment, "reconstruct": gpu_reconstruct, "all": gpu_stage}


def serve_gpu_tasks(session: str, idle_s: float, poll_s: float = 0.5, stages: str = "all") -> SessionLedger:
    """Serve the GPU tasks of ``stages`` (``SAM3D_GPU_WORKER_STAGES``: ``segment``, ``reconstruct`` or ``all``) from
    this process, one task at a time, until idle for ``idle_s`` seconds.

    The subscription stops first, then the task in flight (if any) finishes, so no received task is dropped.
    Returns the ledger of what was served.
    """
    ledger = SessionLedger(session=session)
    _SESSION.update(id=session, ledger=ledger)
    settings = get_settings()
    try:  # the session's own heartbeat: a submitter tells a killed session from a live one by it
        with held_lease(open_storage(settings.output_root, settings), "", session, settings.gpu_lease_s, "session",
                        key=session_heartbeat_key(session)):
            asyncio.run(_serve(idle_s, poll_s, [GPU_TASKS[kind] for kind in served_tasks(stages)]))
    finally:
        _SESSION.update(id="", ledger=None)
    return ledger


async def _serve(idle_s: float, poll_s: float, tasks: list[Any]) -> None:
    worker = OneAtATimeWorker(*tasks)
    idle = IdleClock(idle_s)
    async with worker:  # leaving it waits for the task in flight
        async with anyio.create_task_group() as group:
            group.start_soon(worker.astart)
            while True:
                await anyio.sleep(poll_s)
                if idle.tick(busy=worker.busy):
                    group.cancel_scope.cancel()
                    break


class OneAtATimeWorker(TaskWorker):
    """A task worker that takes a task from the server only when it is free.

    Prefect's ``TaskWorker`` keeps its subscription open while a task runs and acknowledges the next
    task as soon as it arrives, then holds it until the running one ends: a killed worker would lose
    that task (the server does not send an acknowledged task again), and an idle session could not
    get it. Here the subscription is open only while the worker waits: one task is received,
    acknowledged, the connection closed, and the task run to the end before the next subscription. A
    task the server sent to a connection that closes before the acknowledgement goes back to its
    queue (``prefect/server/api/task_runs.py``, retry queue). Runs tasks with
    ``TaskWorker._safe_submit_scheduled_task_run`` (Prefect 3.9).
    """

    def __init__(self, *tasks: Any) -> None:
        super().__init__(*tasks, limit=1)
        self.busy = False
        self._task_names = [t.name for t in tasks]

    async def _subscribe_to_task_scheduling(self) -> None:
        base_url = get_current_settings().api.url
        if base_url is None:
            raise ValueError("GPU worker sessions need a Prefect server: set PREFECT_API_URL")
        names = ", ".join(self._task_names)
        get_logger("gpu_worker").info("waiting for gpu-stage tasks (%s; one at a time)", names)
        while True:
            subscription = Subscription(model=TaskRun, path="/task_runs/subscriptions/scheduled",
                                        keys=self.task_keys, client_id=self.client_id, base_url=base_url)
            try:
                scheduled = await subscription.__anext__()
                self.busy = True
            finally:
                if subscription._websocket is not None:
                    await subscription._connect.__aexit__(None, None, None)
            try:
                await self._acquire_token(scheduled.id)
                await self._safe_submit_scheduled_task_run(scheduled)
            finally:
                self.busy = False
