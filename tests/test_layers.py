"""The layers written down in pyproject.toml (import-linter) name every part of the library, so a new module is
checked from its first commit; and the contracts hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _contract(name: str) -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return next(c for c in config["contracts"] if c["name"].startswith(name))


def _library_parts() -> set[str]:
    package = ROOT / "sam3d_pipeline"
    parts = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    parts |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    return {f"sam3d_pipeline.{name}" for name in parts}


def test_the_library_contract_names_every_part_below_the_command_line():
    listed = set(_contract("Below the command line")["source_modules"])
    assert listed == _library_parts() - {"sam3d_pipeline.cli"}


def test_the_torch_contract_names_every_part_but_the_backends():
    listed = set(_contract("torch and sam3")["source_modules"])
    assert listed == (_library_parts() - {"sam3d_pipeline.backends"}) | {"flows", "tasks"}


@pytest.mark.skipif(shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter is installed by `make lint` / `make test`")
def test_the_contracts_hold():
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]


def test_the_prefect_internals_the_one_at_a_time_worker_relies_on_are_there():
    """tasks/gpu_tasks.py:OneAtATimeWorker replaces TaskWorker's subscription loop (Prefect does not re-deliver a
    task whose worker died after acknowledging it); pyproject pins Prefect to the range this test covers."""
    import inspect

    from prefect.client.schemas.objects import TaskRun
    from prefect.client.subscriptions import Subscription
    from prefect.task_worker import TaskWorker

    assert inspect.iscoroutinefunction(TaskWorker._subscribe_to_task_scheduling)
    assert list(inspect.signature(TaskWorker._acquire_token).parameters) == ["self", "task_run_id"]
    assert list(inspect.signature(TaskWorker._safe_submit_scheduled_task_run).parameters) == ["self", "task_run"]
    subscription = Subscription(model=TaskRun, path="/task_runs/subscriptions/scheduled", keys=["k"],
                                client_id="c", base_url="http://127.0.0.1:9/api")
    assert subscription._websocket is None and hasattr(subscription, "_connect")
