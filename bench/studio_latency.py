"""Studio in headless Chromium on the local stack: submit → first candidate mask visible, confirm → GLB visible.

Starts ``sam3d-pipeline up`` in a temporary folder (or uses a running stack with ``--env-file``) and opens the
studio in Debian's Chromium, in one tab opened afresh for every round, as a person doing one job after another. Each
round: choose a photo (a new one each round, so no finished result is reused), type a prompt, review ``required``,
click Create; wait until the first candidate mask is painted; look at it for ``--look-s`` (2 s: a person checks the
mask before acting; the page sets up its 3D viewer in such idle time); click once on the object (refined and shown);
click Confirm; wait until ``<model-viewer>`` has loaded ``object.glb`` and painted a frame. Times come from the
browser's clock.

Figures (median of ``--rounds``, with min and max): ``submit_to_first_mask_s`` and ``first_mask_beyond_segment_s``
(minus the job's segment stage: dispatch, model load, model; target <= 1.5), ``confirm_to_glb_s`` and
``glb_beyond_reconstruct_export_s`` (minus the reconstruct stage and the export; target <= 2), split into
``confirm_to_final_status_s`` (the run resumes, reconstructs and publishes; the page sees it by polling) and
``final_status_to_glb_s`` (the page fetches the GLB and model-viewer parses and renders it); also
``confirm_to_glb_fetched_s`` (the page saw ``object.glb`` published, early or at the end, and fetched it) and
``click_refine_ms``. Each round also prints its path to the first mask (the page's marks: photo sent, job created,
each status first seen, review open; and the flow run's states from the Prefect API, in seconds after Create) and
the page's marks after Confirm: with Chromium's software WebGL (no GPU here) showing object.glb takes about a second
even after the viewer's set-up (``glb-fetched`` to ``glb-loaded``).

Usage: python bench/studio_latency.py [--rounds 5] [--look-s 2] [--env-file .sam3d/local-stack.env]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CLI = [sys.executable, "-m", "sam3d_pipeline.cli"]
CLOCKS: list[dict] = []  # result.json's clock of every round
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            env[name] = shlex.split(value)[0] if value else ""
    return env


def one_round(studio, seed: int, tag: str, look_s: float, prefect_api: str | None) -> dict[str, float]:
    from tests.photos import encode, object_photo

    rgb, truth = object_photo(320, 240, seed=seed)
    studio.open()
    studio.fill(encode(rgb), f"red ellipse {tag}-{seed}", "required", name=f"ellipse-{seed}.png")
    job_id = studio.submit()
    studio.wait_first_mask(timeout_s=300)
    print_first_mask_path(studio, job_id, prefect_api)
    studio.page.wait_for_timeout(look_s * 1000)  # the reviewer looks at the mask before clicking
    cy, cx = (float(v.mean()) for v in np.nonzero(truth))
    click_ms = studio.click_image(cx, cy, 320)
    studio.confirm(timeout_s=300)
    # The GLB can be on screen before the job ends (it is published before the slower formats): the report comes
    # with the final status.
    studio.page.wait_for_function("window.studio.marks['final-status'] !== undefined", timeout=300_000)
    marks = studio.page.evaluate("window.studio.marks")
    final_ms = marks["final-status"]
    # When the page saw each step after Confirm (the viewer's set-up shares this machine's CPUs with the stack).
    print("  marks after confirm (s): " + ", ".join(f"{name} {(ms - studio.confirmed_ms) / 1000:.2f}" for name, ms
                                                   in sorted(marks.items(), key=lambda kv: kv[1])
                                                   if ms >= studio.confirmed_ms), flush=True)
    clock = studio.page.evaluate("window.studio.job && window.studio.job.result && window.studio.job.result.clock")
    if clock:
        CLOCKS.append(clock)
    first_mask_s = (studio.first_mask_ms - studio.submitted_ms) / 1000
    glb_s = (studio.glb_ms - studio.confirmed_ms) / 1000
    stage_s, export_s = stage_seconds(clock or {})
    return {
        "submit_to_first_mask_s": first_mask_s,
        # The targets: first mask <= segmentation + 1.5 s; GLB on screen <= reconstruction + export + 2 s, where a
        # stage is its dispatch to the GPU worker, model load and model (this job's clock).
        "first_mask_beyond_segment_s": first_mask_s - stage_s["segment"],
        "confirm_to_glb_s": glb_s,
        "glb_beyond_reconstruct_export_s": glb_s - stage_s["reconstruct"] - export_s,
        "confirm_to_final_status_s": (final_ms - studio.confirmed_ms) / 1000,
        "final_status_to_glb_s": (studio.glb_ms - final_ms) / 1000,
        # The page saw object.glb published (the job's early_outputs, or its outputs at the end) and fetched it.
        "confirm_to_glb_fetched_s": (marks["glb-fetched"] - studio.confirmed_ms) / 1000,
        "click_refine_ms": click_ms,
    }


def print_first_mask_path(studio, job_id: str, prefect_api: str | None) -> None:
    """When each step towards the first mask happened, in seconds after Create: the page's marks and, from the
    Prefect API, the flow run's states (the server's clock; the same machine)."""
    since = studio.submitted_ms
    steps = {name: ms for name, ms in studio.page.evaluate("window.studio.marks").items()}
    steps["first-mask"] = studio.first_mask_ms
    if prefect_api:
        import httpx

        states = httpx.get(f"{prefect_api}/flow_run_states/", params={"flow_run_id": job_id}, timeout=10).json()
        for state in states:
            steps[f"run-{state['name'].lower()}"] = datetime.fromisoformat(state["timestamp"]).timestamp() * 1000
    print("  to the first mask (s): " + ", ".join(f"{name} {(ms - since) / 1000:.2f}" for name, ms
                                                  in sorted(steps.items(), key=lambda kv: kv[1])
                                                  if ms <= studio.first_mask_ms), flush=True)


def stage_seconds(clock: dict) -> tuple[dict[str, float], float]:
    """Seconds of the segment and reconstruct stages (dispatch + model load + model), and of the export."""
    from sam3d_pipeline.run.clock import table

    parts = dict(table(clock)) if clock else {}
    stages = {name: sum(parts.get(f"{name}: {part}", 0.0) for part in ("dispatch", "model load", "model"))
              for name in ("segment", "reconstruct")}
    return stages, parts.get("render: export", 0.0)


def measure(env: dict[str, str], rounds: int, look_s: float) -> dict:
    from playwright.sync_api import sync_playwright

    from tests.conftest import CHROMIUM
    from tests.test_studio_browser import VIEWPORT, StudioPage

    tag = uuid.uuid4().hex[:6]  # prompts unique to this run: a reused stack has no finished result for them
    rows, errors = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORT)  # one profile: the viewer script stays cached
            studio = StudioPage(context.new_page(), env["SAM3D_WEB_URL"], env["SAM3D_API_TOKEN"])
            errors = studio.errors
            for i in range(rounds):
                rows.append(one_round(studio, seed=100 + i, tag=tag, look_s=look_s,
                                      prefect_api=env.get("PREFECT_API_URL")))
                print(f"round {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()), flush=True)
        finally:
            browser.close()
    if errors:
        print("browser errors:", *errors, sep="\n  ")
    figures: dict = {"rounds": rounds, "look_s": look_s, "browser_errors": len(errors)}
    print(f"\nstudio on the local stack, {rounds} rounds (lite backends, 320x240 PNG, review=required, one click):")
    for name in rows[0]:
        values = [r[name] for r in rows]
        digits = 0 if name.endswith("_ms") else 2
        figures[f"{name}_median"] = round(statistics.median(values), digits)
        figures[f"{name}_min"] = round(min(values), digits)
        figures[f"{name}_max"] = round(max(values), digits)
        print(f"  {name:27s}: median {statistics.median(values):8.2f}, min {min(values):8.2f}, "
              f"max {max(values):8.2f}")
    if CLOCKS:
        from clock_table import breakdown, print_side_by_side

        figures["clock"] = {"studio": breakdown(CLOCKS)}
        print_side_by_side(figures["clock"])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--env-file", type=Path, help="use a running stack (its local-stack.env)")
    parser.add_argument("--look-s", type=float, default=2.0,
                        help="seconds the reviewer looks at the first mask before clicking (0: at once)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sam3d-bench-") as tmp:
        stack_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_"))}
        if args.env_file is None:
            subprocess.run([*CLI, "up", "--state-dir", tmp, "--prefect-port", "0", "--moto-port", "0"], check=True,
                           env=stack_env)
        env_file = args.env_file or Path(tmp) / "local-stack.env"
        try:
            figures = measure(read_env(env_file), args.rounds, args.look_s)
        finally:
            if args.env_file is None:
                subprocess.run([*CLI, "down", "--state-dir", tmp], check=False, env=stack_env)
        print("BENCH_JSON " + json.dumps({"studio_latency": figures}))


if __name__ == "__main__":
    main()
