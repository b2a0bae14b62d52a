"""Scale: chunked catalog planning, the run keeper's decisions, the stack's PostgreSQL, and a burst of uploads that
loses and doubles nothing while each process of the stack is killed and restarted.

The stack tests share one ``sam3d-pipeline up --db postgres`` (module fixture) with short leases and keeper
intervals, so a lost worker or run is noticed in seconds; its teardown runs ``down`` and checks by PID and by
port that nothing it started still runs. Each kill test PUTs a small burst, SIGKILLs one process group mid-burst,
starts it again with ``sam3d-pipeline restart`` and checks that every upload has exactly one flow run, Completed,
and one ``result.json`` naming that run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sam3d_pipeline.events.keeper import Accepted, decide, match_runs
from sam3d_pipeline.gpu.workers import Lease, session_lost
from sam3d_pipeline.stack.db import LocalPostgres, find_binary, server_account
from sam3d_pipeline.stack.local import _alive, read_stack
from sam3d_pipeline.stack.restart import _port_open

from .photos import encode, object_photo
from .servers import free_port
from .stack import CLI, Stack

HAVE_POSTGRES = True
try:
    find_binary("initdb")
except RuntimeError:
    HAVE_POSTGRES = False
needs_postgres = pytest.mark.skipif(not HAVE_POSTGRES, reason="PostgreSQL's server is installed by `make postgres`")


# -- the run keeper's decisions and the session heartbeat (no Prefect) ------------------------------------------

def _run(run_id: str, image: str, created: float, state: str = "RUNNING", run_count: int = 1,
         message: str = "", state_at: float | None = None) -> dict:
    iso = datetime.fromtimestamp(created, UTC).isoformat()
    stamp = datetime.fromtimestamp(state_at if state_at is not None else created, UTC).isoformat()
    return {"id": run_id, "created": iso, "parameters": {"image": image}, "state_type": state,
            "run_count": run_count, "state": {"name": state.title(), "message": message, "timestamp": stamp}}


def _accepted(event_id: str, image: str, posted_at: float) -> Accepted:
    bucket, key = image[5:].split("/", 1)
    return Accepted(event_id=event_id, image=image, posted_at=posted_at,
                    event={"id": event_id, "payload": {"bucket": bucket, "key": key}})


def test_keeper_pairs_each_upload_with_its_own_run():
    now = 1_800_000_000.0
    first, again, other = (_accepted("e1", "s3://b/k.png", now - 100), _accepted("e2", "s3://b/k.png", now - 50),
                           _accepted("e3", "s3://b/o.png", now - 40))
    runs = [_run("r-new", "s3://b/k.png", now - 49), _run("r-old", "s3://b/k.png", now - 99),
            _run("r-stale", "s3://b/o.png", now - 4000)]  # a run of an earlier upload of o.png
    paired = match_runs([first, again, other], runs)
    assert paired["e1"]["id"] == "r-old" and paired["e2"]["id"] == "r-new"  # oldest run to the oldest upload
    assert "e3" not in paired  # created long before the upload was posted: not its run
    other.run_id = "r-other"  # a run paired once stays paired, and is offered to nobody else
    assert match_runs([other, _accepted("e4", "s3://b/o.png", now)],
                      [_run("r-other", "s3://b/o.png", now - 30)]) == {"e3": _run("r-other", "s3://b/o.png", now - 30)}


def test_keeper_reposts_reschedules_and_gives_up_when_it_should():
    now, image = 1_800_000_000.0, "s3://b/k.png"
    upload = _accepted("e1", image, now - 30)
    kw = {"now": now, "repost_after_s": 60, "attempts": 3, "pending_timeout_s": 120}
    assert decide(upload, None, **kw) == "wait"  # the trigger may still be on it
    upload.posted_at = now - 61
    assert decide(upload, None, **kw) == "repost"
    upload.reposts = 1
    assert decide(upload, None, **kw) == "wait"  # the next repost waits twice as long
    upload.reposts, upload.posted_at = 3, now - 1000
    assert decide(upload, None, **kw) == "give_up"
    fresh = _accepted("e2", image, now - 5)
    assert decide(fresh, _run("r", image, now - 4, "COMPLETED"), **kw) == "done"
    refused = "Flow run encountered an exception: InputError: photo.png: file is empty"
    assert decide(fresh, _run("r", image, now - 4, "FAILED", message=refused), **kw) == "done"
    lost = "Flow run encountered an exception: ConnectError: All connection attempts failed"
    assert decide(fresh, _run("r", image, now - 4, "FAILED", message=lost), **kw) == "reschedule"
    assert decide(fresh, _run("r", image, now - 4, "CRASHED"), **kw) == "reschedule"
    assert decide(fresh, _run("r", image, now - 4, "CRASHED", run_count=3), **kw) == "give_up"
    assert decide(fresh, _run("r", image, now - 300, "PENDING", run_count=0, state_at=now - 60), **kw) == "wait"
    assert decide(fresh, _run("r", image, now - 300, "PENDING", run_count=0, state_at=now - 121), **kw) == "reschedule"
    assert decide(fresh, _run("r", image, now - 300, "RUNNING", state_at=now - 900), **kw) == "wait"


def test_a_session_is_lost_only_when_its_heartbeat_stopped():
    beat = Lease(task_run_id="", session="s", started_at=100.0, heartbeat_at=100.0)
    assert not session_lost(beat, now=129.0, lease_s=30)
    assert session_lost(beat, now=131.0, lease_s=30)
    assert not session_lost(None, now=10_000.0, lease_s=30)  # never seen: not judged


# -- the stack's PostgreSQL -------------------------------------------------------------------------------------

@needs_postgres
@pytest.mark.slow
def test_local_postgres_runs_from_a_private_folder_and_stops_by_pid(tmp_path):
    import asyncio

    import asyncpg

    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # like /root or a pytest folder: the server account cannot list it
    postgres = LocalPostgres(private / "postgres", free_port())
    account = server_account()
    assert (account.name != "root") and (os.geteuid() != 0 or account.prefix)
    log = tmp_path / "postgres.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(postgres.prepare(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        postgres.wait_ready(60, log, proc)
        assert (private / "postgres" / "password").stat().st_mode & 0o077 == 0
        assert postgres.url.startswith(f"postgresql+asyncpg://sam3d:{postgres.password}@127.0.0.1:{postgres.port}/")

        async def check() -> tuple[str, str]:
            conn = await asyncpg.connect(host="127.0.0.1", port=postgres.port, user="sam3d",
                                         password=postgres.password, database="prefect")
            try:
                return await conn.fetchval("SELECT current_user"), await conn.fetchval("SHOW listen_addresses")
            finally:
                await conn.close()

        assert asyncio.run(check()) == ("sam3d", "127.0.0.1")

        async def wrong_password() -> None:
            await asyncpg.connect(host="127.0.0.1", port=postgres.port, user="sam3d", password="nope",
                                  database="prefect")

        with pytest.raises(asyncpg.InvalidPasswordError):
            asyncio.run(wrong_password())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert not _port_open(postgres.port)
    assert LocalPostgres(private / "postgres", free_port()).prepare()  # a second start reuses the cluster


# -- chunked planning in the catalog-batch flow -----------------------------------------------------------------

@pytest.mark.slow
def test_chunked_planning_keeps_per_item_outcomes(prefect_server, tmp_path):
    """Rows planned two at a time: every row keeps its own outcome (skipped, completed, failed, duplicate) in the
    flow's result and catalog.json, and the flow run holds one task run per chunk and per GPU batch, not per row."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.catalog_batch import catalog_batch
    from sam3d_pipeline import catalog
    from sam3d_pipeline.storage import LocalStorage

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        (photos / f"p{i}.png").write_bytes(encode(object_photo(96, 72, seed=40 + i)[0]))
    (photos / "empty.png").write_bytes(b"")
    lines = ["image,prompt,id", *(f"photos/p{i}.png,thing,item{i}" for i in range(6)),
             "photos/empty.png,thing,empty", "photos/p1.png,thing,again", "photos/missing.png,thing,gone"]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    finished = catalog.load_source(str(manifest))[:2]  # item0 and item1 are done before the run
    catalog.run_catalog_plain(finished, LocalStorage(out), segmenter="lite", reconstructor="lite")

    state = catalog_batch(source=str(manifest), output_root=str(out), chunk_size=2, batch_size=2, concurrency=2,
                          segmenter="lite", reconstructor="lite", gpu_limit=f"gpu-{uuid.uuid4().hex[:8]}",
                          return_state=True)
    assert state.is_failed() and "2 of 9 item(s) failed" in state.message, state.message  # empty, gone
    statuses = {it["id"]: it["status"] for it in state.result(raise_on_failure=False)["items"]}
    assert statuses == {"item0": "skipped", "item1": "skipped", "item2": "completed", "item3": "completed",
                        "item4": "completed", "item5": "completed", "empty": "failed", "again": "duplicate",
                        "gone": "failed"}
    index = json.loads((out / "catalog.json").read_text())
    assert {it["id"]: it["status"] for it in index["items"]} == statuses and index["complete"] is True
    assert "file is empty" in next(it for it in index["items"] if it["id"] == "empty")["error"]["message"]

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        in_run = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        names = [t.name for t in client.read_task_runs(flow_run_filter=in_run)]
    plan_chunks = [n for n in names if n.startswith("plan-chunk")]
    gpu_batches = [n for n in names if n.startswith("process-gpu-batch")]
    assert len(plan_chunks) == 4  # 8 distinct rows (the repeated row is entered before planning), 2 per chunk
    assert len(gpu_batches) == 3  # 5 items to run (the empty file fails when its batch decodes it), 2 per batch
    assert len(names) == len(plan_chunks) + len(gpu_batches) + 4  # + load source, GPU limit, catalog, artifacts


