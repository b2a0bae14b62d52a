"""Where a job's time went: ``result.json``'s ``clock`` section, from the job's creation to its report.

Wall-clock instants (seconds since the epoch), measured once each:

- ``queued_at``: when the job was due to start (the flow run's expected start time); None when the run was
  created inside this process (``sam3d-pipeline run``): nothing waited in a queue.
- the process's start (``psutil``), and ``imported_at``: when the flow's module finished importing
  (:func:`mark_imported`, called at the end of the flow modules' imports).
- ``flow_started_at``: the flow body's first line (``RunRecord.flow_started_at``).

From those, per job: ``queue_s`` (due → its process started; 0 for a process that was already running),
``process_start_s`` (process start → flow module imported: interpreter and imports; 0 for a process that was
already running), ``prefect_s`` (→ flow body: API server attach or start, flow-run creation, state changes),
``steps_s`` (the run's own steps, as ``timings_s``), ``model`` (per model stage: ``queue_wait_s``,
``model_load_s``, ``run_s``, ``dispatch_s`` = the step's time outside the model), ``orchestration_s`` (flow body
time outside the steps: task-run states, artifacts), the GPU-seconds the job held and their price.

A GPU-second is a second a model stage held a CUDA device for this job (its load and run); the price is
``SAM3D_GPU_PRICE_PER_HOUR`` (dollars per GPU-hour; unset: no cost is given).
"""

from __future__ import annotations

import os
import time
from typing import Any

_imported_at: float | None = None
STEP_ORDER = ("intake", "segment", "review_wait", "reconstruct", "render", "publish")
RENDER_PARTS = ("preview", "export")  # inside ``render``


def mark_imported() -> None:
    """Record when the flow modules finished importing (first call wins: a long-lived process imports once)."""
    global _imported_at
    if _imported_at is None:
        _imported_at = time.time()


def process_started_at() -> float:
    """When this process started (seconds since the epoch), to about 10 ms.

    On Linux: the process's start in clock ticks since boot (``/proc/self/stat``) against the time since boot now
    (``/proc/uptime``). psutil's ``create_time`` adds the boot time, which the kernel gives in whole seconds, so it
    can read up to a second early (0.99 s on this project's machine). A process started within that second of its
    run's due time then looked older than the run, and its interpreter start and imports were counted as Prefect
    API time. Elsewhere psutil's value is used."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
            since_boot = float(uptime.read().split()[0])
        return time.time() - (since_boot - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().create_time()


def gpu_seconds(stages: dict[str, dict[str, Any]], devices: dict[str, str]) -> float:
    """Seconds the model stages held a CUDA device (load + run) for this job."""
    return sum(float(stage.get("model_load_s", 0.0)) + float(stage.get("run_s", 0.0))
               for name, stage in stages.items() if str(devices.get(name, "cpu")).startswith("cuda"))


def section(*, timings: dict[str, float], stages: dict[str, dict[str, Any]], devices: dict[str, str],
            flow_started_at: float, queued_at: float | None, price_per_hour: float | None,
            now: float | None = None, process_start: float | None = None,
            imported_at: float | None = None) -> dict[str, Any]:
    """The ``clock`` section of ``result.json`` (see the module docstring)."""
    now = time.time() if now is None else now
    process_start = process_started_at() if process_start is None else process_start
    imported_at = _imported_at if imported_at is None else imported_at
    fresh = queued_at is None or process_start >= queued_at  # this process was started for this job
    queue_s = max(0.0, process_start - queued_at) if queued_at is not None and fresh else 0.0
    start = process_start if fresh else max(queued_at or flow_started_at, process_start)
    if fresh and imported_at is not None and process_start <= imported_at <= flow_started_at:
        process_s, prefect_s = imported_at - process_start, flow_started_at - imported_at
    else:  # a long-lived process (a catalog, a worker's session): the imports were paid before this job
        process_s, prefect_s = 0.0, max(0.0, flow_started_at - start)
    steps = {name: round(timings[name], 3) for name in STEP_ORDER if name in timings}
    render_parts = {name: round(timings[name], 3) for name in RENDER_PARTS if name in timings}
    model = {}
    for name, stage in stages.items():
        step_s = timings.get(name, 0.0)
        load, run = float(stage.get("model_load_s", 0.0)), float(stage.get("run_s", 0.0))
        model[name] = {"worker": stage.get("worker"), "queue_wait_s": round(float(stage.get("queue_wait_s", 0.0)), 3),
                       "model_load_s": round(load, 3), "run_s": round(run, 3),
                       "dispatch_s": round(max(0.0, step_s - load - run), 3)}
    in_steps = sum(v for k, v in timings.items() if k in STEP_ORDER)
    gpu_s = gpu_seconds(stages, devices)
    clock: dict[str, Any] = {
        "queue_s": round(queue_s, 3),
        "process_start_s": round(process_s, 3),
        "prefect_s": round(prefect_s, 3),
        "steps_s": steps,
        "model": model,
        "render_s": render_parts,
        "orchestration_s": round(max(0.0, now - flow_started_at - in_steps), 3),
        "wall_s": round(now - (queued_at if queued_at is not None and fresh else start), 3),
        "gpu_s": round(gpu_s, 3),
    }
    if price_per_hour is not None:
        clock["gpu_price_per_hour"] = price_per_hour
        clock["gpu_cost"] = round(gpu_s / 3600.0 * price_per_hour, 6)
    return clock


def table(clock: dict[str, Any]) -> list[tuple[str, float]]:
    """(part, seconds) rows in the order a job meets them, for the run's artifact and the bench."""
    rows = [("queue", clock.get("queue_s", 0.0)), ("process start + imports", clock.get("process_start_s", 0.0)),
            ("Prefect API", clock.get("prefect_s", 0.0))]
    for name, seconds in clock.get("steps_s", {}).items():
        stage = clock.get("model", {}).get(name)
        if stage:
            rows += [(f"{name}: dispatch", stage["dispatch_s"]), (f"{name}: model load", stage["model_load_s"]),
                     (f"{name}: model", stage["run_s"])]
        elif name == "render" and clock.get("render_s"):
            parts = clock["render_s"]
            rows += [(f"render: {part}", v) for part, v in parts.items()]
            rows.append(("render: other", round(max(0.0, seconds - sum(parts.values())), 3)))
        else:
            rows.append((name, seconds))
    rows.append(("orchestration", clock.get("orchestration_s", 0.0)))
    return rows
