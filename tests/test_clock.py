"""The job's clock (``run/clock.py``): when its process started, and how a job's time splits into queue, process
start and Prefect API."""

from __future__ import annotations

import subprocess
import sys
import time

from sam3d_pipeline.run import clock

STARTED = "from sam3d_pipeline.run.clock import process_started_at; print(process_started_at())"


def test_a_process_start_is_read_to_the_hundredth_of_a_second():
    before = time.time()
    out = subprocess.run([sys.executable, "-c", STARTED], capture_output=True, text=True, timeout=60, check=True)
    after = time.time()
    started = float(out.stdout)
    # Not a second early (psutil's boot time is whole seconds), and not after the interpreter's imports either.
    assert before - 0.05 <= started <= after
    assert started <= before + 0.5


def test_a_fresh_process_that_started_soon_after_the_run_was_due_counts_its_imports_as_process_start():
    due = 1000.0
    section = clock.section(timings={}, stages={}, devices={}, queued_at=due, process_start=due + 0.2,
                            imported_at=due + 2.7, flow_started_at=due + 3.0, now=due + 4.0, price_per_hour=None)
    assert (section["queue_s"], section["process_start_s"], section["prefect_s"]) == (0.2, 2.5, 0.3)
    assert section["wall_s"] == 4.0


def test_a_warm_process_pays_no_process_start():
    due = 1000.0  # forked after the run was due, from a server that imported the flows long before
    section = clock.section(timings={}, stages={}, devices={}, queued_at=due, process_start=due + 0.1,
                            imported_at=due - 600.0, flow_started_at=due + 0.4, now=due + 2.0, price_per_hour=None)
    assert (section["queue_s"], section["process_start_s"], section["prefect_s"]) == (0.1, 0.0, 0.3)
