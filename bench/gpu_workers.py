"""Warm GPU workers: per-photo time through a worker session against in-process, model loads per photo, and
bursts of uploads through the local stack with 1 and 2 worker sessions.

Phase 1 (``--photos``, SAM 3 with random weights on this CPU, lite reconstructor): one Prefect server; the same
distinct photos run through ``image-to-3d`` in process (``SAM3D_GPU_STAGES=inline``), then through one warm
worker session (``workers``). Prints each photo's wall time, the mean after the first photo in each mode, their
ratio (target ≤ 1.1), and how many photos paid a model load per stage (from ``result.json``'s ``stages``).

Phase 2 (``--burst``, lite backends): ``sam3d-pipeline up --gpu-workers N`` for each N in ``--workers``; all
uploads are PUT at once; prints PUT → Running and PUT → Completed (median, p95) and the model loads.

    .venv/bin/python bench/gpu_workers.py --photos 3 --burst 20 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from event_latency import api, pct, photo, ts  # noqa: E402

CLI = [sys.executable, "-m", "sam3d_pipeline.cli"]


def _wait_http(url: str, timeout_s: float = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def residency_phase(photos: int, tmp: Path) -> dict:
    """Same photos in process and through one warm worker session, SAM 3 random-init on the CPU."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = tmp / "prefect"
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "SAM3D_SAM3_RANDOM_INIT": "true",
                        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
                        "PREFECT_LOGGING_LEVEL": "WARNING"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    worker = None
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/health")
        paths = []
        for i in range(photos):
            path = tmp / f"photo-{i}.png"
            path.write_bytes(photo(100 + i, size=(480, 360)))
            paths.append(path)
        times: dict[str, list[float]] = {}
        loads: dict[str, dict[str, int]] = {}
        for mode in ("inline", "workers"):
            if mode == "workers":
                worker = subprocess.Popen([*CLI, "gpu-worker", "--idle-s", "600"], env=env | {"SAM3D_GPU_STAGES": mode},
                                          cwd=ROOT, stdout=open(tmp / "gpu-worker.log", "wb"), stderr=subprocess.STDOUT,
                                          start_new_session=True)
                time.sleep(5)
            script = (
                "import json, sys, time\n"
                "from flows.image_to_3d import image_to_3d\n"
                "for path in sys.argv[2:]:\n"
                "    t = time.perf_counter()\n"
                "    r = image_to_3d(image=path, prompt='object', output_root=sys.argv[1], segmenter='sam3',\n"
                "                    reconstructor='lite')\n"
                "    print('ROW ' + json.dumps({'s': time.perf_counter() - t, 'stages': r['stages']}), flush=True)\n"
            )
            done = subprocess.run([sys.executable, "-c", script, str(tmp / f"out-{mode}"), *map(str, paths)],
                                  env=env | {"SAM3D_GPU_STAGES": mode}, cwd=ROOT, capture_output=True, text=True,
                                  timeout=3600)
            rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if len(rows) != photos:
                raise RuntimeError(f"{mode}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            times[mode] = [r["s"] for r in rows]
            loads[mode] = {stage: sum(1 for r in rows if r["stages"].get(stage, {}).get("model_load_s", 0) > 0)
                           for stage in ("segment", "reconstruct")}
            for i, r in enumerate(rows):
                seg = r["stages"]["segment"]
                print(f"{mode:8s} photo {i}: {r['s']:.1f} s (segment on {seg['worker'][:8]}: model load "
                      f"{seg['model_load_s']:.1f} s, queue {seg['queue_wait_s']:.2f} s, run {seg['run_s']:.1f} s)")
    finally:
        for proc in (worker, server):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
    after = {mode: statistics.mean(values[1:]) for mode, values in times.items()}
    ratio = after["workers"] / after["inline"]
    print(f"\nper photo after the first: inline {after['inline']:.1f} s, workers {after['workers']:.1f} s, "
          f"ratio {ratio:.3f} (target <= 1.1); photos that loaded a model: {loads}")
    return {"photos": photos, "inline_after_first_s": round(after["inline"], 2),
            "workers_after_first_s": round(after["workers"], 2), "workers_vs_inline": round(ratio, 3),
            "inline_first_s": round(times["inline"][0], 2), "workers_first_s": round(times["workers"][0], 2),
            "model_loads": loads}


def burst_phase(uploads: int, workers: int, tmp: Path) -> dict:
    """``uploads`` photos PUT at once through ``up --gpu-workers workers``."""
    import boto3

    state = tmp / f"stack-{workers}"
    subprocess.run([*CLI, "up", "--state-dir", str(state), "--prefect-port", "0", "--moto-port", "0",
                    "--gpu-workers", str(workers)], check=True, stdout=subprocess.DEVNULL)
    env = {k: v.strip("'") for k, v in (line.split("=", 1) for line in
                                        (state / "local-stack.env").read_text().splitlines()
                                        if "=" in line and not line.startswith("#"))}
    try:
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        bucket, api_url = env["SAM3D_BUCKET"], env["PREFECT_API_URL"]
        put_at = {}
        for i in range(uploads):
            key = f"{env['SAM3D_UPLOAD_PREFIX']}burst/{i:03d}.png"
            put_at[f"s3://{bucket}/{key}"] = time.time()
            s3.put_object(Bucket=bucket, Key=key, Body=photo(1000 * workers + i), Metadata={"prompt": "disc"})
        deadline = time.monotonic() + 900
        while True:
            runs = [r for r in api(api_url, "/flow_runs/filter", {"limit": 200})
                    if r["parameters"].get("image") in put_at]
            finished = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
            if len(finished) >= uploads or time.monotonic() > deadline:
                break
            time.sleep(1)
        running, completed, loads, failed = [], [], {"segment": 0, "reconstruct": 0}, 0
        sessions = set()
        for run in finished:
            states = {s["type"]: ts(s["timestamp"]) for s in
                      api(api_url, f"/flow_run_states/?flow_run_id={run['id']}", method="GET")}
            start = put_at[run["parameters"]["image"]]
            if run["state_type"] != "COMPLETED":
                failed += 1
                continue
            running.append(states["RUNNING"] - start)
            completed.append(states["COMPLETED"] - start)
        for obj in s3.list_objects_v2(Bucket=bucket, Prefix=env["SAM3D_OUTPUT_PREFIX"]).get("Contents", []):
            if obj["Key"].endswith("/result.json"):
                result = json.loads(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
                for stage, info in result.get("stages", {}).items():
                    loads[stage] += info["model_load_s"] > 0
                    sessions.add(info["worker"])
    finally:
        subprocess.run([*CLI, "down", "--state-dir", str(state)], check=False, stdout=subprocess.DEVNULL)
    figures = {"uploads": uploads, "completed": len(completed), "failed": failed, "sessions": len(sessions),
               "put_to_running_median_s": round(statistics.median(running), 2),
               "put_to_running_p95_s": round(pct(running, 95), 2),
               "put_to_completed_median_s": round(statistics.median(completed), 2),
               "put_to_completed_p95_s": round(pct(completed, 95), 2), "model_loads": loads}
    print(f"burst of {uploads} with up to {workers} worker session(s): {figures}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=3, help="photos per mode in the residency phase (0 skips)")
    parser.add_argument("--burst", type=int, default=20, help="uploads per burst (0 skips)")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="sam3d-bench-gpu-") as tmp:
        if args.photos:
            figures["residency"] = residency_phase(args.photos, Path(tmp))
        for n in args.workers if args.burst else []:
            figures[f"burst_{n}_workers"] = burst_phase(args.burst, n, Path(tmp))
    print("BENCH_JSON " + json.dumps({"gpu_workers": figures}))


if __name__ == "__main__":
    main()
