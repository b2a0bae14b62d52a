"""The per-step clock of several jobs (``result.json``'s ``clock``) as one table: median seconds per part.

Used by ``cli_run.py``, ``studio_latency.py`` and ``event_latency.py`` so the three paths print the same rows
side by side (``python bench/clock_table.py A.json B.json ...`` prints saved breakdowns together).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def breakdown(clocks: list[dict]) -> dict[str, float]:
    """Median seconds per part over ``clocks`` (parts in the order a job meets them), plus ``wall``."""
    from sam3d_pipeline.run.clock import table

    rows: dict[str, list[float]] = {}
    for clock in clocks:
        for part, seconds in table(clock):
            rows.setdefault(part, []).append(seconds)
        rows.setdefault("wall", []).append(clock["wall_s"])
    return {part: round(statistics.median(values), 3) for part, values in rows.items()}


def read_clocks(results: list[Path]) -> list[dict]:
    clocks = []
    for path in results:
        clock = json.loads(path.read_text()).get("clock")
        if clock:
            clocks.append(clock)
    return clocks


def print_side_by_side(columns: dict[str, dict[str, float]]) -> None:
    parts = list(dict.fromkeys(part for column in columns.values() for part in column))
    print(f"{'where the time went (median s)':34}" + "".join(f"{name:>16}" for name in columns))
    for part in parts:
        print(f"{part:34}" + "".join(f"{column.get(part, 0.0):>16.3f}" for column in columns.values()))


if __name__ == "__main__":
    print_side_by_side({Path(p).stem: json.loads(Path(p).read_text()) for p in sys.argv[1:]})
