"""`sam3d-pipeline run` as a user types it, on the embedded default: wall time against backend time.

In a fresh ``PREFECT_HOME`` (so nothing is warm): one first run (it starts the reused local Prefect API), then
``--runs`` warm runs (distinct photos, so nothing is reused), then the same photos with
``SAM3D_LOCAL_API=per-run`` (Prefect's temporary server inside every command, as before the reused server).
Backend time is ``result.json``'s ``timings_s.total`` (intake, segment, reconstruct, render); the overhead is
the command's wall time minus it. The reused server is stopped by PID at the end.

Figures: ``first_wall_s`` / ``first_overhead_s``, ``warm_wall_median_s``, ``warm_backend_median_s``,
``warm_overhead_median_s`` (target <= 3 s), ``per_run_overhead_median_s``, ``overhead_ratio_per_run_vs_warm``,
and the per-step clock of the warm runs and the per-run ones side by side.

Usage: python bench/cli_run.py [--runs 5]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clock_table import breakdown, print_side_by_side  # noqa: E402


def one_run(home: Path, photo: Path, out: Path, mode: str) -> dict:
    env = os.environ | {"PREFECT_HOME": str(home), "SAM3D_LOCAL_API": mode}
    env.pop("PREFECT_API_URL", None)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sam3d_pipeline.cli", "run", str(photo), "--prompt", "object",
                           "--segmenter", "lite", "--reconstructor", "lite", "--out", str(out)],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({mode}):\n{proc.stderr[-3000:]}")
    (result_path,) = out.glob("*/result.json")
    result = json.loads(result_path.read_text())
    backend = result["timings_s"]["total"]
    return {"wall_s": wall, "backend_s": backend, "overhead_s": wall - backend, "clock": result["clock"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from sam3d_pipeline.cli import local_api
    from tests.photos import encode, object_photo

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        home = tmp_path / "prefect-home"
        photos = []
        for i in range(args.runs + 1):
            path = tmp_path / f"photo-{i}.png"
            path.write_bytes(encode(object_photo(640, 480, seed=100 + i)[0]))
            photos.append(path)
        try:
            first = one_run(home, photos[0], tmp_path / "out-first", "reuse")
            warm = [one_run(home, p, tmp_path / f"out-warm-{i}", "reuse") for i, p in enumerate(photos[1:])]
        finally:
            record = local_api.stop(home / "sam3d-local-api")
            print(f"stopped the local API server (pid {record.pid})" if record else "no local API server left")
        per_run = [one_run(home, p, tmp_path / f"out-per-run-{i}", "per-run") for i, p in enumerate(photos[1:])]

    def med(rows: list[dict], key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 2)

    figures = {
        "first_wall_s": round(first["wall_s"], 2), "first_overhead_s": round(first["overhead_s"], 2),
        "warm_wall_median_s": med(warm, "wall_s"), "warm_backend_median_s": med(warm, "backend_s"),
        "warm_overhead_median_s": med(warm, "overhead_s"),
        "per_run_wall_median_s": med(per_run, "wall_s"), "per_run_overhead_median_s": med(per_run, "overhead_s"),
        "runs": args.runs,
    }
    figures["overhead_ratio_per_run_vs_warm"] = round(
        figures["per_run_overhead_median_s"] / max(figures["warm_overhead_median_s"], 1e-9), 2)
    for name, value in figures.items():
        print(f"{name:36} {value}")
    columns = {"cli first": breakdown([first["clock"]]), "cli warm": breakdown([r["clock"] for r in warm]),
               "cli per-run": breakdown([r["clock"] for r in per_run])}
    print_side_by_side(columns)
    print("BENCH_JSON " + json.dumps({"cli_run": figures | {"clock": columns}}))


if __name__ == "__main__":
    main()
