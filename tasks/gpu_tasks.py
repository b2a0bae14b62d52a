"""The GPU stage as a Prefect background task, and the loop that serves it in a warm worker session.

``gpu_stage`` runs one ``GpuBatch`` (``sam3d_pipeline.gpu_stages``) where the models are. Flows submit it with
``.delay()`` (``tasks/gpu_dispatch.py``); ``serve_gpu_tasks`` executes it inside a worker session
(``flows/gpu_worker.py``), one task at a time, with every model cached in the process between tasks, until
the session has been idle for ``idle_s``. While a task runs it keeps its lease fresh in storage
(``sam3d_pipeline.gpu_workers``), so a submitter can tell a killed worker from a slow one.
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

from sam3d_pipeline.gpu_stages import GpuBatch, run_gpu_batch
from sam3d_pipeline.gpu_workers import IdleClock, Lease, SessionLedger, lease_key, session_heartbeat_key
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

    def beat() -> None:
        while not stop.wait(max(0.5, lease_s / 3)):
            lease.heartbeat_at = time.time()
            try:
                storage.write_bytes(key, lease.model_dump_json().encode(), content_type="application/json")
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                continue

    thread = threading.Thread(target=beat, name=f"lease-{task_run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join(timeout=5)
        storage.delete(key)


@task(name="gpu-stage", cache_policy=NO_CACHE, persist_result=True)
def gpu_stage(batch: GpuBatch, submission: str) -> dict[str, Any]:
    """Run one GPU batch here, keeping its lease while it runs.

    Args:
        batch: what to segment and reconstruct (storage keys, never pixels).
        submission: unique per submission, so a resubmitted batch is a new task run, never a cached result.

    Returns:
        ``run_gpu_batch``'s result, with ``timing[stage]`` completed by ``worker`` and ``started_at``.
    """
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


def serve_gpu_tasks(session: str, idle_s: float, poll_s: float = 0.5) -> SessionLedger:
    """Serve ``gpu_stage`` from this process, one task at a time, until idle for ``idle_s`` seconds.

    The subscription stops first, then the task in flight (if any) finishes, so no received task is dropped.
    Returns the ledger of what was served.
    """
    ledger = SessionLedger(session=session)
    _SESSION.update(id=session, ledger=ledger)
    settings = get_settings()
    try:  # the session's own heartbeat: a submitter tells a killed session from a live one by it
        with held_lease(open_storage(settings.output_root, settings), "", session, settings.gpu_lease_s, "session",
                        key=session_heartbeat_key(session)):
            asyncio.run(_serve(idle_s, poll_s))
    finally:
        _SESSION.update(id="", ledger=None)
    return ledger


async def _serve(idle_s: float, poll_s: float) -> None:
    worker = OneAtATimeWorker(gpu_stage)
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

    async def _subscribe_to_task_scheduling(self) -> None:
        base_url = get_current_settings().api.url
        if base_url is None:
            raise ValueError("GPU worker sessions need a Prefect server: set PREFECT_API_URL")
        get_logger("gpu_worker").info("waiting for gpu-stage tasks (one at a time)")
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