# -- the stack on PostgreSQL, each of its processes killed mid-burst ----------------------------------------------

FAST_RECOVERY = {  # notice lost workers and runs in seconds, not minutes
    "SAM3D_GPU_LEASE_S": "4",
    "SAM3D_GPU_STAGE_RETRY_DELAY_S": "0.5",
    "SAM3D_BRIDGE_KEEP_S": "2",
    "SAM3D_BRIDGE_REPOST_AFTER_S": "20",
    "SAM3D_BRIDGE_PENDING_TIMEOUT_S": "12",
}


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory):
    if not HAVE_POSTGRES:
        pytest.skip("PostgreSQL's server is installed by `make postgres`")
    state_dir = tmp_path_factory.mktemp("pgstack")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_"))} | FAST_RECOVERY
    up = [*CLI, "up", "--state-dir", str(state_dir), "--prefect-port", "0", "--moto-port", "0", "--db", "postgres",
          "--upload-prefix", ""]
    started = subprocess.run(up, env=env, capture_output=True, text=True, timeout=300)
    recorded = read_stack(state_dir) or {}
    seen: dict[str, dict] = dict(recorded.get("processes", {}))
    holder = None
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "(PostgreSQL)" in started.stdout
        assert recorded.get("db") == "postgres" and "postgres" in recorded["processes"]
        holder = Stack(state_dir)
        holder.seen = seen  # every process the tests start too, to check after `down`
        yield holder
    finally:
        if holder is not None:
            seen.update(read_stack(state_dir)["processes"])
        stopped = subprocess.run([*CLI, "down", "--state-dir", str(state_dir)], env=env, capture_output=True,
                                 text=True, timeout=180)
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped postgres" in stopped.stdout and "stopped prefect-server" in stopped.stdout
        assert not any(_alive(entry) for entry in seen.values()), {n: e["pid"] for n, e in seen.items() if _alive(e)}
        ports = [int(p) for p in (holder.env["PREFECT_API_URL"].split(":")[2].split("/")[0],
                                  holder.env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])] if holder else []
        postgres_argv = seen.get("postgres", {}).get("argv", [])
        ports += [int(a.split("=", 1)[1]) for a in postgres_argv if a.startswith("port=")]
        assert ports and not any(_port_open(p) for p in ports), ports
        assert not (state_dir / "stack.json").exists()


