"""Orchestration overhead per photo: `image-to-3d` (Prefect) vs the same library steps in a plain Python loop.

Every variant processes the same N distinct photos (crops and flips of the 600x400 sample, so every output
prefix differs) with the lite backends, in one process, alternating blocks so machine noise hits all of them:
the plain loop; the flow as `sam3d-pipeline run` runs it on the embedded default (``sam3d_pipeline.cli.local``: no
flow-run heartbeats); and the flow with Prefect's default heartbeats, as a deployed run on a worker has them.
The Prefect API server is started once before timing (its start-up is reported separately).
Target: flow / plain <= 1.15. Usage: python bench/overhead.py [--photos 50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_photos(folder: Path, count: int) -> list[str]:
    from sam3d_pipeline.samples import sample_path

    base = np.asarray(Image.open(sample_path("coffee")).convert("RGB"))
    paths = []
    for i in range(count):
        dx, dy = (i * 7) % 40, (i * 5) % 30
        img = base[dy : dy + 370, dx : dx + 560]
        if i % 2:
            img = img[:, ::-1]
        path = folder / f"photo-{i:03d}.jpg"
        Image.fromarray(np.ascontiguousarray(img)).save(path, quality=92)
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=50)
    parser.add_argument("--block", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    t = time.perf_counter()
    from prefect.testing.utilities import prefect_test_harness

    from flows.image_to_3d import image_to_3d
    from sam3d_pipeline.cli.local import local_run_settings
    from sam3d_pipeline.run.pipeline import RunOptions, run_plain

    imports_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp), args.photos)
        t = time.perf_counter()
        with prefect_test_harness(server_startup_timeout=120):
            server_start_s = time.perf_counter() - t
            # Warm both paths once (imports, backend construction) outside the timing.
            run_plain(photos[0], RunOptions(prompt="cup"), output_root=f"{tmp}/warm-plain", force=True)
            image_to_3d(image=photos[0], prompt="cup", output_root=f"{tmp}/warm-flow", force=True)
            times: dict[str, list[float]] = {"plain": [], "flow": [], "flow_heartbeats": []}
            for start in range(0, len(photos), args.block):
                block = photos[start : start + args.block]
                for p in block:
                    t = time.perf_counter()
                    run_plain(p, RunOptions(prompt="cup"), output_root=f"{tmp}/plain", force=True)
                    times["plain"].append(time.perf_counter() - t)
                for variant, settings in (("flow", local_run_settings), ("flow_heartbeats", nullcontext)):
                    with settings():
                        for p in block:
                            t = time.perf_counter()
                            state = image_to_3d(image=p, prompt="cup", output_root=f"{tmp}/{variant}", force=True,
                                                return_state=True)
                            times[variant].append(time.perf_counter() - t)
                            assert state.is_completed(), state.message
    plain = sum(times["plain"])
    ratio = sum(times["flow"]) / plain
    ratio_hb = sum(times["flow_heartbeats"]) / plain
    per_photo_ms = (sum(times["flow"]) - plain) / len(photos) * 1000
    figures = {
        "photos": len(photos),
        "plain_median_s": round(statistics.median(times["plain"]), 3),
        "flow_median_s": round(statistics.median(times["flow"]), 3),
        "overhead_ratio": round(ratio, 3),
        "overhead_per_photo_ms": round(per_photo_ms, 1),
        "flow_heartbeats_median_s": round(statistics.median(times["flow_heartbeats"]), 3),
        "overhead_ratio_heartbeats": round(ratio_hb, 3),
        "overhead_per_photo_ms_heartbeats": round((sum(times["flow_heartbeats"]) - plain) / len(photos) * 1000, 1),
        "prefect_server_start_s": round(server_start_s, 2),
        "imports_s": round(imports_s, 2),
    }
    print(f"photos: {len(photos)} distinct 560x370 crops of the sample, lite backends, {os.cpu_count()} cores")
    print(f"plain loop: median {figures['plain_median_s']:.2f} s/photo; flow: median {figures['flow_median_s']:.2f} "
          f"s/photo")
    print(f"overhead: {ratio:.3f}x (target <= 1.15), {per_photo_ms:+.0f} ms per photo; "
          f"Prefect server start {server_start_s:.1f} s (once per process)")
    print(f"with Prefect's flow-run heartbeats (deployed runs): {ratio_hb:.3f}x, "
          f"{figures['overhead_per_photo_ms_heartbeats']:+.0f} ms per photo")
    print("BENCH_JSON " + json.dumps({"overhead": figures}))


if __name__ == "__main__":
    main()
