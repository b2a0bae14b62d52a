"""The catalog-batch flow under a Prefect test server: a 30-item manifest, re-runs, a SIGKILL half-way, the gallery.

The gallery is opened in Debian's headless Chromium (driven by Playwright's Python package, never a
downloaded browser) over a local HTTP server, because browsers refuse modules and GLB fetches from file://.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from sam3d_pipeline.backends.lite_reconstructor import LiteReconstructor
from sam3d_pipeline.backends.lite_segmenter import LiteSegmenter

from .photos import encode, object_photo, uniform_photo
from .servers import free_port, wait_for_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
GOOD = 22
FAILED_IDS = {"empty", "truncated", "text", "gone", "box-outside", "line-31"}
NO_OBJECT_IDS = {"blank", "nothing-matches"}


def write_catalog(folder: Path, good: int = GOOD, with_bad: bool = True) -> Path:
    """Photos (160x120) and a CSV manifest: ``good`` photos with an object, plus every kind of bad item."""
    photos = folder / "photos"
    photos.mkdir(parents=True)
    lines = ["image,prompt,box,points,id"]
    for i in range(good):
        (photos / f"item{i:02d}.png").write_bytes(encode(object_photo(160, 120, seed=i)[0]))
        box = '"15,10,150,110"' if i % 5 == 1 else ""
        points = '"80,60"' if i % 5 == 2 else ""
        lines.append(f"photos/item{i:02d}.png,product {i},{box},{points},good{i:02d}")
    if with_bad:
        (photos / "empty.png").write_bytes(b"")
        (photos / "truncated.png").write_bytes(encode(object_photo(160, 120, seed=99)[0])[:300])
        (photos / "text.png").write_text("this is not an image\n")
        (photos / "blank.png").write_bytes(encode(uniform_photo(160, 120, 128)))
        (photos / "sky.png").write_bytes(encode(uniform_photo(160, 120, 200)))
        (photos / "edge.png").write_bytes(encode(object_photo(160, 120, seed=7)[0]))
        lines += [
            "photos/empty.png,cup,,,empty",
            "photos/truncated.png,cup,,,truncated",
            "photos/text.png,cup,,,text",
            "photos/missing.png,cup,,,gone",
            "photos/blank.png,chair,,,blank",  # a missing object
            "photos/sky.png,unicorn,,,nothing-matches",  # a prompt that matches nothing in the photo
            'photos/edge.png,cup,"400,300,500,400",,box-outside',
            "photos/item00.png,cup,not-a-box,,",  # a bad manifest row (line 31)
        ]
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


class BackendSpy:
    """Counts calls into the real lite backends and the most that ran at once (the methods still run)."""

    def __init__(self, monkeypatch):
        self.calls = {"segment": 0, "reconstruct": 0}
        self.active = self.max_active = 0
        self._lock = threading.Lock()
        for cls, method in ((LiteSegmenter, "segment"), (LiteReconstructor, "reconstruct")):
            monkeypatch.setattr(cls, method, self._wrap(method, getattr(cls, method)))

    def _wrap(self, name, real):
        def spy(backend, *args, **kwargs):
            with self._lock:
                self.calls[name] += 1
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            try:
                return real(backend, *args, **kwargs)
            finally:
                with self._lock:
                    self.active -= 1
        return spy


def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One catalog run over the 30-item manifest (shared by the tests below; none of them changes its inputs)."""
    from flows.catalog_batch import catalog_batch

    folder = tmp_path_factory.mktemp("catalog")
    manifest = write_catalog(folder)
    mp = pytest.MonkeyPatch()
    spy = BackendSpy(mp)
    limit = f"gpu-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    try:
        state = catalog_batch(source=str(manifest), output_root=str(folder / "out"), concurrency=2, batch_size=8,
                              gpu_limit=limit, segmenter="lite", reconstructor="lite", return_state=True)
    finally:
        mp.undo()
    return {"folder": folder, "manifest": manifest, "state": state, "spy": spy, "limit": limit,
            "wall_s": time.perf_counter() - started}


