"""How the command line fails: bad usage exits 2 in well under a second, expected input errors print one line
naming the input (tracebacks only with ``--debug``), text from users prints literally, and a killed command
leaves no process behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sam3d_pipeline.samples import sample_path
from sam3d_pipeline.types import PROMPT_MAX_CHARS

from .photos import encode, object_photo

LITE = ("--segmenter", "lite", "--reconstructor", "lite")


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = os.environ | {"PREFECT_HOME": str(home / "prefect-home")} | extra
    env.pop("PREFECT_API_URL", None)
    return env


def _cli(*args: str, home: Path, prelude: str = "", timeout: int = 300, **extra_env: str):
    """Run the command as a user does; ``prelude`` runs first in the same interpreter (to hide a package)."""
    code = f"{prelude}\nfrom sam3d_pipeline.cli.main import main\nmain()"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=_env(home, **extra_env), timeout=timeout, cwd=home)
    return proc, time.perf_counter() - started


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(encode(object_photo()[0]))
    return path


# --- bad usage: exit 2, before Prefect starts ----------------------------------------------------------------------

def _usage_cases(tmp_path: Path, photo: Path) -> list[tuple[str, list[str], str]]:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    long_prompt = "x" * (PROMPT_MAX_CHARS + 1)
    run = ["run", str(photo), *LITE]
    return [
        ("empty prompt", [*run, "--prompt", ""], "--prompt"),
        ("blank prompt", [*run, "--prompt", "   "], "--prompt"),
        ("over-long prompt", [*run, "--prompt", long_prompt], f"at most {PROMPT_MAX_CHARS} characters"),
        ("--out a file", [*run, "--prompt", "x", "--out", str(afile)], "is a file, not a directory"),
        ("--out under a file", [*run, "--prompt", "x", "--out", str(afile / "sub")], "which is a file"),
        ("infinite box", [*run, "--prompt", "x", "--box", "0,0,inf,9"], "finite"),
        ("nan point", [*run, "--prompt", "x", "--point", "nan,1"], "finite"),
        ("catalog: missing source", ["catalog", str(tmp_path / "nope"), "--prompt", "x", *LITE],
         "no such manifest or folder"),
        ("catalog: --out a file", ["catalog", str(tmp_path), "--prompt", "x", "--out", str(afile), *LITE],
         "is a file, not a directory"),
        ("catalog: blank prompt", ["catalog", str(tmp_path), "--prompt", " ", *LITE], "--prompt"),
        ("catalog: over-long prompt", ["catalog", str(tmp_path), "--prompt", long_prompt, *LITE],
         f"at most {PROMPT_MAX_CHARS} characters"),
    ]


def test_bad_usage_exits_2_in_well_under_two_seconds(tmp_path, photo):
    for name, args, expected in _usage_cases(tmp_path, photo):
        proc, elapsed = _cli(*args, home=tmp_path, timeout=60)
        assert proc.returncode == 2, (name, proc.returncode, proc.stderr[-2000:])
        assert expected in proc.stderr, (name, proc.stderr)
        assert "Traceback" not in proc.stderr, name
        assert elapsed < 2.0, (name, elapsed)
    assert not (tmp_path / "prefect-home").exists()  # Prefect never started


# --- user text prints literally -------------------------------------------------------------------------------------

def test_missing_photo_with_brackets_in_its_name_is_named_literally(tmp_path):
    (tmp_path / "shelf[bold]").mkdir()
    proc, _ = _cli("run", "shelf[bold]/chair[red].png", "--prompt", "x", *LITE, home=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: shelf[bold]/chair[red].png: no such file"


# sam3 and torch look uninstalled to the backend registry and to doctor (find_spec sees None in sys.modules).
HIDE_SAM3 = "import sys; sys.modules['sam3'] = None; sys.modules['torch'] = None"


@pytest.mark.slow
def test_paths_prompts_and_install_hints_print_literally(tmp_path):
    (tmp_path / "shelf[bold]").mkdir()
    shutil.copy(sample_path("coffee"), tmp_path / "shelf[bold]" / "chair[red].png")
    proc, _ = _cli("run", "shelf[bold]/chair[red].png", "--prompt", "cup [white]", "--segmenter", "sam3",
                   "--reconstructor", "lite", "--out", str(tmp_path / "out"), home=tmp_path, prelude=HIDE_SAM3)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "image-to-3d shelf[bold]/chair[red].png prompt='cup [white]'" in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, proc.stderr[-3000:]
    assert error[0].startswith("error: shelf[bold]/chair[red].png: segmenter 'sam3' cannot run here: package ")
    assert error[0].endswith(" is not installed (pip install 'sam3d-pipeline[sam3]')"), error
    assert "Traceback" not in proc.stderr
    doctor, _ = _cli("doctor", home=tmp_path, prelude=HIDE_SAM3)
    assert "fix: pip install 'sam3d-pipeline[sam3]'" in doctor.stdout, doctor.stdout


# --- expected input errors: one line, no traceback; --debug shows everything -----------------------------------------

def _reason_lines(stderr: str, reason: str) -> list[str]:
    return [line for line in stderr.splitlines() if reason in line]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["invalid image", "image too large"])
def test_an_expected_input_error_is_one_line_naming_the_input(tmp_path, case):
    bad = tmp_path / "bad.png"
    if case == "invalid image":
        bad.write_bytes(b"not an image at all")
        env, reason = {}, "bad.png: not a recognised image format"
    else:
        bad.write_bytes(encode(object_photo()[0]))
        env, reason = {"SAM3D_MAX_PIXELS": "1000"}, "exceeds the limit of 1,000"
    proc, _ = _cli("run", str(bad), "--prompt", "chair", *LITE, "--out", str(tmp_path / "out"), home=tmp_path, **env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = _reason_lines(proc.stderr, reason)
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], proc.stderr
    assert "Beginning flow run" in proc.stderr  # progress is still shown


@pytest.mark.slow
def test_debug_restores_tracebacks_and_prefect_failure_logs(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    proc, _ = _cli("--debug", "run", str(bad), "--prompt", "chair", *LITE, "--out", str(tmp_path / "out"),
                   home=tmp_path)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr  # the flow run's (decoding is a step of the flow)
    assert "Finished in state Failed" in proc.stderr
    assert f"error: {bad}: not a recognised image format" in proc.stderr.splitlines()[-2]


@pytest.mark.slow
def test_a_bad_manifest_is_one_line_naming_it(tmp_path):
    manifest = tmp_path / "photos.csv"
    manifest.write_text("foo,bar\n1,2\n")
    proc, _ = _cli("catalog", str(manifest), *LITE, "--out", str(tmp_path / "out"), home=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = _reason_lines(proc.stderr, "header row")
    assert len(lines) == 1 and lines[0].startswith("error: ") and "photos.csv" in lines[0], proc.stderr


# --- kill -9 leaves nothing behind ------------------------------------------------------------------------------------

def _processes() -> dict[int, tuple[int, str, str]]:
    """pid → (parent pid, start time, state) from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text(errors="replace")
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            table[int(entry)] = (int(fields[1]), fields[19], fields[0])
    return table


