"""Scale: a 10,000-row catalog skipped, 1,000 photos through the catalog on the warm GPU workers against the plain
loop, and bursts of 1,000 uploads through ``sam3d-pipeline up`` on SQLite and on PostgreSQL, one of them with the
events bridge and the GPU worker each killed once. Four figures, one run:

1. skip: a ``--rows`` manifest whose every item already has a finished ``result.json`` (one photo run for real,
   its ``result.json`` copied to every other row's prefix, as planning computes it) → seconds and peak memory of
   the ``catalog-batch`` run that skips it, and the number of task runs in its flow run.
2. throughput: ``--items`` distinct small photos (lite backends) through ``catalog-batch`` with the stack's GPU
   stages on the warm worker session, against ``run_catalog_plain`` (same stages, one thread, no Prefect), in
   one process → items per minute each and their ratio. With it: how often the Prefect client was answered 503
   (and retried) or 423 while taking GPU slots, and a slot probe (two threads taking and releasing one slot).
3. burst: ``--uploads`` distinct photos PUT at once through ``up`` (SQLite, then ``--db postgres``) → every upload
   exactly once (one flow run, Completed, one ``result.json`` naming that run), PUT → Completed median / p95,
   and the total time from the first PUT to the last completion.
4. burst with kills (PostgreSQL): the same, with the events bridge SIGKILLed a third of the way through the PUTs
   and restarted (``sam3d-pipeline restart``), and the GPU worker (its pool worker and the session serving the
   models) SIGKILLed once the first results are in; the flows start a new session.

    .venv/bin/python bench/scale.py                       # full sizes (1,000 uploads take long on 2 cores)
    .venv/bin/python bench/scale.py --rows 2000 --items 100 --uploads 50
    .venv/bin/python bench/scale.py --rows 0 --items 0 --bursts killed --burst-deadline-s 5400   # (4) alone
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from event_latency import api, pct, photo, ts  # noqa: E402

CLI = [sys.executable, "-m", "sam3d_pipeline.cli"]
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def read_env(env_file: Path) -> dict[str, str]:
    return {k: v.strip("'") for k, v in (line.split("=", 1) for line in env_file.read_text().splitlines()
                                         if "=" in line and not line.startswith("#"))}


def phase_in_child(phase: str, env: dict[str, str], *args: str) -> dict:
    """Run ``scale.py --phase <phase>`` in a fresh process with the stack's environment; returns its figures."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_", "SAM3D_"))} | env
    child_env["PREFECT_LOGGING_LEVEL"] = "WARNING"
    done = subprocess.run([sys.executable, __file__, "--phase", phase, *args], env=child_env, capture_output=True,
                          text=True)
    print(done.stdout, end="")
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        raise RuntimeError(f"phase {phase} failed ({done.returncode})")
    line = next(line for line in done.stdout.splitlines() if line.startswith("PHASE_JSON "))
    return json.loads(line.split(" ", 1)[1])


# -- 1. skip a finished catalog ----------------------------------------------------------------------------------

def make_finished_catalog(folder: Path, rows: int) -> Path:
    """``rows`` distinct photos and their manifest; the first runs for real, its result.json is copied to the rest."""
    from sam3d_pipeline import catalog
    from sam3d_pipeline.keys import RunKeys
    from sam3d_pipeline.run import pipeline
    from sam3d_pipeline.settings import Settings
    from sam3d_pipeline.storage import LocalStorage

    photos = folder / "photos"
    photos.mkdir(parents=True)
    lines = ["image,prompt"]
    for i in range(rows):
        (photos / f"p{i:05d}.png").write_bytes(photo(i, size=(64, 48)))
        lines.append(f"photos/p{i:05d}.png,disc")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    storage, settings = LocalStorage(folder / "out"), Settings(segmenter="lite", reconstructor="lite")
    loaded = catalog.load_source(str(manifest))
    first = catalog.run_catalog_plain(loaded[:1], storage, segmenter="lite", reconstructor="lite", settings=settings)
    body = storage.read_bytes(RunKeys(first[0].prefix).result)
    for row in loaded[1:]:
        options = row.item.options(segmenter="lite", reconstructor="lite")
        plan = pipeline.plan(row.item.image, pipeline.content_id(pipeline.read_bytes(row.item.image, settings)),
                             options, storage.root, settings)
        storage.write_bytes(RunKeys(plan.prefix).result, body)
    return manifest