def test_every_good_item_completes_exactly_once(first_run):
    state, spy, out = first_run["state"], first_run["spy"], first_run["folder"] / "out"
    # Failed items fail the run (what a schedule shows); the outcome is its data, catalog.json is written.
    assert state.is_failed() and "6 of 30 item(s) failed" in state.message, state.message
    outcome = state.result(raise_on_failure=False)
    items = {it["id"]: it for it in outcome["items"]}
    assert len(items) == 30
    assert outcome["counts"] == {"completed": GOOD, "skipped": 0, "no_object": 2, "failed": 6, "duplicate": 0}
    assert not outcome["all_succeeded"]
    run_id = str(state.state_details.flow_run_id)
    good = [items[f"good{i:02d}"] for i in range(GOOD)]
    assert all(it["status"] == "completed" for it in good)
    # Exactly once: one reconstruction per good item, one prefix each, this run's id in each result.json.
    assert spy.calls == {"segment": GOOD + 2, "reconstruct": GOOD}
    assert len({it["prefix"] for it in good}) == GOOD
    for it in good:
        result = json.loads((out / it["prefix"] / "result.json").read_text())
        assert result["status"] == "completed" and result["flow_run_id"] == run_id
        assert result["reconstructor"]["name"] == "lite" and result["segmenter"]["name"] == "lite"
        assert {"object.glb", "overlay.png", "mask.png", "preview.png"} <= set(it["files"])
        assert it["score"] is not None and it["timings_s"]["reconstruct"] > 0
    # Grouped into GPU batches of up to 8, and the one-slot GPU limit kept model calls one at a time.
    assert sorted({it["gpu_batch"] for it in good}) == [0, 1, 2]
    assert spy.max_active == 1
    assert {items[k]["status"] for k in NO_OBJECT_IDS} == {"no_object"}
    assert all("overlay.png" in items[k]["files"] for k in NO_OBJECT_IDS)


def test_bad_items_are_reported_with_reasons(first_run):
    out = first_run["folder"] / "out"
    index = json.loads((out / "catalog.json").read_text())
    items = {it["id"]: it for it in index["items"]}
    failed = {k for k, it in items.items() if it["status"] == "failed"}
    assert failed == FAILED_IDS
    assert "file is empty" in items["empty"]["error"]["message"]
    assert "truncated" in items["truncated"]["error"]["message"]
    assert "not a recognised image" in items["text"]["error"]["message"]
    assert "no such file" in items["gone"]["error"]["message"] and items["gone"]["prefix"] == ""
    assert "lies outside the 160x120 image" in items["box-outside"]["error"]["message"]
    assert "manifest.csv line 31" in items["line-31"]["error"]["message"]
    for key in ("empty", "truncated", "text", "box-outside"):  # prefix known: a failed result.json there
        assert json.loads((out / items[key]["prefix"] / "result.json").read_text())["status"] == "failed"
    # Artifacts: progress at 100 %, and a table of the failures with reasons.
    arts = {a.key: a for a in _artifacts(first_run["state"].state_details.flow_run_id) if a.key}
    assert float(arts["catalog-progress"].data) == 100.0
    table = arts["catalog-failures"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert {row["id"] for row in table} == FAILED_IDS and all(row["reason"] for row in table)
    # The global concurrency limit was created (a missing limit would be skipped silently).
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(first_run["limit"]).limit == 1


def test_rerun_does_no_model_work(first_run, monkeypatch):
    from flows.catalog_batch import catalog_batch

    folder, out = first_run["folder"], first_run["folder"] / "out"
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/object.glb")}
    spy = BackendSpy(monkeypatch)
    state = catalog_batch(source=str(first_run["manifest"]), output_root=str(out), concurrency=2, batch_size=8,
                          gpu_limit=first_run["limit"], segmenter="lite", reconstructor="lite", return_state=True)
    assert state.is_failed() and "6 of 30 item(s) failed" in state.message, state.message  # still failing
    outcome = state.result(raise_on_failure=False)
    assert spy.calls == {"segment": 0, "reconstruct": 0}
    assert outcome["counts"] == {"completed": 0, "skipped": GOOD + 2, "no_object": 0, "failed": 6, "duplicate": 0}
    items = {it["id"]: it for it in outcome["items"]}
    assert {items[k]["result_status"] for k in NO_OBJECT_IDS} == {"no_object"}
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/object.glb")} == before
    assert len(before) == GOOD
    assert folder.joinpath("out", "catalog.json").is_file()


def test_a_gpu_batch_task_skips_an_item_finished_after_planning_before_any_model_work(tmp_path, monkeypatch):
    """The batch task re-checks the output prefix before the GPU slot: a result another run published between
    planning and the batch is reported as skipped, and neither a slot (no limit of that name exists) nor a model
    is used for it."""
    from prefect import flow

    from sam3d_pipeline import catalog
    from sam3d_pipeline.settings import Settings
    from sam3d_pipeline.storage import LocalStorage
    from tasks.catalog import process_gpu_batch

    (tmp_path / "a.png").write_bytes(encode(object_photo(96, 72)[0]))
    rows = catalog.parse_manifest("image,prompt,id\na.png,cup,a\n", fmt="csv", source="m.csv", base=str(tmp_path))
    out, item = tmp_path / "out", rows[0].item
    work = catalog.plan_item(item, item.options(segmenter="lite", reconstructor="lite"), LocalStorage(out))
    assert isinstance(work, catalog.ItemWork)  # nothing finished at planning time
    catalog.run_catalog_plain(rows, LocalStorage(out), batch_size=1, segmenter="lite", reconstructor="lite")
    spy = BackendSpy(monkeypatch)

    @flow
    def one_batch() -> list:
        return process_gpu_batch([work], 0, f"no-such-limit-{uuid.uuid4().hex[:8]}", str(out),
                                 Settings(gpu_stages="inline"), None)

    (entry,) = one_batch()
    assert entry.status == "skipped" and entry.result_status == "completed"
    assert spy.calls == {"segment": 0, "reconstruct": 0}


def _api_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONUNBUFFERED="1")
    return env