def _burst(stack: Stack, name: str, count: int = 2) -> list[str]:
    tag = f"{name}-{uuid.uuid4().hex[:6]}"
    return [stack.put(f"{tag}/{i}.png", seed=hash(tag) % 100_000 + i, prompt="thing") for i in range(count)]


def _kill(stack: Stack, name: str) -> int:
    pid = read_stack(stack.state_dir)["processes"][name]["pid"]
    stack.seen.setdefault(f"{name}-{pid}", read_stack(stack.state_dir)["processes"][name])
    os.killpg(pid, signal.SIGKILL)
    return pid


def _restart(stack: Stack, name: str) -> None:
    done = subprocess.run([*CLI, "restart", name, "--state-dir", str(stack.state_dir)], capture_output=True,
                          text=True, timeout=200)
    assert done.returncode == 0 and f"restarted {name}" in done.stdout, done.stdout + done.stderr
    stack.seen[name] = read_stack(stack.state_dir)["processes"][name]


def _api_runs(stack: Stack, images: list[str]) -> dict[str, list[dict]]:
    for attempt in range(60):  # the server may be coming back
        try:
            return {image: stack.runs(image) for image in images}
        except OSError:
            time.sleep(1 + attempt % 3)
    return {image: stack.runs(image) for image in images}


