"""``sam3d-pipeline up`` / ``down``: the whole event-driven pipeline on one machine, in the background.

``up`` starts, each in its own process session with its log under ``<state dir>/logs/``:

1. a moto server (S3 + SQS) with the bucket, a queue (and its dead-letter queue) and the bucket
   notification ``s3:ObjectCreated:*`` under the upload prefix → that queue;
2. a Prefect server on its own PostgreSQL server (cluster under ``<state dir>/postgres/``, ``stack_db``), as
   Prefect recommends for production, where PostgreSQL is installed (``--db auto``, the default; a state dir that
   already has SQLite's database keeps it), else on SQLite (database under ``<state dir>/prefect/``); ``--db``
   chooses either;
3. the ``sam3d-cpu`` process work pool, the deployments of ``prefect.yaml`` (with their event trigger),
   and a worker polling every ``--worker-poll-s`` seconds (Prefect's default is 10 s) and at once when the job API
   creates or resumes a run (``stack/worker.py``);
4. the GPU stand-in: the ``sam3d-gpu`` pool (a process pool here, ECS on g5 in the cloud), the ``gpu-worker``
   deployment, its worker, and one warm GPU worker session; the stack runs with ``SAM3D_GPU_STAGES=workers``,
   so uploads, ``run``/``catalog`` with the stack's env and the review page all share the warm models, and
   more sessions start (up to ``--gpu-workers``) when work queues up;
5. the events bridge (SQS → Prefect events) and the web server (studio, job API with webhooks, review page;
   recorded as ``review-server``), its token and webhook secret made up here; its webhooks may reach receivers on
   loopback (``SAM3D_WEBHOOK_ALLOW_NETWORKS``), never the stack's own services.

The logs, ``stack.json`` and ``local-stack.env`` hold the token: they are readable by their owner only (0600).

It waits until each answers, prints the URLs, and writes them to ``<state dir>/local-stack.env`` for
``set -a; . .sam3d/local-stack.env``. The PIDs go to ``<state dir>/stack.json``; ``down`` stops exactly
those processes (checking each PID still belongs to the process that ``up`` started) and says so.
``up`` while a stack from the same state dir is running prints its URLs and starts nothing.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sam3d_pipeline.project import project_dir
from sam3d_pipeline.stack.unresponsive import LOCAL_HEARTBEAT_S, heartbeat_env, unresponsive_runs_automation
from sam3d_pipeline.stack.worker import WAKE_ENV

STACK_FILE = "stack.json"
ENV_FILE = "local-stack.env"
POOL_NAME = "sam3d-cpu"
GPU_POOL_NAME = "sam3d-gpu"
GPU_WORKER_DEPLOYMENT = "gpu-worker/gpu-worker"
STOP_ORDER = ("events-bridge", "review-server", "gpu-worker", "worker", "warm-runs", "prefect-server", "postgres",
              "moto")
LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Webhook receivers on this machine (tests, a developer's receiver); moto, Prefect and the web server stay refused.
LOCAL_WEBHOOK_ALLOW_NETWORKS = "127.0.0.0/8,::1/128"


def open_private(path: Path, mode: str = "ab"):
    """Open ``path`` for writing, readable by its owner only (0600, also when it existed with a wider mode)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, mode)


