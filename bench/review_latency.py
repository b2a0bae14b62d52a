"""Review page latency in headless Chromium: open → first mask, click → mask (median, p95), bytes per image.

Starts its own Prefect test server, a paused `image-to-3d` run (review=required) on a 600x400 photo, the
review server and Debian's Chromium; everything is stopped at the end. Usage: python bench/review_latency.py
[--clicks 50]. It measures whichever click path the run's page uses (the page labels it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKEN = "bench-token"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clicks", type=int, default=50)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["SAM3D_REVIEW_POLL_INTERVAL_S"] = "0.5"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    from playwright.sync_api import sync_playwright
    from prefect import tags
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.image_to_3d import image_to_3d
    from sam3d_pipeline.samples import sample_path
    from tests.servers import free_port, wait_for_port

    with prefect_test_harness(server_startup_timeout=120), tempfile.TemporaryDirectory() as out:
        tag = "review-bench"

        def run_flow():
            with tags(tag):
                image_to_3d(
                    image=str(sample_path("coffee")),
                    prompt="coffee cup",
                    output_root=out,
                    review="required",
                    review_timeout_s=600,
                    force=True,
                    return_state=True,
                )

        thread = threading.Thread(target=run_flow, daemon=True)
        thread.start()
        with get_client(sync_client=True) as client:
            while True:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
                if runs and runs[0].state.is_paused():
                    run_id = runs[0].id
                    break
                time.sleep(0.2)
        time.sleep(1.0)
        port = free_port()
        env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(), "SAM3D_REVIEW_TOKEN": TOKEN}
        server = subprocess.Popen(
            [sys.executable, "-m", "sam3d_pipeline.cli", "review-server", "--port", str(port)],
            env=env,
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port, proc=server)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path="/usr/bin/chromium",
                    args=[
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-background-networking",
                        "--disable-component-update",
                        "--disable-sync",
                        "--no-first-run",
                    ],
                )
                page = browser.new_page()
                received = []
                page.on("response", lambda r: received.append(r))
                opened = time.perf_counter()
                page.goto(f"http://127.0.0.1:{port}/runs/{run_id}#token={TOKEN}")
                page.wait_for_selector("body[data-ready='1']", timeout=60_000)
                first_mask_s = time.perf_counter() - opened
                label = page.inner_text("#decoder")
                image_bytes = 0
                for r in received:
                    try:
                        image_bytes += len(r.body())
                    except Exception:  # noqa: BLE001 - redirects and aborted responses have no body
                        pass
                box = page.locator("#canvas").bounding_box()
                scale = box["width"] / 600
                latencies = []
                for i in range(args.clicks):
                    x, y = 290 + (i % 5) * 8, 150 + (i % 7) * 6
                    page.evaluate("delete document.body.dataset.lastRefineMs")
                    page.mouse.click(box["x"] + x * scale, box["y"] + y * scale)
                    page.wait_for_function("document.body.dataset.lastRefineMs !== undefined", timeout=60_000)
                    latencies.append(float(page.evaluate("document.body.dataset.lastRefineMs")))
                    if i % 10 == 9:
                        page.click("#reset")
                browser.close()
        finally:
            os.kill(server.pid, signal.SIGTERM)
            server.wait(timeout=10)
            from prefect.flow_runs import resume_flow_run

            resume_flow_run(run_id, run_input={"action": "reject"})
            thread.join(60)
    lat = sorted(latencies)
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    print(f"machine: {os.cpu_count()} cores; photo 600x400; click path: {label}")
    print(f"open → first mask shown: {first_mask_s:.2f} s")
    print(f"click → mask over {len(lat)} clicks: median {statistics.median(lat):.0f} ms, p95 {p95:.0f} ms")
    print(f"bytes downloaded for the page and one image: {image_bytes:,}")
    print(
        "BENCH_JSON "
        + json.dumps(
            {
                "review_page": {
                    "click_path": label,
                    "first_mask_s": round(first_mask_s, 2),
                    "clicks": len(lat),
                    "click_median_ms": round(statistics.median(lat)),
                    "click_p95_ms": round(p95),
                    "bytes_per_image": image_bytes,
                }
            }
        )
    )


if __name__ == "__main__":
    main()