def skip_phase(rows: int, tmp: Path) -> dict:
    """In a fresh process (the finished catalog built by another one): time the ``catalog-batch`` run that skips it."""
    manifest = tmp / "skip" / "manifest.csv"
    from flows.catalog_batch import catalog_batch

    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    state = catalog_batch(source=str(manifest), output_root=str(tmp / "skip" / "out"), segmenter="lite",
                          reconstructor="lite", gpu_limit="bench-scale-skip", return_state=True)
    wall = time.perf_counter() - t
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcome = state.result()
    run_id = str(state.state_details.flow_run_id)
    task_runs = api(os.environ["PREFECT_API_URL"], "/task_runs/count", {"flow_runs": {"id": {"any_": [run_id]}}})
    figures = {"rows": rows, "skipped": outcome["counts"]["skipped"], "seconds": round(wall, 1),
               "peak_rss_mib": round(peak_kib / 1024, 1), "rss_before_mib": round(before_kib / 1024, 1),
               "task_runs": task_runs}
    print(f"(1) skip {rows} finished rows: {wall:.1f} s, peak RSS {peak_kib / 1024:.0f} MiB, {task_runs} task runs "
          f"in the flow run ({outcome['summary']})", flush=True)
    return figures


# -- 2. throughput on the warm workers against the plain loop ----------------------------------------------------

class ClientRetries(logging.Handler):
    """Counts the Prefect client's retried answers by status code (its debug line names the code)."""

    PATTERN = re.compile(r"retryable status code (\d+)")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.codes: dict[str, int] = {}
        self.waits: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if (match := self.PATTERN.search(message)) is not None:
            self.codes[match.group(1)] = self.codes.get(match.group(1), 0) + 1
        elif (match := re.search(r"holding one .* slot \(waited ([\d.]+) s\)", message)) is not None:
            self.waits.append(float(match.group(1)))


def slot_probe(rounds: int = 20) -> dict:
    """Two threads each take and release one slot of a 1-slot global limit ``rounds`` times (hold 50 ms)."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    name = f"bench-scale-probe-{os.getpid()}"
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
    waits: list[float] = []
    retries = ClientRetries()
    logging.getLogger("prefect.client").addHandler(retries)
    logging.getLogger("prefect.client").setLevel(logging.DEBUG)

    def worker() -> None:
        for _ in range(rounds):
            t = time.perf_counter()
            with concurrency(name, occupy=1, strict=True):
                waits.append(time.perf_counter() - t)
                time.sleep(0.05)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    t = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t
    logging.getLogger("prefect.client").removeHandler(retries)
    held = 2 * rounds * 0.05
    return {"acquisitions": len(waits), "client_retries_by_status": retries.codes, "wall_s": round(wall, 2),
            "held_s": round(held, 2),
            "overhead_per_acquisition_ms": round(1000 * (wall - held) / len(waits), 1),
            "wait_median_ms": round(1000 * statistics.median(waits), 1), "wait_p95_ms": round(1000 * pct(waits, 95), 1)}


def throughput_phase(items: int, batch_size: int, tmp: Path) -> dict:
    """In a fresh process with the stack's env (GPU stages on its worker session): plain loop, then the flow."""
    from sam3d_pipeline import catalog
    from sam3d_pipeline.storage import LocalStorage

    folder = tmp / "throughput"
    (folder / "photos").mkdir(parents=True)
    lines = ["image,prompt"]
    for i in range(items):
        (folder / "photos" / f"p{i:04d}.png").write_bytes(photo(100_000 + i))
        lines.append(f"photos/p{i:04d}.png,disc")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    rows = catalog.load_source(str(manifest))
    catalog.run_catalog_plain(rows[:1], LocalStorage(folder / "warm"), segmenter="lite", reconstructor="lite")
    t = time.perf_counter()
    entries = catalog.run_catalog_plain(rows, LocalStorage(folder / "plain"), batch_size=batch_size,
                                        segmenter="lite", reconstructor="lite")
    plain_s = time.perf_counter() - t
    assert all(e.status == "completed" for e in entries), catalog.summary_line(entries)

    from flows.catalog_batch import catalog_batch

    retries = ClientRetries()
    for name, level in (("prefect.client", logging.DEBUG), ("prefect.task_runs", logging.INFO)):
        logging.getLogger(name).addHandler(retries)
        logging.getLogger(name).setLevel(level)
    t = time.perf_counter()
    state = catalog_batch(source=str(manifest), output_root=str(folder / "flow"), batch_size=batch_size,
                          segmenter="lite", reconstructor="lite", gpu_limit="bench-scale-gpu", gpu_slots=1,
                          return_state=True)
    flow_s = time.perf_counter() - t
    for name in ("prefect.client", "prefect.task_runs"):
        logging.getLogger(name).removeHandler(retries)
    outcome = state.result()
    assert outcome["counts"]["completed"] == items, outcome["summary"]
    workers = set()
    for entry in outcome["items"]:
        result = json.loads((folder / "flow" / entry["prefix"] / "result.json").read_text())
        workers |= {info["worker"] for info in result.get("stages", {}).values()}
    probe = slot_probe()
    figures = {"items": items, "batch_size": batch_size, "plain_s": round(plain_s, 1), "flow_s": round(flow_s, 1),
               "plain_items_per_min": round(60 * items / plain_s, 1),
               "flow_items_per_min": round(60 * items / flow_s, 1), "flow_vs_plain": round(flow_s / plain_s, 3),
               "gpu_stages_on": sorted(workers), "client_retries_by_status": retries.codes,
               "gpu_slot_waits_s": {"batches": len(retries.waits), "total": round(sum(retries.waits), 2)},
               "slot_probe": probe}
    print(f"(2) {items} photos: plain loop {figures['plain_items_per_min']} items/min ({plain_s:.1f} s), catalog on "
          f"the GPU workers {figures['flow_items_per_min']} items/min ({flow_s:.1f} s): "
          f"{figures['flow_vs_plain']:.2f}x; "
          f"stages on {', '.join(w[:8] for w in sorted(workers))}; client retries {retries.codes or 'none'}; "
          f"slot waits {figures['gpu_slot_waits_s']}; slot probe {probe}", flush=True)
    return figures