def write_env_file(path: Path, exported: dict[str, str]) -> None:
    """Write ``local-stack.env`` (it holds the API token and the webhook secret): 0600, replaced atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with open_private(tmp, "w") as out:
        out.write("# Written by `sam3d-pipeline up`; load with: set -a; . " + str(path) + "\n"
                  + "".join(f"{k}={shlex.quote(v)}\n" for k, v in exported.items()))
    tmp.replace(path)


class StackError(RuntimeError):
    """A part of the local stack did not start; the message names it and points at its log."""


@dataclass
class StackConfig:
    """What ``up`` builds.

    Attributes:
        state_dir: where pids, logs, the Prefect database and ``local-stack.env`` live.
        project_dir: the folder holding ``prefect.yaml`` and ``flows/``.
        bucket: the bucket uploads go to (outputs go under ``output_prefix`` in the same bucket).
        upload_prefix: only uploads under this prefix start runs.
        output_prefix: the pipeline's output root inside the bucket (never starts runs).
        prefect_port, moto_port: loopback ports; 0 picks a free one.
        worker_poll_s: the CPU pool worker's poll interval (seconds): most of an upload's wait before its run starts.
        gpu_worker_poll_s: the GPU pool worker's poll interval (seconds). It only starts GPU worker sessions (a
            process and a model load: seconds), and each poll is a write to Prefect's database (measured here:
            ~22 ms of the server's CPU per poll, ~45 ms/s at 0.5 s), so it looks less often than the CPU pool's.
        gpu_workers: most GPU worker sessions at once (``SAM3D_GPU_MAX_WORKERS``); one starts with the stack.
        visibility_timeout_s: SQS visibility timeout: how soon an unfinished message is redelivered.
        cpu_runs: most flow runs the CPU worker runs at once (each is a process): a burst of uploads waits as
            Scheduled runs instead of starting a process per upload at once.
        db: the Prefect server's database: ``sqlite`` (a file), ``postgres`` (``stack_db``) or ``auto`` (the
            default: PostgreSQL where its server is installed, else SQLite). On SQLite an upload's run is often
            created seconds late: the deployment trigger's create-run call meets another writer's commit
            ("database is locked", answered 503) and Prefect's client tries again 2 s later, then 4 s (measured
            here, 20 uploads: PUT → run created p95 5.84 s on SQLite, 0.44 s on PostgreSQL).
        postgres_port: PostgreSQL's loopback port with ``db="postgres"``; 0 picks a free one.
        timeout_s: how long to wait for each part to answer.
        warm_runs: the CPU pool's flow runs fork from the warm flow-run server (``stack/warm_runs.py``); False:
            each starts its own interpreter (Prefect's default).
    """

    state_dir: Path
    project_dir: Path
    bucket: str = "sam3d-local"
    upload_prefix: str = "uploads/"
    output_prefix: str = "outputs/"
    prefect_port: int = 4200
    moto_port: int = 5055
    review_port: int = 8765  # the web server's (studio, job API, review page)
    worker_poll_s: float = 0.5
    gpu_worker_poll_s: float = 2.0
    gpu_workers: int = 1
    visibility_timeout_s: int = 10
    cpu_runs: int = field(default_factory=lambda: max(2, 2 * (os.cpu_count() or 1)))
    db: str = "auto"
    postgres_port: int = 0
    timeout_s: float = 180.0
    warm_runs: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)


GPU_ENV_KEYS = ("SAM3D_GPU_STAGES", "SAM3D_GPU_MAX_WORKERS", "SAM3D_SEGMENTER", "SAM3D_RECONSTRUCTOR",
                "PREFECT_LOCAL_STORAGE_PATH")


def local_gpu_env(prefect_home: Path, gpu_workers: int, env: dict[str, str]) -> dict[str, str]:
    """The stack's GPU settings: model stages on the warm worker sessions, task parameters and results in one
    folder that every process of the stack shares, and what ``auto`` means on this machine's stand-in workers
    (the backends usable here, e.g. ``lite`` without a SAM 3 checkpoint), unless the environment says."""
    from sam3d_pipeline.backends import resolve
    from sam3d_pipeline.settings import Settings

    here = Settings(gpu_stages="inline")
    return {
        "SAM3D_GPU_STAGES": "workers",
        "SAM3D_GPU_MAX_WORKERS": str(gpu_workers),
        "SAM3D_SEGMENTER": env.get("SAM3D_SEGMENTER") or resolve("segmenter", "auto", here).name,
        "SAM3D_RECONSTRUCTOR": env.get("SAM3D_RECONSTRUCTOR") or resolve("reconstructor", "auto", here).name,
        "PREFECT_LOCAL_STORAGE_PATH": env.get("PREFECT_LOCAL_STORAGE_PATH") or str(prefect_home / "storage"),
    }


def _free_port(preferred: int) -> int:
    if preferred:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_time(pid: int) -> float | None:
    """When ``pid`` started (psutil's create time), or None when no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(entry: dict[str, Any]) -> bool:
    """True when the recorded process still runs and is the one ``up`` started (not a reused PID)."""
    started = _start_time(entry["pid"])
    return started is not None and started == entry.get("start_time") and not _is_zombie(entry["pid"])


def read_stack(state_dir: Path) -> dict[str, Any] | None:
    """The recorded stack (``stack.json``), or None when there is none."""
    path = state_dir / STACK_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _http_ok(url: str, timeout_s: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=timeout_s).is_success
    except httpx.HTTPError:
        return False


def prefect_healthy(api_url: str) -> bool:
    """True when the Prefect server at ``api_url`` answers its health check."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api_url, httpx_settings={"timeout": 2.0}) as client:
        return client.api_healthcheck() is None


def _wait(what: str, check, timeout_s: float, log: Path, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with status {proc.returncode}; see {log}")
        if check():
            return
        time.sleep(0.2)
    raise StackError(f"{what} did not answer within {timeout_s:.0f} s; see {log}")


class LocalStack:
    """Starts and stops the processes of one local stack (see the module docstring)."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.state_dir = config.state_dir.resolve()
        self.logs = self.state_dir / "logs"
        self.processes: dict[str, dict[str, Any]] = {}

    @functools.cached_property
    def database(self) -> str:
        """``sqlite`` or ``postgres``: ``config.db``, where ``auto`` keeps the database this state dir already has
        (Prefect's runs survive ``down``) and gives a new one PostgreSQL where its server is installed."""
        if self.config.db != "auto":
            return self.config.db
        from sam3d_pipeline.stack import db

        if (self.prefect_home / "prefect.db").exists() and not (self.state_dir / "postgres").exists():
            return "sqlite"
        return "postgres" if db.installed() else "sqlite"

    # -- helpers -----------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        self.logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.logs.chmod(0o700)
        log = self.logs / f"{name}.log"
        with open_private(log, "ab") as out:  # the web server's log shows its token
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True)
        # argv, cwd and the stack's own variables (with the SAM3D_ settings it was started with) let
        # ``stack_restart`` start the same process again.
        own_env = {k: v for k, v in env.items()
                   if k.startswith(("PREFECT_", "AWS_", "SAM3D_")) or os.environ.get(k) != v}
        self.processes[name] = {"pid": proc.pid, "start_time": _start_time(proc.pid), "log": str(log),
                                "argv": argv, "cwd": str(cwd) if cwd else None, "env": own_env}
        self._save()
        return proc

    def _save(self, **extra: Any) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        current = read_stack(self.state_dir) or {}
        current.update(extra)
        current["processes"] = self.processes
        tmp = self.state_dir / (STACK_FILE + ".tmp")
        tmp.unlink(missing_ok=True)
        tmp.touch(mode=0o600)  # it holds the review token and the database password
        tmp.write_text(json.dumps(current, indent=2))
        tmp.replace(self.state_dir / STACK_FILE)

    def _run(self, what: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
        try:
            result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                                    timeout=self.config.timeout_s)
        except subprocess.TimeoutExpired:
            raise StackError(f"{what} did not finish within {self.config.timeout_s:.0f} s") from None
        if result.returncode != 0:
            raise StackError(f"{what} failed ({result.returncode}): {(result.stdout + result.stderr)[-2000:]}")
        return result.stdout

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
        env.update(LOCAL_CREDENTIALS)
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.config.extra_env)
        return env

    # -- up --------------------------------------------------------------------------------------------
    def up(self) -> dict[str, str]:
        """Start everything and return the environment written to ``local-stack.env``.

        Raises:
            StackError: a part did not start (what was started is stopped again).
        """
        try:
            return self._up()
        except BaseException:
            self.down(quiet=True)
            raise

    # -- up: the steps ---------------------------------------------------------------------------------
    @property
    def prefect_home(self) -> Path:
        return self.state_dir / "prefect"

    @property
    def wake_socket(self) -> str:
        """The CPU worker's wake socket (``stack/worker.py``)."""
        from sam3d_pipeline.stack.warm_runs import socket_path

        return str(socket_path(self.state_dir, "worker-wake"))

    @property
    def output_root(self) -> str:
        return f"s3://{self.config.bucket}/{self.config.output_prefix.strip('/')}"

    @property
    def marker_root(self) -> str:
        return f"s3://{self.config.bucket}/_sam3d/events"

    def _up(self) -> dict[str, str]:
        self._save(state_dir=str(self.state_dir))
        env = self._base_env()
        moto_url, queue_url = self._start_moto(env)
        api_url = self._start_prefect_server(env)
        # Paused runs link to the review page of the web server started last.
        web_port = _free_port(self.config.review_port)
        web_url = f"http://127.0.0.1:{web_port}"
        stack_env = self._stack_env(env, api_url, moto_url, web_url)
        self._start_workers(stack_env, api_url)
        self._start_bridge(stack_env, queue_url)
        web_env = {
            "SAM3D_API_TOKEN": secrets.token_urlsafe(24),
            "SAM3D_WEBHOOK_SECRET": secrets.token_urlsafe(32),
            "SAM3D_WEBHOOK_ALLOW_NETWORKS": env.get("SAM3D_WEBHOOK_ALLOW_NETWORKS") or LOCAL_WEBHOOK_ALLOW_NETWORKS,
        }
        self._start_web(stack_env | web_env, moto_url, web_port)
        exported = self._exported(stack_env, web_env, queue_url)
        env_file = self.state_dir / ENV_FILE
        write_env_file(env_file, exported)
        self._save(env=exported, env_file=str(env_file))
        return exported

    def _start_moto(self, env: dict[str, str]) -> tuple[str, str]:
        """1. moto: S3 + SQS, the bucket, the queue and the notification. Returns moto's URL and the queue's."""
        port = _free_port(self.config.moto_port)
        url = f"http://127.0.0.1:{port}"
        proc = self._spawn("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env)
        _wait("moto server", lambda: _http_ok(f"{url}/moto-api/"), self.config.timeout_s, self.logs / "moto.log",
              proc)
        return url, self._wire_bucket(url)

    def _start_prefect_server(self, env: dict[str, str]) -> str:
        """2. The Prefect server (SQLite under the state dir, or its own PostgreSQL server). Returns its API URL."""
        port = _free_port(self.config.prefect_port)
        api_url = f"http://127.0.0.1:{port}/api"
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        database_url = f"sqlite+aiosqlite:///{self.prefect_home / 'prefect.db'}"
        if self.database == "postgres":
            database_url = self._start_postgres(env)
        server_env = env | {
            "PREFECT_HOME": str(self.prefect_home),
            "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        proc = self._spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host",
                                              "127.0.0.1", "--port", str(port)], server_env)
        _wait("Prefect server", lambda: prefect_healthy(api_url), self.config.timeout_s,
              self.logs / "prefect-server.log", proc)
        return api_url

    def _stack_env(self, env: dict[str, str], api_url: str, moto_url: str, web_url: str) -> dict[str, str]:
        """The environment of every process of the stack after the Prefect server."""
        stack_env = env | {
            "SAM3D_REVIEW_PAGE_URL": web_url,
            "SAM3D_WEB_URL": web_url,
            "PREFECT_HOME": str(self.prefect_home),
            "PREFECT_API_URL": api_url,
            "AWS_ENDPOINT_URL": moto_url,
            "SAM3D_OUTPUT_ROOT": self.output_root,
            "SAM3D_UPLOAD_PREFIX": self.config.upload_prefix,
            "SAM3D_EVENT_MARKER_ROOT": self.marker_root,
            "SAM3D_PROJECT_DIR": str(self.config.project_dir),
        }
        return stack_env | local_gpu_env(self.prefect_home, self.config.gpu_workers, env)

    def _start_workers(self, stack_env: dict[str, str], api_url: str) -> None:
        """3. and 4. The work pools, their deployments and workers, the automation that crashes runs whose process
        died, and the first warm GPU worker session."""
        cfg, python = self.config, sys.executable
        worker_env = stack_env | {
            "PREFECT_WORKER_QUERY_SECONDS": str(cfg.worker_poll_s),
            "PREFECT_WORKER_PREFETCH_SECONDS": "5",
            **heartbeat_env(self.heartbeat_s),
        }
        for pool, deployment, name in ((POOL_NAME, "image-to-3d", "worker"),
                                       (GPU_POOL_NAME, "gpu-worker", "gpu-worker")):
            self._run(f"work pool {pool}", [python, "-m", "prefect", "--no-prompt", "work-pool", "create", pool,
                                            "--type", "process", "--overwrite"], stack_env)
            self._run(f"prefect deploy {deployment}", [python, "-m", "prefect", "--no-prompt", "deploy", "--name",
                                                       deployment], stack_env, cwd=cfg.project_dir)
            limit = ["--limit", str(cfg.cpu_runs)] if pool == POOL_NAME else []  # a burst waits as Scheduled runs
            warm = pool == POOL_NAME and cfg.warm_runs
            pool_env = worker_env | (self._start_warm_runs(worker_env, api_url) if warm else {})
            if pool == GPU_POOL_NAME:
                pool_env["PREFECT_WORKER_QUERY_SECONDS"] = str(cfg.gpu_worker_poll_s)
                start = [python, "-m", "prefect", "worker", "start", "--type", "process"]
            else:  # Prefect's process worker, which also polls when the job API says it created a run
                pool_env[WAKE_ENV] = self.wake_socket
                start = [python, "-m", "sam3d_pipeline.stack.worker"]
            proc = self._spawn(name, [*start, "--pool", pool, "--name", f"sam3d-local-{name}", *limit], pool_env,
                               cwd=cfg.project_dir)
            _wait(name, lambda pool=pool: self._worker_online(api_url, pool), cfg.timeout_s,
                  self.logs / f"{name}.log", proc)
        # A run whose process died with its worker is found by its missing heartbeats (then rescheduled).
        self._replace_automation(api_url, unresponsive_runs_automation(self.heartbeat_s))
        ended = crash_stopped_sessions(api_url)
        if ended:
            print(f"marked {ended} GPU worker session(s) of the stack stopped before as Crashed", flush=True)
        # One warm session from the start; the flows start more (up to --gpu-workers) when work queues up.
        self._run("first GPU worker session", [python, "-m", "prefect", "deployment", "run", GPU_WORKER_DEPLOYMENT],
                  stack_env)

    def _start_warm_runs(self, worker_env: dict[str, str], api_url: str) -> dict[str, str]:
        """3a. The warm flow-run server (``stack/warm_runs.py``): the CPU pool's runs fork from a process that has
        imported Prefect and the flows, instead of starting an interpreter each. Sets the pool's ``command`` to
        the launcher and returns what its worker needs in its environment."""
        from sam3d_pipeline.stack import warm_runs

        path = warm_runs.socket_path(self.state_dir)
        log = self.logs / "warm-runs.log"
        proc = self._spawn("warm-runs", [sys.executable, "-m", "sam3d_pipeline.stack.warm_runs", "serve", str(path)],
                           worker_env, cwd=self.config.project_dir)
        _wait("warm flow-run server", lambda: log.exists() and "ready on" in log.read_text(), self.config.timeout_s,
              log, proc)
        set_pool_command(api_url, POOL_NAME, warm_runs.launcher_command())
        return {warm_runs.SOCKET_ENV: str(path)}

    def _start_bridge(self, stack_env: dict[str, str], queue_url: str) -> None:
        """5. The events bridge (SQS → Prefect events)."""
        log = self.logs / "events-bridge.log"
        proc = self._spawn("events-bridge", [sys.executable, "-m", "sam3d_pipeline.cli", "events-bridge",
                                             "--queue-url", queue_url], stack_env | {"SAM3D_BRIDGE_WAIT_S": "10"})
        _wait("events bridge", lambda: log.exists() and "events bridge:" in log.read_text(), self.config.timeout_s,
              log, proc)

    def _start_web(self, web_env: dict[str, str], moto_url: str, web_port: int) -> None:
        """5. The web server: studio, job API (webhooks signed with the secret), review page; one token for all. It
        wakes the CPU worker when it creates or resumes a run."""
        web_url = web_env["SAM3D_WEB_URL"]
        web_env = web_env | {WAKE_ENV: self.wake_socket}
        self._allow_page_origin(moto_url, web_url)
        proc = self._spawn("review-server", [sys.executable, "-m", "sam3d_pipeline.cli", "web", "--port",
                                             str(web_port)], web_env)
        _wait("web server", lambda: _http_ok(f"{web_url}/openapi.json"), self.config.timeout_s,
              self.logs / "review-server.log", proc)

    def _exported(self, stack_env: dict[str, str], web_env: dict[str, str], queue_url: str) -> dict[str, str]:
        """What ``local-stack.env`` exports: how a shell (``run``, ``catalog``, a client of the job API) reaches
        the stack."""
        cfg = self.config
        return {
            "AWS_ENDPOINT_URL": stack_env["AWS_ENDPOINT_URL"],
            **LOCAL_CREDENTIALS,
            "PREFECT_API_URL": stack_env["PREFECT_API_URL"],
            "PREFECT_UI_URL": stack_env["PREFECT_API_URL"].removesuffix("/api"),
            "SAM3D_BUCKET": cfg.bucket,
            "SAM3D_UPLOAD_PREFIX": cfg.upload_prefix,
            "SAM3D_OUTPUT_PREFIX": cfg.output_prefix,
            "SAM3D_OUTPUT_ROOT": self.output_root,
            "SAM3D_QUEUE_URL": queue_url,
            "SAM3D_EVENT_MARKER_ROOT": self.marker_root,
            "SAM3D_WEB_URL": stack_env["SAM3D_WEB_URL"],
            **web_env,
            "SAM3D_REVIEW_PAGE_URL": stack_env["SAM3D_REVIEW_PAGE_URL"],
            "SAM3D_REVIEW_TOKEN": web_env["SAM3D_API_TOKEN"],
            **{k: stack_env[k] for k in GPU_ENV_KEYS},
        }

    def _start_postgres(self, env: dict[str, str]) -> str:
        """Start the stack's PostgreSQL (``stack_db``) and return Prefect's connection URL for it."""
        from sam3d_pipeline.stack.db import LocalPostgres, PostgresError

        postgres = LocalPostgres(self.state_dir / "postgres", _free_port(self.config.postgres_port))
        try:
            proc = self._spawn("postgres", postgres.prepare(self.config.timeout_s), env)
            postgres.wait_ready(self.config.timeout_s, self.logs / "postgres.log", proc)
        except PostgresError as exc:
            raise StackError(str(exc)) from None
        self._save(db="postgres")
        return postgres.url

    def _wire_bucket(self, moto_url: str) -> str:
        import boto3

        cfg = self.config
        kwargs = {"endpoint_url": moto_url, "region_name": LOCAL_CREDENTIALS["AWS_DEFAULT_REGION"],
                  "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        s3 = boto3.client("s3", **kwargs)
        sqs = boto3.client("sqs", **kwargs)
        s3.create_bucket(Bucket=cfg.bucket)
        dlq_url = sqs.create_queue(QueueName="sam3d-uploads-dlq")["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        queue_url = sqs.create_queue(
            QueueName="sam3d-uploads",
            Attributes={
                "VisibilityTimeout": str(cfg.visibility_timeout_s),
                "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}),
            },
        )["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        rules = [{"Name": "prefix", "Value": cfg.upload_prefix}] if cfg.upload_prefix else []
        s3.put_bucket_notification_configuration(
            Bucket=cfg.bucket,
            NotificationConfiguration={
                "QueueConfigurations": [{
                    "Id": "sam3d-uploads",
                    "QueueArn": queue_arn,
                    "Events": ["s3:ObjectCreated:*"],
                    **({"Filter": {"Key": {"FilterRules": rules}}} if rules else {}),
                }]
            },
        )
        return queue_url

    def _allow_page_origin(self, moto_url: str, origin: str) -> None:
        """Let the web server's pages fetch presigned outputs from the bucket (CORS for ``origin``)."""
        import boto3

        s3 = boto3.client("s3", endpoint_url=moto_url, region_name=LOCAL_CREDENTIALS["AWS_DEFAULT_REGION"],
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.put_bucket_cors(Bucket=self.config.bucket, CORSConfiguration={"CORSRules": [{
            "AllowedOrigins": [origin], "AllowedMethods": ["GET", "HEAD"], "AllowedHeaders": ["*"],
            "ExposeHeaders": ["Content-Length", "Content-Type", "ETag"], "MaxAgeSeconds": 3600}]})

    @property
    def heartbeat_s(self) -> int:
        value = os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(LOCAL_HEARTBEAT_S))
        try:
            heartbeat_env(int(value))
        except ValueError:
            raise StackError(f"PREFECT_FLOWS_HEARTBEAT_FREQUENCY={value!r}: a whole number of seconds, at least 30, "
                             "is needed") from None
        return int(value)

    @staticmethod
    def _replace_automation(api_url: str, automation: dict[str, Any]) -> None:
        """Create ``automation``, replacing one of the same name (a state dir's server keeps its automations).

        Prefect's client retries while the server is busy (a freshly started SQLite server answers 503 for a few
        seconds under load)."""
        import httpx
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.events.schemas.automations import AutomationCore

        try:
            with SyncPrefectClient(api_url) as client:
                for existing in client.read_automations_by_name(automation["name"]):
                    client.delete_automation(existing.id)
                client.create_automation(AutomationCore.model_validate(automation))
        except (httpx.HTTPError, ValueError) as exc:
            raise StackError(f"could not create the automation {automation['name']!r}: {exc}") from exc

    @staticmethod
    def _worker_online(api_url: str, pool: str = POOL_NAME) -> bool:
        import httpx
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.objects import WorkerStatus

        try:
            with SyncPrefectClient(api_url) as client:
                workers = client.read_workers_for_work_pool(pool)
        except (httpx.HTTPError, ValueError):
            return False
        return any(w.status == WorkerStatus.ONLINE for w in workers)

    # -- down ------------------------------------------------------------------------------------------
    def down(self, quiet: bool = False) -> list[str]:
        """Stop the processes recorded in ``stack.json`` (bridge, worker, server, moto) by PID.

        Returns:
            One line per process: what was stopped, or that it was no longer running.
        """
        recorded = read_stack(self.state_dir)
        processes = dict((recorded or {}).get("processes", {}))
        processes.update(self.processes)
        lines = []
        for name in sorted(processes, key=lambda n: STOP_ORDER.index(n) if n in STOP_ORDER else -1):
            entry = processes[name]
            if not _alive(entry):
                lines.append(f"{name} (pid {entry['pid']}) was not running")
                continue
            _stop_group(entry["pid"])
            lines.append(f"stopped {name} (pid {entry['pid']})")
        for leftover in (STACK_FILE, ENV_FILE):
            (self.state_dir / leftover).unlink(missing_ok=True)
        self.processes = {}
        if not quiet:
            for line in lines:
                print(line)
        return lines


def crash_stopped_sessions(api_url: str, deployment: str = GPU_WORKER_DEPLOYMENT.split("/")[1]) -> int:
    """Mark Crashed the GPU worker sessions (runs of ``deployment``) that a stack stopped before left Running or
    Pending; returns how many.

    ``down`` stops a session's process with the rest, and nothing is left to report its end: the run stayed
    Running, holding one of the deployment's session slots (``--gpu-workers``) for good, so after a few ``down`` and
    ``up`` no new session could start and every GPU stage waited. ``up`` calls this before it starts the first
    session, when no process of the earlier stack is left (``up`` starts only on a stopped state dir).
    """
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    with SyncPrefectClient(api_url) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))))
        for run in runs:
            client.set_flow_run_state(run.id, Crashed(message="the local stack was stopped (`down`) while this "
                                                              "GPU worker session ran"), force=True)
    return len(runs)