def _tree(root: int) -> dict[tuple[int, str], str]:
    """(pid, start time) → command line of every live descendant of ``root``."""
    table = _processes()
    found, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, start, state) in table.items():
            if ppid == parent and state not in ("Z", "X"):
                try:
                    found[(pid, start)] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                todo.append(pid)
    return found


def _alive(identities) -> set[tuple[int, str]]:
    table = _processes()
    return {(pid, start) for pid, start in identities
            if pid in table and table[pid][1] == start and table[pid][2] not in ("Z", "X")}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process tree from /proc")
@pytest.mark.parametrize(("command", "sig"), [("run", signal.SIGKILL), ("catalog", signal.SIGKILL),
                                              ("run", signal.SIGTERM)])
def test_a_killed_command_leaves_no_process_behind(tmp_path, command, sig):
    """Killed the moment Prefect's API server process appears (before anything could have noticed it)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sample_path("coffee"), photos / "coffee.png")
    target = [str(photos / "coffee.png")] if command == "run" else [str(photos)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sam3d_pipeline.cli", command, *target, "--prompt", "coffee cup", *LITE,
         "--out", str(tmp_path / "out")],
        env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    tree: dict[tuple[int, str], str] = {}
    try:
        deadline = time.monotonic() + 120
        while not any("uvicorn" in cmd and "prefect.server" in cmd for cmd in tree.values()):
            assert proc.poll() is None and time.monotonic() < deadline, "the API server never started"
            tree |= _tree(proc.pid)
            time.sleep(0.02)
        proc.send_signal(sig)
        proc.wait()
        killed = time.monotonic()
        while (left := _alive(tree)) and time.monotonic() - killed < 15:
            time.sleep(0.05)
        gone_s = time.monotonic() - killed
        assert not left, f"still running {gone_s:.1f} s after {sig.name}: {[tree[i][:120] for i in left]}"
        assert gone_s < 6, gone_s
        print(f"{command}: {len(tree)} descendant(s) gone {gone_s:.2f} s after {sig.name}")
    finally:
        proc.kill()
        for pid, _ in _alive(tree):  # only processes this test started
            os.kill(pid, signal.SIGKILL)
