"""`make bench`: run every benchmark, print a table, write bench/results/latest.json.

Each benchmark is its own script (run in its own process) that prints its figures as text and one
``BENCH_JSON {...}`` line; this runner collects those lines. Never part of `make test`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = [
    ("overhead", ["bench/overhead.py", "--photos", "50"]),
    ("single run", ["bench/run_one.py", "--repeat", "3"]),
    ("command line run", ["bench/cli_run.py", "--runs", "5"]),
    ("review page (in-browser decoder)", ["bench/review_latency.py", "--clicks", "50", "--segmenter", "sam3"]),
    ("review page (float32 decoder)", ["bench/review_latency.py", "--clicks", "50", "--segmenter", "sam3",
                                       "--decoder-weights", "float32"]),
    ("review page (lite fallback)", ["bench/review_latency.py", "--clicks", "20", "--segmenter", "lite"]),
    ("studio", ["bench/studio_latency.py", "--rounds", "5"]),
    ("catalog throughput", ["bench/catalog_throughput.py", "--items", "24", "--rounds", "2"]),
    ("event latency", ["bench/event_latency.py", "--uploads", "20", "--events", "1000", "--compare-cold"]),
    ("warm gpu workers", ["bench/gpu_workers.py", "--photos", "3", "--burst", "20", "--workers", "1", "2"]),
    ("exported assets", ["bench/export.py"]),
    ("sam3 on this cpu", ["bench/sam3_cpu.py"]),
    ("sam3d memory (no gpu)", ["bench/sam3d_memory.py"]),
    ("gpu (cuda only)", ["bench/gpu.py", "--images", "5"]),
]


def machine() -> dict:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    device = "cpu"
    try:
        import torch  # noqa: F401 - optional

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cores": os.cpu_count(), "memory_gib": round(mem_gib, 1), "device": device,
            "python": platform.python_version(), "platform": platform.platform()}


def main() -> None:
    results: dict = {"machine": machine(), "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                     "figures": {}, "errors": {}}
    print(f"machine: {results['machine']}")
    for name, cmd in BENCHES:
        if not (ROOT / cmd[0]).exists():
            continue
        print(f"\n== {name}: {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith("BENCH_JSON "):
                results["figures"].update(json.loads(line.removeprefix("BENCH_JSON ")))
            else:
                print(line)
        if proc.returncode != 0:
            results["errors"][name] = proc.stderr[-2000:]
            print(f"!! {name} failed (exit {proc.returncode}); see latest.json errors")
        print(f"({time.perf_counter() - t:.0f} s)")
    out = ROOT / "bench" / "results" / "latest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out.relative_to(ROOT)}")
    print(f"{'figure':45} value")
    for group, figures in results["figures"].items():
        rows = figures.items() if isinstance(figures, dict) else enumerate(figures)  # a list: one row per entry
        for key, value in rows:
            print(f"{group + '.' + str(key):45} {value}")
    if results["errors"]:
        sys.exit(f"{len(results['errors'])} benchmark(s) failed: {', '.join(results['errors'])}")


if __name__ == "__main__":
    main()
