"""One `image-to-3d` run on the 600x400 sample photo: wall time and peak memory, Prefect overhead vs backends.

Runs each variant in a fresh Python process, so imports and the ephemeral Prefect API start are counted:
  flow   - the image-to-3d flow on Prefect's temporary API server started in the process (what
           `sam3d-pipeline run` does with SAM3D_LOCAL_API=per-run; `cli_run.py` times the reused local server)
  plain  - the same library steps in a plain Python call (`pipeline.run_plain`), no Prefect
Prints a table and the overhead split. Usage: python bench/run_one.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKEND_STAGES = ("segment", "reconstruct", "render")


def _descendant_peak_rss_kib() -> int:
    """Peak RSS (VmHWM) of this process's live child processes (the ephemeral Prefect server)."""
    total = 0
    me = str(os.getpid())
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == me and "VmHWM" in fields:
            total += int(fields["VmHWM"].split()[0])
    return total


def child(mode: str, out: str) -> None:
    start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    from sam3d_pipeline.samples import sample_path

    photo = str(sample_path("coffee"))
    if mode == "flow":
        from sam3d_pipeline.settings import local_prefect_defaults

        local_prefect_defaults()  # as `sam3d-pipeline run` on the embedded default
        import flows.image_to_3d as f
        from sam3d_pipeline.cli.local import local_run_settings

        imported = time.perf_counter()
        with local_run_settings():
            state = f.image_to_3d(image=photo, prompt="coffee cup", output_root=out, force=True, return_state=True)
        result = state.result()
        server_rss = _descendant_peak_rss_kib()
    else:
        from sam3d_pipeline.run.pipeline import RunOptions, run_plain

        imported = time.perf_counter()
        result = run_plain(photo, RunOptions(prompt="coffee cup"), output_root=out, force=True).model_dump()
        server_rss = 0
    end = time.perf_counter()
    print(
        json.dumps(
            {
                "wall_s": end - start,
                "import_s": imported - start,
                "run_s": end - imported,
                "timings": result["timings_s"],
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "server_peak_rss_mib": server_rss / 1024,
            }
        )
    )


def measure(mode: str, out: str) -> dict:
    env = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--out", out], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["process_wall_s"] = time.perf_counter() - t
    return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--out")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out)
        return
    print(
        f"machine: {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB, cpu only; "
        f"photo: scikit-image coffee.png 600x400; lite backends; {args.repeat} runs each"
    )
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for mode in ("plain", "flow"):
            runs = [measure(mode, out) for _ in range(args.repeat)]
            rows[mode] = runs
    header = (
        f"{'variant':8} {'process wall s':>15} {'imports s':>10} {'run s':>7} {'backend s':>10} {'peak RSS MiB':>13}"
    )
    print(header)
    print("-" * len(header))
    summary = {}
    for mode, runs in rows.items():
        med = {
            k: statistics.median(r[k] for r in runs)
            for k in ("process_wall_s", "import_s", "run_s", "peak_rss_mib", "server_peak_rss_mib")
        }
        med["backend_s"] = statistics.median(sum(r["timings"].get(s, 0.0) for s in BACKEND_STAGES) for r in runs)
        summary[mode] = med
        rss = f"{med['peak_rss_mib']:.0f}" + (
            f" (+{med['server_peak_rss_mib']:.0f} server)" if med["server_peak_rss_mib"] else ""
        )
        print(
            f"{mode:8} {med['process_wall_s']:15.2f} {med['import_s']:10.2f} {med['run_s']:7.2f} "
            f"{med['backend_s']:10.2f} {rss:>13}"
        )
    flow, plain = summary["flow"], summary["plain"]
    overhead = flow["process_wall_s"] - plain["process_wall_s"]
    print()
    print(
        f"flow wall {flow['process_wall_s']:.2f} s = backends {flow['backend_s']:.2f} s "
        f"+ intake/publish/imports/Prefect {flow['process_wall_s'] - flow['backend_s']:.2f} s"
    )
    print(
        "BENCH_JSON "
        + json.dumps(
            {
                "single_run": {
                    "flow_process_wall_s": round(flow["process_wall_s"], 2),
                    "plain_process_wall_s": round(plain["process_wall_s"], 2),
                    "flow_backend_s": round(flow["backend_s"], 2),
                    "flow_peak_rss_mib": round(flow["peak_rss_mib"]),
                    "server_peak_rss_mib": round(flow["server_peak_rss_mib"]),
                    "plain_peak_rss_mib": round(plain["peak_rss_mib"]),
                }
            }
        )
    )
    print(
        f"Prefect overhead vs plain call: {overhead:+.2f} s per run "
        f"(ratio {flow['process_wall_s'] / plain['process_wall_s']:.2f}x); "
        f"in-flow run time vs plain run time: {flow['run_s'] / plain['run_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