def _wait_until(stack: Stack, images: list[str], states: tuple[str, ...], timeout_s: float = 120) -> None:
    """Until some run of ``images`` is in one of ``states`` (the moment to kill)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(r["state_type"] in states for runs in _api_runs(stack, images).values() for r in runs):
            return
        time.sleep(0.2)
    pytest.fail(f"no run reached {states} within {timeout_s} s")


def _assert_exactly_once(stack: Stack, images: list[str], timeout_s: float = 240) -> None:
    """Every upload: one flow run, Completed, and the one result.json at its prefix written by that run."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = _api_runs(stack, images)
        if all(runs and all(r["state_type"] == "COMPLETED" for r in runs) for runs in found.values()):
            break
        if time.monotonic() > deadline:
            states = {i.rsplit("/", 2)[-2] + "/" + i.rsplit("/", 1)[1]: [(r["state_name"], r["run_count"])
                                                                         for r in runs] for i, runs in found.items()}
            pytest.fail(f"not every upload completed within {timeout_s} s: {states}\n"
                        + "\n".join(Path(stack.bridge_log).read_text().splitlines()[-15:]))
        time.sleep(1)
    time.sleep(1)  # a (wrong) second run would show up now
    results: dict[str, list[dict]] = {}
    for page in stack.s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket,
                                                                   Prefix=stack.env["SAM3D_OUTPUT_PREFIX"]):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/result.json") and "/stages/" not in obj["Key"]:
                doc = json.loads(stack.s3.get_object(Bucket=stack.bucket, Key=obj["Key"])["Body"].read())
                results.setdefault(doc["input"]["uri"], []).append(doc)
    for image, runs in _api_runs(stack, images).items():
        assert len(runs) == 1, f"{image}: {len(runs)} runs"
        (doc,) = results.get(image, [None])
        assert doc is not None and doc["status"] == "completed" and doc["flow_run_id"] == runs[0]["id"], image


@needs_postgres
@pytest.mark.slow
def test_up_on_postgres_keeps_prefect_in_its_own_cluster(pg_stack):
    import asyncio

    import asyncpg

    recorded = read_stack(pg_stack.state_dir)
    argv = recorded["processes"]["postgres"]["argv"]
    port = int(next(a.split("=", 1)[1] for a in argv if a.startswith("port=")))
    assert str(pg_stack.state_dir / "postgres" / "data") in argv
    password = (pg_stack.state_dir / "postgres" / "password").read_text().strip()

    async def deployments() -> list[str]:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="sam3d", password=password, database="prefect")
        try:
            return sorted(r["name"] for r in await conn.fetch("SELECT name FROM deployment"))
        finally:
            await conn.close()

    assert {"image-to-3d", "gpu-worker"} <= set(asyncio.run(deployments()))  # what `up` deployed lives there
    assert (pg_stack.state_dir / "stack.json").stat().st_mode & 0o077 == 0  # it holds the database password


@needs_postgres
@pytest.mark.slow
def test_events_bridge_killed_mid_burst(pg_stack):
    images = _burst(pg_stack, "bridge", count=1)
    _kill(pg_stack, "events-bridge")  # possibly mid-message: posted but not marked, or marked but not deleted
    images += _burst(pg_stack, "bridge", count=1)
    _restart(pg_stack, "events-bridge")
    _assert_exactly_once(pg_stack, images)


@needs_postgres
@pytest.mark.slow
def test_cpu_worker_killed_mid_burst(pg_stack):
    images = _burst(pg_stack, "worker")
    _wait_until(pg_stack, images, ("PENDING", "RUNNING"))
    _kill(pg_stack, "worker")  # its runs crash, or stay Pending for good
    _restart(pg_stack, "worker")
    _assert_exactly_once(pg_stack, images)