def _catalog_cmd(manifest: Path, out: Path, limit: str) -> list[str]:
    return [sys.executable, "-m", "sam3d_pipeline.cli", "catalog", str(manifest), "--out", str(out),
            "--concurrency", "1", "--batch-size", "2", "--gpu-limit", limit, "--gpu-slots", "1",
            "--segmenter", "lite", "--reconstructor", "lite"]


def _completed(out: Path) -> dict[str, dict]:
    done = {}
    for path in out.glob("*/result.json"):
        result = json.loads(path.read_text())
        if result["status"] == "completed":
            done[path.parent.name] = result
    return done


def test_killed_half_way_then_rerun_completes_the_rest(tmp_path):
    good = 12
    manifest = write_catalog(tmp_path, good=good, with_bad=False)
    out = tmp_path / "out"
    limit = f"gpu-{uuid.uuid4().hex[:8]}"
    log = (tmp_path / "first.log").open("wb")
    proc = subprocess.Popen(_catalog_cmd(manifest, out, limit), cwd=REPO, env=_api_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and len(_completed(out)) < 4:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {(tmp_path / 'first.log').read_text()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    survived = _completed(out)
    assert 4 <= len(survived) < good
    checkpoint = json.loads((out / "catalog.json").read_text())  # the kill leaves a readable index ...
    assert checkpoint["complete"] is False and checkpoint["finished_at"] is None and checkpoint["total"] == good
    done_then = {it["prefix"] for it in checkpoint["items"] if it["status"] == "completed"}
    assert done_then <= set(survived)  # ... of work that really finished

    second = subprocess.run(_catalog_cmd(manifest, out, limit), cwd=REPO, env=_api_env(), capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    summary = [line for line in second.stdout.splitlines() if line.startswith("catalog: ") and "item(s)" in line]
    assert summary and (f"{good} item(s): {good - len(survived)} completed, {len(survived)} skipped, "
                        "0 no_object, 0 failed") in summary[0]
    finished = _completed(out)
    assert len(finished) == good
    for prefix, result in survived.items():  # finished before the kill: kept, not redone
        assert finished[prefix]["flow_run_id"] == result["flow_run_id"]
    index = json.loads((out / "catalog.json").read_text())
    assert index["complete"] is True and index["finished_at"]
    assert sorted(it["status"] for it in index["items"]) == sorted(
        ["completed"] * (good - len(survived)) + ["skipped"] * len(survived))


@pytest.fixture
def http_root(first_run):
    """The first run's output root served over HTTP by a child process (stopped by PID)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(first_run["folder"] / "out")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


GLB_CHECK = """async () => {
  const out = [];
  for (const item of window.sam3dGallery.items.filter((it) => it.files.includes('object.glb'))) {
    const response = await fetch(`${item.prefix}/object.glb`);
    const buffer = await response.arrayBuffer();
    const view = new DataView(buffer);
    const magic = String.fromCharCode(...new Uint8Array(buffer, 0, 4));
    const jsonLength = view.getUint32(12, true);
    const gltf = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 20, jsonLength)));
    out.push({id: item.id, status: response.status, magic, version: view.getUint32(4, true),
              length: view.getUint32(8, true), bytes: buffer.byteLength, meshes: (gltf.meshes || []).length});
  }
  return out;
}"""


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is installed by `make test`")
def test_gallery_lists_items_and_its_glbs_load_in_chromium(first_run, http_root):
    from playwright.sync_api import sync_playwright

    index = json.loads((first_run["folder"] / "out" / "catalog.json").read_text())
    with_glb = [it["id"] for it in index["items"] if "object.glb" in it["files"]]
    assert len(with_glb) == GOOD
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{http_root}/index.html")
            page.wait_for_function("customElements.get('model-viewer') !== undefined", timeout=60_000)
            cards = page.eval_on_selector_all(".card", "cs => cs.map(c => [c.dataset.id, c.dataset.status])")
            assert sorted(c[0] for c in cards) == sorted(it["id"] for it in index["items"])
            assert dict(cards)["box-outside"] == "failed"
            assert "lies outside" in page.inner_text(".card[data-id='box-outside']")
            overlays = page.eval_on_selector_all(".card img", "imgs => imgs.map(i => i.complete || i.loading)")
            assert len(overlays) == GOOD + 2  # completed and no-object items have overlays; failures do not
            # Every GLB is served and parses as binary glTF 2.0 with a mesh.
            glbs = page.evaluate(GLB_CHECK)
            assert sorted(g["id"] for g in glbs) == sorted(with_glb)
            for g in glbs:
                assert (g["status"], g["magic"], g["version"], g["length"]) == (200, "glTF", 2, g["bytes"]), g
                assert g["meshes"] >= 1
            # The 3D viewer opens GLBs: model-viewer fires `load` (each takes seconds on a CPU renderer).
            for item_id in with_glb[:3]:
                page.click(f"button[data-open='{item_id}']")
                event = page.evaluate("window.sam3dGallery.lastOpen")
                assert event["event"] == "load" and event["id"] == item_id, event
                page.click("#viewer-close")
            assert not errors, errors
        finally:
            browser.close()


def test_catalog_command_exit_codes_and_summary_line(tmp_path):
    from typer.testing import CliRunner

    from sam3d_pipeline.cli.main import app

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "good.png").write_bytes(encode(object_photo(160, 120, seed=3)[0]))
    (photos / "blank.png").write_bytes(encode(uniform_photo(160, 120)))
    (photos / "bad.png").write_bytes(b"GIF89a broken")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "photos/good.png", "prompt": "cup"}\n{"image": "photos/blank.png"}\n'
                        '{"image": "photos/bad.png", "prompt": "cup"}\n')
    args = ["catalog", str(manifest), "--out", str(tmp_path / "out"), "--prompt", "thing", "--segmenter", "lite",
            "--reconstructor", "lite", "--gpu-limit", f"gpu-{uuid.uuid4().hex[:8]}"]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 1, first.output
    assert "catalog: 3 item(s): 1 completed, 0 skipped, 1 no_object, 1 failed" in first.output
    assert "failed: bad (line 3): " in first.output and "bad.png" in first.output
    manifest.write_text('{"image": "photos/good.png", "prompt": "cup"}\n{"image": "photos/blank.png"}\n')
    second = runner.invoke(app, args)
    assert second.exit_code == 3, second.output  # nothing failed, but one item has no object
    assert "catalog: 2 item(s): 0 completed, 2 skipped, 0 no_object, 0 failed" in second.output
    manifest.write_text('{"image": "photos/good.png", "prompt": "cup"}\n')
    assert runner.invoke(app, args).exit_code == 0
