"""Catalog throughput (items/minute, lite backends) at concurrency 1 and 2, and orchestration overhead per item.

Every variant processes the same N distinct photos (crops and flips of the 600x400 sample, so every output
prefix differs) into a fresh output root, in one process, with the Prefect test server started once before
timing; flows run as `sam3d-pipeline catalog` runs them on the embedded default (``sam3d_pipeline.cli.local``: no
flow-run heartbeats). Rounds alternate plain → flow c=1 → flow c=2 so machine noise hits all three; figures are medians.

- plain: ``catalog.run_catalog_plain`` (the same stage functions, one thread, no Prefect).
- flow c=1: ``catalog-batch`` with concurrency 1 and 1 GPU slot.
- flow c=2: ``catalog-batch`` with concurrency 2 and 2 GPU slots (two batches' model stages may overlap).

Overhead ratio = flow c=1 wall / plain wall (same work, same order); per item = their difference / N.
Usage: python bench/catalog_throughput.py [--items 16] [--rounds 1] [--batch-size 8] [--width 160]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_manifest(folder: Path, count: int, width: int) -> Path:
    """``count`` distinct photos (``width`` px wide) and a CSV manifest naming them."""
    from sam3d_pipeline.samples import sample_path

    base = Image.open(sample_path("coffee")).convert("RGB")
    lines = ["image,prompt"]
    for i in range(count):
        dx, dy = (i * 7) % 40, (i * 5) % 30
        img = base.crop((dx, dy, dx + 560, dy + 370))
        if i % 2:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = img.resize((width, round(width * 370 / 560)), Image.Resampling.LANCZOS)
        path = folder / f"photo-{i:03d}.jpg"
        img.save(path, quality=92)
        lines.append(f"{path.name},coffee cup")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def n_done(outcome: dict) -> int:
    """Items a re-run should skip: every item the first run finished (completed or no_object)."""
    counts = outcome["counts"]
    return sum(counts.values()) - counts.get("failed", 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=160)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ["SAM3D_SEGMENTER"] = "lite"
    os.environ["SAM3D_RECONSTRUCTOR"] = "lite"
    from prefect.testing.utilities import prefect_test_harness

    from flows.catalog_batch import catalog_batch
    from sam3d_pipeline import catalog
    from sam3d_pipeline.cli.local import local_run_settings
    from sam3d_pipeline.storage import LocalStorage

    walls: dict[str, list[float]] = {"plain": [], "flow_c1": [], "flow_c2": [], "skip": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        manifest = make_manifest(tmp_path, args.items, args.width)
        rows = catalog.load_source(str(manifest))
        # Warm-up: import and build the backends once, outside the timings.
        catalog.run_catalog_plain(rows[:1], LocalStorage(tmp_path / "warm"), segmenter="lite", reconstructor="lite")
        t = time.perf_counter()
        with prefect_test_harness(server_startup_timeout=120), local_run_settings():
            server_start_s = time.perf_counter() - t
            limit = f"bench-gpu-{uuid.uuid4().hex[:6]}"
            for r in range(args.rounds):
                out = tmp_path / f"plain-{r}"
                t = time.perf_counter()
                entries = catalog.run_catalog_plain(rows, LocalStorage(out), batch_size=args.batch_size,
                                                    segmenter="lite", reconstructor="lite")
                walls["plain"].append(time.perf_counter() - t)
                assert all(e.status in ("completed", "no_object") for e in entries), catalog.summary_line(entries)
                for name, conc in (("flow_c1", 1), ("flow_c2", 2)):
                    out = tmp_path / f"{name}-{r}"
                    t = time.perf_counter()
                    state = catalog_batch(source=str(manifest), output_root=str(out), concurrency=conc,
                                          batch_size=args.batch_size, gpu_limit=limit, gpu_slots=conc,
                                          segmenter="lite", reconstructor="lite", return_state=True)
                    walls[name].append(time.perf_counter() - t)
                    outcome = state.result()
                    assert outcome["counts"]["failed"] == 0 and outcome["counts"]["skipped"] == 0, outcome["summary"]
                # The same catalog again on a finished output: every item is skipped from its bytes alone.
                t = time.perf_counter()
                state = catalog_batch(source=str(manifest), output_root=str(tmp_path / f"flow_c2-{r}"), concurrency=2,
                                      batch_size=args.batch_size, gpu_limit=limit, gpu_slots=2,
                                      segmenter="lite", reconstructor="lite", return_state=True)
                walls["skip"].append(time.perf_counter() - t)
                outcome = state.result()
                assert outcome["counts"]["skipped"] == n_done(outcome), outcome["summary"]
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in walls.items()), flush=True)

    med = {k: statistics.median(v) for k, v in walls.items()}
    n = args.items
    figures = {
        "items": n,
        "photo_px": f"{args.width}x{round(args.width * 370 / 560)}",
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "prefect_server_start_s": round(server_start_s, 1),
        "plain_items_per_min": round(60 * n / med["plain"], 1),
        "flow_c1_items_per_min": round(60 * n / med["flow_c1"], 1),
        "flow_c2_items_per_min": round(60 * n / med["flow_c2"], 1),
        "skip_items_per_min": round(60 * n / med["skip"], 1),
        "overhead_ratio_c1": round(med["flow_c1"] / med["plain"], 3),
        "overhead_per_item_ms_c1": round(1000 * (med["flow_c1"] - med["plain"]) / n, 1),
        "walls_s": {k: [round(x, 2) for x in v] for k, v in walls.items()},
    }
    print(f"catalog throughput, lite backends, {n} items of {figures['photo_px']} px, batch {args.batch_size}, "
          f"{os.cpu_count()} CPU(s):")
    print(f"  plain loop        {figures['plain_items_per_min']:7.1f} items/min")
    print(f"  flow concurrency 1 {figures['flow_c1_items_per_min']:6.1f} items/min")
    print(f"  flow concurrency 2 {figures['flow_c2_items_per_min']:6.1f} items/min")
    print(f"  re-run, all done   {figures['skip_items_per_min']:6.1f} items/min (skipped)")
    print(f"  orchestration overhead (c=1 vs plain): ratio {figures['overhead_ratio_c1']:.3f}, "
          f"{figures['overhead_per_item_ms_c1']:.1f} ms/item")
    print("BENCH_JSON " + json.dumps({"catalog_throughput": figures}))


if __name__ == "__main__":
    main()
