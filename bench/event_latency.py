"""Latency from S3 PUT to flow run Running and Completed through the local stack, and the bridge's memory.

Starts ``sam3d-pipeline up`` in a temporary state dir (or uses a running stack: ``--env-file``), uploads
``--uploads`` distinct small photos one at a time (each waits for its run to finish, so every figure is an
unloaded latency), and prints median and p95 of PUT → event received by Prefect, Scheduled (run created),
Pending (worker picked it up), Running (flow process started) and Completed, and the per-step clock of the
uploads' ``result.json``. Then ``--cost-uploads`` more, one at a time, without polling the runs' states (the
latency phase polls the API 10 times a second, load the stack's figure would count): the CPU-seconds the whole
stack spends per upload (every stack process, and the flow-run processes its workers started and reaped).
Then it fills a separate queue with ``--events`` S3 notifications (automations switched off, so no runs), runs a
second bridge process on it, and prints that process's resident memory once the queue is drained.

    .venv/bin/python bench/event_latency.py --uploads 20 --events 1000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import boto3
import numpy as np
import psutil
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clock_table import breakdown, print_side_by_side  # noqa: E402


def photo(i: int, size: tuple[int, int] = (160, 120)) -> bytes:
    """A distinct small photo: a coloured disc on a grey, slightly noisy background."""
    rng = np.random.default_rng(i)
    base = (rng.normal(180, 8, (size[1], size[0], 3))).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    ImageDraw.Draw(image).ellipse((50, 30, 110, 90), fill=(200, 30 + i % 200, 30))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def api(url: str, path: str, body: dict | None = None, method: str = "POST", attempts: int = 6):
    """One Prefect API call; a 503 (the SQLite server under a burst) or a dropped connection is tried again."""
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(url + path, data=json.dumps(body or {}).encode(),
                                         headers={"Content-Type": "application/json"}, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                data = response.read()
            return json.loads(data) if data else None
        except (urllib.error.HTTPError, urllib.error.URLError, ConnectionError) as exc:
            if attempt == attempts or (isinstance(exc, urllib.error.HTTPError) and exc.code not in (502, 503, 504)):
                raise
            time.sleep(min(8.0, 0.5 * 2 ** attempt))


def ts(text: str | None) -> float | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None




def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def stack_cpu_s(state_dir: Path | None) -> dict[str, float] | None:
    """CPU-seconds (user + system) of each part of the stack (``stack.json``'s names): its process, live
    descendants, and the children they reaped (finished flow-run processes count under ``warm-runs``, which forks
    them, or ``worker``); None without a state dir to read the stack from."""
    if state_dir is None or not (state_dir / "stack.json").exists():
        return None
    parts: dict[str, float] = {}
    for name, entry in json.loads((state_dir / "stack.json").read_text())["processes"].items():
        try:
            root = psutil.Process(entry["pid"])
            for proc in [root, *root.children(recursive=True)]:
                t = proc.cpu_times()
                parts[name] = parts.get(name, 0.0) + t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            continue
    return parts


def upload_clocks(env: dict[str, str], run_ids: set[str]) -> list[dict]:
    """The ``clock`` of every ``result.json`` in the bucket written by one of ``run_ids``."""
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    clocks = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=env["SAM3D_BUCKET"]):
        for item in page.get("Contents", []):
            if item["Key"].endswith("/result.json"):
                result = json.loads(s3.get_object(Bucket=env["SAM3D_BUCKET"], Key=item["Key"])["Body"].read())
                if result.get("flow_run_id") in run_ids and result.get("clock"):
                    clocks.append(result["clock"])
    return clocks


def latency_phase(env: dict[str, str], uploads: int, timeout_s: float, state_dir: Path | None = None) -> dict:
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    api_url = env["PREFECT_API_URL"]
    known = {r["id"] for r in api(api_url, "/flow_runs/filter", {})}
    rows, run_ids = [], set()
    cpu_before = stack_cpu_s(state_dir)
    for i in range(uploads):
        key = f"{env['SAM3D_UPLOAD_PREFIX']}bench/{int(time.time())}-{i} photo.png"
        uri = f"s3://{env['SAM3D_BUCKET']}/{key}"
        put_at = time.time()
        s3.put_object(Bucket=env["SAM3D_BUCKET"], Key=key, Body=photo(i))
        deadline = time.monotonic() + timeout_s
        run = None
        # Only the runs expected to start since the PUT, 10 times a second: the latencies come from the run's state
        # timestamps, and this poll is load on the Prefect server that the stack's CPU figure counts.
        recent = {"flow_runs": {"expected_start_time": {"after_": datetime.fromtimestamp(put_at - 5, UTC).isoformat()}},
                  "limit": 20}
        while time.monotonic() < deadline:
            runs = [r for r in api(api_url, "/flow_runs/filter", recent) if r["id"] not in known]
            run = next((r for r in runs if r["parameters"].get("image") == uri), None)
            if run and run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(0.1)
        if run is None or run["state_type"] != "COMPLETED":
            print(f"upload {i}: run did not complete ({run and run['state_type']})", file=sys.stderr)
            continue
        known.add(run["id"])
        run_ids.add(run["id"])
        states = {s["type"]: ts(s["timestamp"]) for s in api(api_url, "/flow_run_states/?flow_run_id=" + run["id"],
                                                              method="GET")}
        received = api(api_url, "/events/filter", {"filter": {
            "event": {"name": ["aws.s3.object.created"]},
            "resource": {"id": [f"aws.s3.object.{env['SAM3D_BUCKET']}/{key}"]},
            "occurred": {"since": datetime.fromtimestamp(put_at - 3600, UTC).isoformat()}}})["events"]
        rows.append({
            "event": ts(received[0]["received"]) - put_at if received else float("nan"),
            "scheduled": ts(run["created"]) - put_at,
            "pending": states["PENDING"] - put_at,
            "running": states["RUNNING"] - put_at,
            "completed": states["COMPLETED"] - put_at,
        })
        print(f"upload {i:2d}: " + ", ".join(f"{name} {value:.2f} s" for name, value in rows[-1].items()))
    print(f"\nPUT → flow run latency over {len(rows)} uploads (lite backends, 160x120 PNG, one at a time):")
    figures: dict = {"uploads": uploads, "completed_runs": len(rows)}
    for name in ("event", "scheduled", "pending", "running", "completed"):
        values = [r[name] for r in rows]
        print(f"  {name:9s}: median {statistics.median(values):.2f} s, p95 {pct(values, 95):.2f} s, "
              f"max {max(values):.2f} s")
        figures[f"put_to_{name}_median_s"] = round(statistics.median(values), 2)
        figures[f"put_to_{name}_p95_s"] = round(pct(values, 95), 2)
    cpu_after = stack_cpu_s(state_dir)
    if cpu_before is not None and cpu_after is not None and rows:
        total = sum(cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after) / len(rows)
        figures["stack_cpu_s_per_upload_with_polling"] = round(total, 2)
        print(f"  the stack's CPU-seconds per upload, with this bench's 10 Hz polls of the API: {total:.2f}")
    clocks = upload_clocks(env, run_ids)
    if clocks:
        figures["clock"] = {"upload": breakdown(clocks)}
        print_side_by_side(figures["clock"])
    return figures


def cost_phase(env: dict[str, str], uploads: int, timeout_s: float, state_dir: Path | None) -> dict:
    """The CPU-seconds the stack spends per upload: ``uploads`` photos one at a time, each PUT once the run before it
    ended, with no polling of the run's states (the bench only counts ended runs, twice a second)."""
    cpu_before = stack_cpu_s(state_dir)
    if cpu_before is None or not uploads:
        return {}
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    started = datetime.fromtimestamp(time.time() - 5, UTC).isoformat()
    ended = {"flows": {"name": {"any_": ["image-to-3d"]}}, "flow_runs": {
        "expected_start_time": {"after_": started},
        "state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]}}}}
    window = time.monotonic()
    for i in range(uploads):
        key = f"{env['SAM3D_UPLOAD_PREFIX']}bench-cost/{int(time.time())}-{i} photo.png"
        s3.put_object(Bucket=env["SAM3D_BUCKET"], Key=key, Body=photo(10_000 + i))
        deadline = time.monotonic() + timeout_s
        while api(env["PREFECT_API_URL"], "/flow_runs/count", ended) < i + 1:
            if time.monotonic() > deadline:
                print(f"cost upload {i}: no run ended within {timeout_s:.0f} s", file=sys.stderr)
                return {}
            time.sleep(0.5)
    time.sleep(3.0)  # the last run's process exit and the server's work on its final events
    cpu_after = stack_cpu_s(state_dir)
    per_part = {name: round((cpu_after[name] - cpu_before.get(name, 0.0)) / uploads, 2) for name in cpu_after}
    figures = {"stack_cpu_s_per_upload": round(sum(per_part.values()), 2),
               "stack_cpu_s_per_upload_by_part": dict(sorted(per_part.items(), key=lambda item: -item[1])),
               "cost_uploads": uploads, "cost_window_s": round(time.monotonic() - window, 1)}
    print(f"\nthe stack's CPU-seconds per upload ({uploads} uploads one at a time, {figures['cost_window_s']} s): "
          f"{figures['stack_cpu_s_per_upload']:.2f} ("
          + ", ".join(f"{name} {value:.2f}" for name, value in figures["stack_cpu_s_per_upload_by_part"].items())
          + ")")
    return figures


def rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            name, value = line.split(":")
            fields[name] = int(value.split()[0])
    return fields


def memory_phase(env: dict[str, str], events: int, state_dir: Path) -> dict:
    kwargs = {"endpoint_url": env["AWS_ENDPOINT_URL"]}
    s3, sqs = boto3.client("s3", **kwargs), boto3.client("sqs", **kwargs)
    api_url = env["PREFECT_API_URL"]
    automations = api(api_url, "/automations/filter", {})
    for automation in automations:  # the events below must not start 1,000 runs
        api(api_url, f"/automations/{automation['id']}", {"enabled": False}, method="PATCH")
    bucket = env["SAM3D_BUCKET"]
    queue_url = sqs.create_queue(QueueName=f"bench-memory-{int(time.time())}")["QueueUrl"]
    body = photo(0)
    print(f"\nmemory: uploading {events} objects and queueing their notifications…")
    for start in range(0, events, 10):
        entries = []
        for i in range(start, min(start + 10, events)):
            key = f"bench-memory/{i:05d} photo.jpg"
            etag = s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')
            record = {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "eventTime": "2026-11-25T00:00:00Z",
                      "s3": {"bucket": {"name": bucket}, "object": {"key": key.replace(" ", "+"), "size": len(body),
                                                                    "eTag": etag, "sequencer": f"{i:016X}"}}}
            entries.append({"Id": str(i), "MessageBody": json.dumps({"Records": [record]})})
        sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
    bridge_env = os.environ | env | {"SAM3D_UPLOAD_PREFIX": "bench-memory/", "SAM3D_BRIDGE_WAIT_S": "1"}
    log = open(state_dir / "bench-bridge.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "sam3d_pipeline.cli", "events-bridge", "--queue-url", queue_url],
                            env=bridge_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.monotonic()
        while time.monotonic() - started < 900:
            attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
            waiting = int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])
            if waiting == 0:
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        memory = rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for automation in automations:
            api(api_url, f"/automations/{automation['id']}", {"enabled": True}, method="PATCH")
    text = (state_dir / "bench-bridge.log").read_text()
    posted = text.count(" INFO sam3d_pipeline.events.bridge: event ")
    print(f"bridge after {events} events ({posted} posted in {elapsed:.1f} s): "
          f"RSS {memory['VmRSS'] / 1024:.1f} MiB, peak {memory['VmHWM'] / 1024:.1f} MiB")
    return {"bridge_events": events, "bridge_events_posted": posted, "bridge_drain_s": round(elapsed, 1),
            "bridge_rss_mib": round(memory["VmRSS"] / 1024, 1), "bridge_peak_rss_mib": round(memory["VmHWM"] / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--cost-uploads", type=int, default=10,
                        help="uploads of the CPU-per-upload phase (after the latency phase; 0: skip it)")
    parser.add_argument("--env-file", type=Path, help="use a running stack (its local-stack.env)")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--compare-cold", action="store_true",
                        help="also time the uploads on a stack started with --cold-runs (an interpreter per run)")
    args = parser.parse_args()
    figures: dict = {}
    if args.compare_cold and args.env_file is None and args.uploads:
        with tempfile.TemporaryDirectory(prefix="sam3d-bench-cold-") as tmp:
            cli = [sys.executable, "-m", "sam3d_pipeline.cli"]
            subprocess.run([*cli, "up", "--state-dir", tmp, "--prefect-port", "0", "--moto-port", "0", "--cold-runs"],
                           check=True)
            cold_env = dict(line.split("=", 1) for line in (Path(tmp) / "local-stack.env").read_text().splitlines()
                            if "=" in line and line[0] != "#")
            cold_env = {k: v.strip("'") for k, v in cold_env.items()}
            saved = dict(os.environ)
            os.environ.update(cold_env)
            try:
                print("\n== cold runs (an interpreter per flow run) ==")
                cold = latency_phase(cold_env, args.uploads, args.timeout_s, Path(tmp))
                cold |= cost_phase(cold_env, args.cost_uploads, args.timeout_s, Path(tmp))
            finally:
                subprocess.run([*cli, "down", "--state-dir", tmp], check=False)
                os.environ.clear()
                os.environ.update(saved)
        figures["cold_runs"] = cold
        print("\n== warm runs (the stack's default) ==")
    with tempfile.TemporaryDirectory(prefix="sam3d-bench-") as tmp:
        state_dir = Path(tmp)
        cli = [sys.executable, "-m", "sam3d_pipeline.cli"]
        if args.env_file is None:
            subprocess.run([*cli, "up", "--state-dir", tmp, "--prefect-port", "0", "--moto-port", "0"], check=True)
            env_file = state_dir / "local-stack.env"
        else:
            env_file = args.env_file
        env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and line[0] != "#")
        env = {k: v.strip("'") for k, v in env.items()}
        os.environ.update(env)
        try:
            if args.uploads:
                stack_dir = state_dir if args.env_file is None else args.env_file.parent
                figures |= latency_phase(env, args.uploads, args.timeout_s, stack_dir)
                figures |= cost_phase(env, args.cost_uploads, args.timeout_s, stack_dir)
            if args.events:
                figures |= memory_phase(env, args.events, state_dir)
        finally:
            if args.env_file is None:
                subprocess.run([*cli, "down", "--state-dir", tmp], check=False)
        if "cold_runs" in figures and "put_to_running_p95_s" in figures:
            cold = figures["cold_runs"]
            for name in ("put_to_running_median_s", "put_to_running_p95_s", "stack_cpu_s_per_upload",
                         "stack_cpu_s_per_upload_with_polling"):
                if name in cold and name in figures:
                    print(f"{name}: cold {cold[name]}, warm {figures[name]}")
            if "clock" in cold and "clock" in figures:
                print_side_by_side({"upload cold": cold["clock"]["upload"], "upload warm": figures["clock"]["upload"]})
        print("BENCH_JSON " + json.dumps({"event_latency": figures}))


if __name__ == "__main__":
    main()