def set_pool_command(api_url: str, pool: str, command: str) -> None:
    """Make ``command`` the default command of the process work pool's flow runs (its base job template)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolUpdate

    with SyncPrefectClient(api_url) as client:
        template = client.read_work_pool(pool).base_job_template
        template["variables"]["properties"]["command"]["default"] = command
        client.update_work_pool(pool, WorkPoolUpdate(base_job_template=template))


def _stop_group(pid: int, grace_s: float = 15.0) -> None:
    """SIGTERM the process group ``up`` started (its session leader is ``pid``), SIGKILL after ``grace_s``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            waited = 0
        if waited == pid or _start_time(pid) is None or _is_zombie(pid):
            break
        time.sleep(0.1)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:  # flow-run processes the worker started share its group; make sure none outlive it
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _is_zombie(pid: int) -> bool:
    """True when ``pid`` has ended (a zombie waiting for its parent, or gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return True


def complete(recorded: dict[str, Any]) -> bool:
    """True when ``up`` finished this stack (it wrote the environment last) and every process it recorded runs.

    A stack whose ``up`` was killed while starting, or one with a part gone, is not: ``up`` stops what is left of it
    and starts the whole stack again.
    """
    processes = recorded.get("processes", {})
    return bool(recorded.get("env")) and bool(processes) and all(_alive(p) for p in processes.values())


def stop_leftovers(state_dir: Path) -> list[str]:
    """Stop what a stack that is not ``complete`` left running (by the PIDs it recorded). Returns what was done."""
    return LocalStack(StackConfig(state_dir=state_dir, project_dir=project_dir())).down(quiet=True)


def running(state_dir: Path) -> dict[str, Any] | None:
    """The recorded stack when at least one of its processes still runs, else None."""
    recorded = read_stack(state_dir)
    if recorded and any(_alive(p) for p in recorded.get("processes", {}).values()):
        return recorded
    return None
