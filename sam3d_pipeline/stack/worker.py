"""The local stack's CPU worker: Prefect's process worker, which also polls the moment it is told of a new run.

A process worker finds new flow runs by polling every ``PREFECT_WORKER_QUERY_SECONDS`` (0.5 s in the stack), so a
studio job waited for the next poll before anything of it started: 0.25 s on average, up to the whole interval.
Polling faster costs CPU on an idle stack (0.25 s: 130 → 178 ms of CPU per second, measured).

``python -m sam3d_pipeline.stack.worker --pool POOL --name NAME [--limit N]`` runs Prefect's own ``ProcessWorker``
the way ``prefect worker start --type process`` does (its arguments, its signal handling, its polling and sync loops),
and also listens on a UNIX datagram socket (``SAM3D_WORKER_WAKE_SOCKET``, mode 0600): a datagram makes it poll at once
with the work of its own polling loop (``get_and_submit_flow_runs``). The job API sends one (``wake``) after it
creates a run or resumes one.

A wake is only a hint. One that is lost (no worker, a full socket buffer) costs the wait for the next regular poll.
A run is never started twice: the worker skips runs it is already submitting and holds one limit slot per run, and
the Prefect server lets only one client move a run from Scheduled to Pending.

The worker also spends less CPU on each run it starts: its Prefect clients share one TLS context, and its settings
are turned into a run's environment variables once (:func:`serve`).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import socket

WAKE_ENV = "SAM3D_WORKER_WAKE_SOCKET"


def wake(path: str | None = None) -> bool:
    """Tell the worker listening on ``path`` (default: ``$SAM3D_WORKER_WAKE_SOCKET``) to poll now; never blocks or
    raises. Returns whether the datagram was sent."""
    path = path or os.environ.get(WAKE_ENV)
    if not path:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(b"poll", path)
    except OSError:
        return False
    return True


def reuse_settings_environment() -> None:
    """Keep what Prefect's settings object turns into environment variables, per object and arguments.

    The process worker does it twice per flow run, for the whole settings object (the job's base environment, then
    the engine command's): ~60 ms of this worker's CPU on each run's way to Running (py-spy on the local stack, 2
    cores). Prefect never changes a settings object in place (a change, e.g. ``temporary_settings``, makes a new
    one), so an object's variables stay what they were. The answer is a new dict each time: a caller may change it.
    The objects are kept alive with their answers (a few per process), so an identity is never reused.
    """
    from prefect.settings.models.root import Settings

    original = Settings.to_environment_variables
    if getattr(original, "reused", False):
        return
    kept: dict[tuple[int, bool, bool, bool], tuple[Settings, dict[str, str]]] = {}

    @functools.wraps(original)
    def variables(self: Settings, exclude_unset: bool = False, include_secrets: bool = True,
                  include_aliases: bool = False) -> dict[str, str]:
        key = (id(self), exclude_unset, include_secrets, include_aliases)
        if key not in kept:
            if len(kept) >= 16:
                kept.clear()
            kept[key] = (self, original(self, exclude_unset=exclude_unset, include_secrets=include_secrets,
                                        include_aliases=include_aliases))
        return dict(kept[key][1])

    variables.reused = True  # type: ignore[attr-defined]
    Settings.to_environment_variables = variables  # type: ignore[method-assign]


async def serve(pool: str, name: str, limit: int | None, path: str | None) -> None:
    """Run the process worker for ``pool`` until it stops; with ``path``, poll also whenever a datagram arrives.

    Its Prefect clients (two per flow run it starts) share one TLS context (``prefect_client.share_tls_context``:
    ~70 ms of CPU per run before its process starts, measured with py-spy), and its settings' environment
    variables are computed once (:func:`reuse_settings_environment`)."""
    from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS, PREFECT_WORKER_PREFETCH_SECONDS
    from prefect.workers.process import ProcessWorker

    from sam3d_pipeline.prefect_client import share_tls_context

    share_tls_context()
    reuse_settings_environment()

    worker = ProcessWorker(name=name, work_pool_name=pool, limit=limit,
                           prefetch_seconds=PREFECT_WORKER_PREFETCH_SECONDS.value(),
                           heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()))
    printer = functools.partial(print, flush=True)
    if not path:
        await worker.start(printer=printer)
        return
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()

    class _Wakes(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            woken.set()  # wakes that arrive during a poll make one more poll, not one each

    async def poll_when_woken() -> None:
        while True:
            await woken.wait()
            woken.clear()
            try:
                await worker.get_and_submit_flow_runs()  # before the worker has synced: returns at once
            except Exception as exc:  # noqa: BLE001 (the API is away: the regular loop backs off and reports it)
                print(f"worker: a poll on wake failed: {type(exc).__name__}: {exc}", flush=True)

    from sam3d_pipeline.stack.warm_runs import private_socket

    sock = private_socket(path, socket.SOCK_DGRAM)
    sock.setblocking(False)
    transport, _ = await loop.create_datagram_endpoint(_Wakes, sock=sock)
    polls = asyncio.create_task(poll_when_woken())
    try:
        await worker.start(printer=printer)
    finally:
        polls.cancel()
        transport.close()
        if os.path.exists(path):
            os.unlink(path)


def main(argv: list[str] | None = None) -> None:
    from prefect.utilities.processutils import setup_signal_handlers_worker

    parser = argparse.ArgumentParser(prog="python -m sam3d_pipeline.stack.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--pool", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--limit", type=int, default=None, help="most flow runs at once")
    args = parser.parse_args(argv)
    # As `prefect worker start`: SIGTERM asks the worker to stop (SIGINT to itself), a second one kills it.
    setup_signal_handlers_worker(os.getpid(), "the process worker", functools.partial(print, flush=True))
    try:
        asyncio.run(serve(args.pool, args.name, args.limit, os.environ.get(WAKE_ENV)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"Worker {args.name!r} stopped!", flush=True)


if __name__ == "__main__":
    main()
