"""The ``sam3d-pipeline`` command as a user runs it: a real subprocess on Prefect's ephemeral API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sam3d_pipeline.cli.main import parse_box, parse_point

from .photos import encode, object_photo, uniform_photo


def _cli(*args: str, home: Path, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PREFECT_HOME": str(home / "prefect-home"), "PREFECT_API_URL": ""} | extra_env
    env.pop("PREFECT_API_URL")
    return subprocess.run(
        [sys.executable, "-m", "sam3d_pipeline.cli", *args],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=home,
    )


def test_parse_box_and_point():
    assert parse_box("1,2,30,40.5") == (1.0, 2.0, 30.0, 40.5)
    assert parse_point("3,4") == {"x": 3.0, "y": 4.0, "label": 1}
    assert parse_point("3,4,0")["label"] == 0
    import typer

    for bad in ("1,2,3", "a,b,c,d", "5,5,1,1"):
        with pytest.raises(typer.BadParameter):
            parse_box(bad)
    for bad in ("1", "1,2,3,4", "1,2,7"):
        with pytest.raises(typer.BadParameter):
            parse_point(bad)


def test_usage_errors_exit_2_without_starting_prefect(tmp_path):
    photo = tmp_path / "p.png"
    photo.write_bytes(encode(object_photo()[0]))
    proc = _cli("run", str(photo), "--prompt", "x", "--box", "1,2,3", home=tmp_path)
    assert proc.returncode == 2 and "expected four numbers" in proc.stderr
    proc = _cli("run", str(photo), "--prompt", "x", "--segmenter", "magic", home=tmp_path)
    assert proc.returncode == 2 and "choose auto, lite or sam3" in proc.stderr


def test_bad_export_options_exit_2_naming_the_option(tmp_path):
    photo = tmp_path / "a.png"
    photo.write_bytes(encode(object_photo()[0]))
    for option, value in (("--instances", "first"), ("--profile", "print"), ("--export", "glb,fbx")):
        proc = _cli("run", str(photo), "--prompt", "x", option, value, home=tmp_path)
        assert proc.returncode == 2, (option, proc.stderr)
        assert option in proc.stderr


def test_missing_file_exits_1_naming_it(tmp_path):
    proc = _cli("run", str(tmp_path / "nope.jpg"), "--prompt", "x", home=tmp_path)
    assert proc.returncode == 1
    assert "nope.jpg: no such file" in proc.stderr


@pytest.mark.slow
def test_run_prints_the_prefix_and_summary(tmp_path):
    photo = tmp_path / "red ellipse.jpg"
    photo.write_bytes(encode(object_photo(600, 400)[0], "JPEG", quality=92))
    proc = _cli("run", str(photo), "--prompt", "red ellipse", "--out", str(tmp_path / "out"), home=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-3].startswith("output: ")
    prefix = Path(lines[-3].removeprefix("output: "))
    assert prefix.parent == (tmp_path / "out").resolve()
    assert lines[-2].startswith("completed: 1 instance(s)") and "segmenter=lite reconstructor=lite" in lines[-2]
    assert lines[-1].startswith("object 0: 100,000 triangles (web), object.glb ") and "object.usdz" in lines[-1]
    result = json.loads((prefix / "result.json").read_text())
    assert result["status"] == "completed" and (prefix / "object.glb").stat().st_size > 10_000
    assert "Finished in state Completed" in proc.stderr  # Prefect progress is shown


@pytest.mark.slow
def test_no_object_exits_3_and_corrupt_image_exits_1(tmp_path):
    blank = tmp_path / "blank.png"
    blank.write_bytes(encode(uniform_photo()))
    proc = _cli("run", str(blank), "--prompt", "chair", "--out", str(tmp_path / "out"), home=tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("no_object: nothing found for prompt 'chair'")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    proc = _cli("run", str(bad), "--prompt", "chair", "--out", str(tmp_path / "out"), home=tmp_path)
    assert proc.returncode == 1
    assert "bad.png: not a recognised image" in proc.stderr


@pytest.mark.slow
def test_local_api_that_does_not_start_is_a_clear_error(tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(uniform_photo()))
    proc = _cli("run", str(photo), "--prompt", "chair", "--out", str(tmp_path / "out"), home=tmp_path,
                PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")  # no server starts in 0 s
    assert proc.returncode == 1
    assert "photo.png: Prefect's local API server did not start" in proc.stderr
    assert "PREFECT_API_URL" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.slow
def test_catalog_with_a_local_api_that_does_not_start_is_a_clear_error(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "photo.png").write_bytes(encode(uniform_photo()))
    proc = _cli("catalog", str(photos), "--prompt", "chair", "--out", str(tmp_path / "out"), home=tmp_path,
                PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    assert proc.returncode == 1
    assert "Prefect's local API server did not start" in proc.stderr and str(photos) in proc.stderr
    assert "PREFECT_API_URL" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_command_line_imports_flows_and_tasks_from_the_project_folder(tmp_path):
    """flows/ and tasks/ are not installed with the package: the command line puts the project folder
    (SAM3D_PROJECT_DIR, else the checkout above the package) first on the import path."""
    root = Path(__file__).resolve().parents[1]
    for name in ("flows", "tasks"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    code = "import sam3d_pipeline.cli, flows, tasks; print(flows.__file__); print(tasks.__file__)"
    env = {**os.environ, "PYTHONPATH": str(root)}
    chosen = subprocess.run([sys.executable, "-c", code], cwd=tmp_path.parent, capture_output=True, text=True,
                            timeout=120, env=env | {"SAM3D_PROJECT_DIR": str(tmp_path)})
    assert chosen.stdout.split() == [str(tmp_path / "flows" / "__init__.py"), str(tmp_path / "tasks" / "__init__.py")]
    env.pop("SAM3D_PROJECT_DIR", None)
    checkout = subprocess.run([sys.executable, "-c", code], cwd=tmp_path.parent, capture_output=True, text=True,
                              timeout=120, env=env)
    assert checkout.stdout.split() == [str(root / "flows" / "__init__.py"), str(root / "tasks" / "__init__.py")]


def test_a_project_folder_without_flows_changes_nothing(tmp_path, monkeypatch):
    from sam3d_pipeline import project

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("SAM3D_PROJECT_DIR", str(tmp_path))  # an installed wheel with no project folder at hand
    before = list(sys.path)
    assert project.put_on_path() is None and sys.path == before