@needs_postgres
@pytest.mark.slow
def test_gpu_worker_killed_mid_burst(pg_stack):
    """The GPU side dies whole: its pool worker and the session holding the models (SIGKILL, no goodbye)."""
    images = _burst(pg_stack, "gpu")
    prefix = f"{pg_stack.env['SAM3D_OUTPUT_PREFIX']}_workers/"
    deadline, session = time.monotonic() + 120, None
    while session is None and time.monotonic() < deadline:  # a session serving the burst, by its heartbeat
        for obj in pg_stack.s3.list_objects_v2(Bucket=pg_stack.bucket, Prefix=prefix).get("Contents", []):
            if obj["Key"].endswith("/heartbeat.json"):
                body = pg_stack.s3.get_object(Bucket=pg_stack.bucket, Key=obj["Key"])["Body"].read()
                session = Lease.model_validate_json(body)
        time.sleep(0.2)
    assert session is not None, "no GPU worker session heartbeat"
    _wait_until(pg_stack, images, ("RUNNING",))
    _kill(pg_stack, "gpu-worker")
    os.kill(session.pid, signal.SIGKILL)
    _restart(pg_stack, "gpu-worker")
    _assert_exactly_once(pg_stack, images)


def _run_states(stack: Stack, run_id: str) -> list[dict]:
    import urllib.request

    with urllib.request.urlopen(f"{stack.api}/flow_run_states/?flow_run_id={run_id}", timeout=10) as response:
        return json.loads(response.read())


def _processes_of_run(run_id: str) -> list[int]:
    """The processes running flow run ``run_id`` (the worker starts each with ``PREFECT__FLOW_RUN_ID`` set)."""
    marker = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


@needs_postgres
@pytest.mark.slow
def test_a_run_whose_machine_died_is_crashed_by_its_missing_heartbeats_and_run_again(pg_stack):
    """The worker and the run's own process SIGKILLed together, as when a machine or container is lost: nothing is
    left to report the run's end, so it stays Running until its heartbeats are missed; the automation that `up`
    created marks it Crashed, and the keeper schedules the same run again."""
    from sam3d_pipeline.stack.unresponsive import LOCAL_HEARTBEAT_S, MISSED_BEATS

    images = _burst(pg_stack, "machine", count=1)
    _wait_until(pg_stack, images, ("RUNNING",))
    (run,) = _api_runs(pg_stack, images)[images[0]]
    pids = _processes_of_run(run["id"])
    assert pids, "no process runs the flow run"
    _kill(pg_stack, "worker")
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it was in the worker's process group
            pass
    lost_at = time.monotonic()
    _restart(pg_stack, "worker")
    assert [r["state_type"] for r in _api_runs(pg_stack, images)[images[0]]] == ["RUNNING"]  # nobody saw it die
    _assert_exactly_once(pg_stack, images, timeout_s=MISSED_BEATS * LOCAL_HEARTBEAT_S + 180)
    assert time.monotonic() - lost_at >= (MISSED_BEATS - 1) * LOCAL_HEARTBEAT_S  # not before its beats were missed
    history = _run_states(pg_stack, run["id"])
    assert any(s["type"] == "CRASHED" and "No heartbeat" in (s["message"] or "") for s in history), \
        [(s["type"], s["message"]) for s in history]


@needs_postgres
@pytest.mark.slow
def test_prefect_server_killed_mid_burst(pg_stack):
    images = _burst(pg_stack, "server")
    _wait_until(pg_stack, images, ("RUNNING",))
    _kill(pg_stack, "prefect-server")  # in-memory event and task queues go with it; runs lose their API
    time.sleep(2)
    _restart(pg_stack, "prefect-server")
    _assert_exactly_once(pg_stack, images, timeout_s=300)


def test_stack_restart_refuses_what_it_cannot_restart(tmp_path):
    from sam3d_pipeline.stack.local import StackError
    from sam3d_pipeline.stack.restart import restart

    with pytest.raises(StackError, match="no stack recorded"):
        restart(tmp_path, "worker")
    (tmp_path / "stack.json").write_text(json.dumps({"processes": {"worker": {"pid": 1, "log": "x"}}}))
    with pytest.raises(StackError, match="'bridge' is not a restartable part of this stack"):
        restart(tmp_path, "bridge")