# -- 3./4. bursts of uploads through the stack -------------------------------------------------------------------

class StackBurst:
    """Uploads a burst into a running stack and checks that each upload was processed exactly once."""

    def __init__(self, state_dir: Path) -> None:
        import boto3

        self.state_dir = state_dir
        self.env = read_env(state_dir / "local-stack.env")
        self.s3 = boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                               aws_access_key_id="testing", aws_secret_access_key="testing")
        self.bucket, self.api = self.env["SAM3D_BUCKET"], self.env["PREFECT_API_URL"]

    def _api(self, path: str, body: dict) -> list | dict:
        for attempt in range(60):  # the server may be restarting
            try:
                return api(self.api, path, body)
            except OSError:
                time.sleep(min(5, 0.5 * (attempt + 1)))
        return api(self.api, path, body)

    def runs(self, images: set[str]) -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = {image: [] for image in images}
        offset = 0
        while True:
            page = self._api("/flow_runs/filter", {"flows": {"name": {"any_": ["image-to-3d"]}}, "limit": 200,
                                                   "offset": offset, "sort": "EXPECTED_START_TIME_ASC"})
            for run in page:
                if run["parameters"].get("image") in found:
                    found[run["parameters"]["image"]].append(run)
            offset += len(page)
            if len(page) < 200:
                return found

    def results(self) -> dict[str, list[dict]]:
        """``result.json`` documents under the output prefix, by input URI."""
        by_input: dict[str, list[dict]] = {}
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                  Prefix=self.env["SAM3D_OUTPUT_PREFIX"])
        for page in pages:
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/result.json") and "/stages/" not in obj["Key"]:
                    doc = json.loads(self.s3.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read())
                    by_input.setdefault(doc["input"]["uri"], []).append(doc)
        return by_input

    def kill(self, name: str) -> None:
        pid = json.loads((self.state_dir / "stack.json").read_text())["processes"][name]["pid"]
        os.killpg(pid, signal.SIGKILL)

    def kill_gpu_session(self) -> str | None:
        """SIGKILL the process of a GPU worker session that holds a heartbeat (the one with the models)."""
        from sam3d_pipeline.gpu.workers import Lease

        prefix = f"{self.env['SAM3D_OUTPUT_PREFIX']}_workers/"
        for obj in self.s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", []):
            if obj["Key"].endswith("/heartbeat.json"):
                beat = Lease.model_validate_json(self.s3.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read())
                try:
                    os.kill(beat.pid, signal.SIGKILL)
                    return beat.session
                except ProcessLookupError:
                    continue
        return None

    def restart(self, name: str) -> None:
        from sam3d_pipeline.stack.restart import restart

        restart(self.state_dir, name)

    def burst(self, uploads: int, tag: str, kills: bool = False, stall_s: float = 900,
              deadline_s: float | None = None) -> dict:
        """PUT ``uploads`` photos at once and wait until each has a completed run (or nothing moved for
        ``stall_s``, or ``deadline_s`` passed: uploads whose runs have not ended are then counted as unfinished,
        not as lost); ``kills`` SIGKILLs the bridge a third of the way through the PUTs and the GPU worker once a
        tenth of the uploads completed, restarting each. Prints progress every minute."""
        put_at: dict[str, float] = {}
        killed: list[str] = []
        for i in range(uploads):
            key = f"{self.env['SAM3D_UPLOAD_PREFIX']}scale-{tag}/{i:05d}.png"
            put_at[f"s3://{self.bucket}/{key}"] = time.time()
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=photo(zlib.crc32(tag.encode()) % 10**7 + i),
                               Metadata={"prompt": "disc"})
            if kills and i == uploads // 3:
                self.kill("events-bridge")
                killed.append(f"events-bridge after PUT {i + 1}")
                self.restart("events-bridge")
        first_put = min(put_at.values())
        gpu_killed = not kills
        progress, moved_at, printed, late = -1, time.monotonic(), time.monotonic(), False
        look_s = max(2.0, uploads / 100)  # each look pages through every run: keep its load on the server small
        while True:
            found = self.runs(set(put_at))
            done = [runs for runs in found.values() if runs and all(r["state_type"] == "COMPLETED" for r in runs)]
            if not gpu_killed and len(done) >= max(1, uploads // 10):
                self.kill("gpu-worker")
                session = self.kill_gpu_session()
                killed.append(f"gpu-worker and session {session and session[:8]} after {len(done)} completed")
                self.restart("gpu-worker")
                gpu_killed = True
            if len(done) != progress:
                progress, moved_at = len(done), time.monotonic()
            if time.monotonic() - printed >= 60:
                print(f"    {tag}: {len(done)}/{uploads} completed after {time.time() - first_put:.0f} s", flush=True)
                printed = time.monotonic()
            late = deadline_s is not None and time.time() - first_put > deadline_s
            if len(done) == uploads or time.monotonic() - moved_at > stall_s or late:
                break
            time.sleep(look_s)
        wall = time.time() - first_put
        results = self.results()
        completed, exactly_once, problems, unfinished = [], 0, [], 0
        for image, runs in found.items():
            if late and not (runs and all(r["state_type"] in FINAL for r in runs)):
                unfinished += 1
                continue
            docs = results.get(image, [])
            if (len(runs) == 1 and runs[0]["state_type"] == "COMPLETED" and len(docs) == 1
                    and docs[0]["flow_run_id"] == runs[0]["id"]):
                exactly_once += 1
                completed.append(ts(runs[0]["state"]["timestamp"]) - put_at[image])
            else:
                problems.append(f"{image.rsplit('/', 1)[1]}: runs {[r['state_type'] for r in runs]}, "
                                f"results {len(docs)}")
        figures = {"uploads": uploads, "exactly_once": exactly_once, "lost_or_doubled": len(problems),
                   "put_to_completed_median_s": round(statistics.median(completed), 1) if completed else None,
                   "put_to_completed_p95_s": round(pct(completed, 95), 1) if completed else None,
                   "total_s": round(wall, 1), "per_upload_s": round(wall / uploads, 2)}
        if late:
            figures["unfinished_at_deadline"] = unfinished
        if kills:
            figures["killed"] = killed
        if problems:
            figures["problems"] = problems[:10]
        return figures


def up(state_dir: Path, db: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_"))}
    subprocess.run([*CLI, "up", "--state-dir", str(state_dir), "--prefect-port", "0", "--moto-port", "0",
                    "--db", db], env=env, check=True, stdout=subprocess.DEVNULL)


def down(state_dir: Path) -> None:
    subprocess.run([*CLI, "down", "--state-dir", str(state_dir)], check=False, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000, help="rows of the finished catalog (1); 0 skips it")
    parser.add_argument("--items", type=int, default=1_000, help="photos through the catalog (2); 0 skips it")
    parser.add_argument("--uploads", type=int, default=1_000, help="uploads per burst (3, 4); 0 skips them")
    parser.add_argument("--bursts", default="sqlite,postgres,killed",
                        help="which bursts to run (comma-separated): sqlite, postgres (3), killed (4, on PostgreSQL)")
    parser.add_argument("--burst-deadline-s", type=float, default=None,
                        help="stop waiting for a burst after this long; runs not ended are reported as unfinished")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--phase", choices=["prepare-skip", "skip", "throughput", "probe"], help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "prepare-skip":
        t = time.perf_counter()
        make_finished_catalog(args.tmp / "skip", args.rows)
        print(f"    {args.rows} finished rows prepared in {time.perf_counter() - t:.0f} s")
        print("PHASE_JSON {}")
        return
    if args.phase == "skip":
        print("PHASE_JSON " + json.dumps(skip_phase(args.rows, args.tmp)))
        return
    if args.phase == "probe":
        probe = slot_probe()
        print(f"    slot probe: {probe}")
        print("PHASE_JSON " + json.dumps(probe))
        return
    if args.phase == "throughput":
        print("PHASE_JSON " + json.dumps(throughput_phase(args.items, args.batch_size, args.tmp)))
        return

    figures: dict = {"cpu_count": os.cpu_count()}
    bursts = set(args.bursts.split(",")) if args.uploads else set()
    if unknown := bursts - {"sqlite", "postgres", "killed"}:
        parser.error(f"unknown burst(s): {', '.join(sorted(unknown))}")
    deadline = args.burst_deadline_s
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sam3d-bench-scale-") as tmp:
        tmp_path = Path(tmp)
        sqlite_state = tmp_path / "stack-sqlite"
        try:
            if args.rows or args.items or "sqlite" in bursts:
                up(sqlite_state, "sqlite")
            env = read_env(sqlite_state / "local-stack.env") if args.rows or args.items else {}
            if args.rows:
                phase_in_child("prepare-skip", env, "--rows", str(args.rows), "--tmp", tmp)
                figures["skip"] = phase_in_child("skip", env, "--rows", str(args.rows), "--tmp", tmp)
            if args.items:
                figures["throughput"] = phase_in_child("throughput", env, "--items", str(args.items),
                                                       "--batch-size", str(args.batch_size), "--tmp", tmp)
            if "sqlite" in bursts:
                figures["burst_sqlite"] = StackBurst(sqlite_state).burst(args.uploads, "sqlite", deadline_s=deadline)
                print(f"(3) {args.uploads} uploads, SQLite: {figures['burst_sqlite']}", flush=True)
        finally:
            down(sqlite_state)
            shutil.rmtree(tmp_path / "skip", ignore_errors=True)
        if bursts & {"postgres", "killed"}:
            postgres_state = tmp_path / "stack-postgres"
            try:
                up(postgres_state, "postgres")
                figures["slot_probe_postgres"] = phase_in_child("probe", read_env(postgres_state / "local-stack.env"))
                stack = StackBurst(postgres_state)
                if "postgres" in bursts:
                    figures["burst_postgres"] = stack.burst(args.uploads, "postgres", deadline_s=deadline)
                    print(f"(3) {args.uploads} uploads, PostgreSQL: {figures['burst_postgres']}", flush=True)
                if "killed" in bursts:
                    figures["burst_postgres_killed"] = stack.burst(args.uploads, "killed", kills=True,
                                                                   deadline_s=deadline)
                    print(f"(4) {args.uploads} uploads, PostgreSQL, bridge and GPU worker killed once: "
                          f"{figures['burst_postgres_killed']}", flush=True)
            finally:
                down(postgres_state)
    figures["bench_wall_s"] = round(time.perf_counter() - started, 1)
    print("BENCH_JSON " + json.dumps({"scale": figures}))


if __name__ == "__main__":
    main()
