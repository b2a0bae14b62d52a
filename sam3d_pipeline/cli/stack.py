"""Command-line entry points of the event path: ``events-bridge``, ``up`` and ``down`` (registered in cli.py)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from sam3d_pipeline.project import project_dir


def events_bridge(
    queue_url: Annotated[str, typer.Option("--queue-url", help="SQS queue receiving the S3 notifications.")],
    api_url: Annotated[
        str | None, typer.Option("--api-url", help="Prefect API URL (default: PREFECT_API_URL).")
    ] = None,
    max_messages: Annotated[
        int | None, typer.Option("--max-messages", min=1, help="Stop after this many messages (default: never).")
    ] = None,
) -> None:
    """Long-poll SQS and turn each S3 upload into a Prefect event (aws.s3.object.created)."""
    from sam3d_pipeline.events.bridge import EventsBridge

    api_url = api_url or os.environ.get("PREFECT_API_URL")
    if not api_url:
        raise typer.BadParameter("no Prefect API: pass --api-url or set PREFECT_API_URL", param_hint="--api-url")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)

    def _interrupt(signum, frame):  # SIGTERM ends the loop like Ctrl-C: counters are logged on the way out
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    EventsBridge(queue_url, api_url, api_key=os.environ.get("PREFECT_API_KEY")).run(max_messages=max_messages)


StateDir = Annotated[Path, typer.Option("--state-dir", help="Where pids, logs and local-stack.env live.")]


def up(
    state_dir: StateDir = Path(".sam3d"),
    bucket: Annotated[str, typer.Option("--bucket")] = "sam3d-local",
    upload_prefix: Annotated[str, typer.Option("--upload-prefix")] = "uploads/",
    output_prefix: Annotated[str, typer.Option("--output-prefix")] = "outputs/",
    prefect_port: Annotated[int, typer.Option("--prefect-port", help="0 picks a free port.")] = 4200,
    moto_port: Annotated[int, typer.Option("--moto-port", help="0 picks a free port.")] = 5055,
    worker_poll_s: Annotated[float, typer.Option("--worker-poll-s", min=0.1,
                                                 help="The CPU work pool's poll interval.")] = 0.5,
    gpu_worker_poll_s: Annotated[float, typer.Option(
        "--gpu-worker-poll-s", min=0.1, help="The GPU work pool's poll interval (it starts worker sessions).")] = 2.0,
    gpu_workers: Annotated[int, typer.Option("--gpu-workers", min=1, help="Most GPU worker sessions at once.")] = 1,
    db: Annotated[str, typer.Option("--db", help="Prefect's database: sqlite (a file), postgres (its own "
                                    "PostgreSQL server under the state dir) or auto (PostgreSQL where it is "
                                    "installed, unless the state dir already has SQLite's).")] = "auto",
    warm_runs: Annotated[bool, typer.Option(
        "--warm-runs/--cold-runs", help="Fork the CPU pool's flow runs from a process that has imported Prefect "
        "and the flows (default), or start an interpreter per run.")] = True,
) -> None:
    """Start the local stack in the background: moto S3+SQS, Prefect server, workers, events bridge, web server."""
    from sam3d_pipeline.stack.local import (
        LocalStack,
        StackConfig,
        StackError,
        complete,
        running,
        stop_leftovers,
    )

    if db not in ("auto", "sqlite", "postgres"):
        raise typer.BadParameter(f"{db!r}: choose auto, sqlite or postgres", param_hint="--db")
    existing = running(state_dir)
    if existing and complete(existing):
        print(f"already running (state in {state_dir.resolve()}); nothing started. `sam3d-pipeline down` stops it.")
        for name, value in existing.get("env", {}).items():
            print(f"  {name}={value}")
        return
    if existing:  # an `up` killed while starting, or a part gone: stop what is left, then start the whole stack
        stopped = [line for line in stop_leftovers(state_dir) if line.startswith("stopped")]
        print(f"found an incomplete stack in {state_dir.resolve()}; {', '.join(stopped) or 'nothing was running'}; "
              "starting it again", file=sys.stderr)
    config = StackConfig(state_dir=state_dir, project_dir=project_dir(), bucket=bucket,
                         upload_prefix=upload_prefix, output_prefix=output_prefix, prefect_port=prefect_port,
                         moto_port=moto_port, worker_poll_s=worker_poll_s, gpu_worker_poll_s=gpu_worker_poll_s,
                         gpu_workers=gpu_workers, db=db,
                         warm_runs=warm_runs)
    from sam3d_pipeline.web.assets import ensure_browser_packages

    for problem in ensure_browser_packages():  # before the web server starts: it serves them
        print(f"warning: {problem}", file=sys.stderr)
    print("starting moto, Prefect server, workers, a GPU worker session and the events bridge…", file=sys.stderr)
    try:
        stack = LocalStack(config)
        env = stack.up()
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    print(f"Prefect UI:      {env['PREFECT_UI_URL']}")
    print(f"Prefect API:     {env['PREFECT_API_URL']} ({'PostgreSQL' if stack.database == 'postgres' else 'SQLite'})")
    print(f"S3 + SQS (moto): {env['AWS_ENDPOINT_URL']}")
    print(f"upload to:       s3://{env['SAM3D_BUCKET']}/{env['SAM3D_UPLOAD_PREFIX']}")
    print(f"outputs under:   {env['SAM3D_OUTPUT_ROOT']}/")
    print(f"studio:          {env['SAM3D_WEB_URL']}/#token={env['SAM3D_API_TOKEN']}")
    print(f"job API:         {env['SAM3D_WEB_URL']}/v1/jobs (Bearer $SAM3D_API_TOKEN; docs at /docs)")
    print(f"review page:     {env['SAM3D_REVIEW_PAGE_URL']}/review#token={env['SAM3D_REVIEW_TOKEN']}")
    print(f"environment:     set -a; . {(state_dir / 'local-stack.env').resolve()}")


def down(state_dir: StateDir = Path(".sam3d")) -> None:
    """Stop exactly the processes `up` started (by PID)."""
    from sam3d_pipeline.stack.local import LocalStack, StackConfig, read_stack

    if read_stack(state_dir) is None:
        print(f"nothing to stop: no stack recorded in {state_dir.resolve()}")
        return
    LocalStack(StackConfig(state_dir=state_dir, project_dir=project_dir())).down()


def restart(
    name: Annotated[str, typer.Argument(help="The part: prefect-server, postgres, worker, gpu-worker, events-bridge, "
                                        "review-server or moto (as named in stack.json).")],
    state_dir: StateDir = Path(".sam3d"),
) -> None:
    """Start one part of the running stack again (after a crash or a kill): same command, ports and state."""
    from sam3d_pipeline.stack.local import StackError
    from sam3d_pipeline.stack.restart import restart as restart_part

    try:
        pid = restart_part(state_dir, name)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    print(f"restarted {name} (pid {pid})")
