"""Warm GPU workers: the pure decisions, the storage-keyed GPU batch, and real worker sessions (subprocesses
running ``sam3d-pipeline gpu-worker``) serving ``image-to-3d`` and ``catalog-batch`` against the session's
Prefect test server: models stay loaded, a killed worker's task is run again, an idle worker exits."""

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

import numpy as np
import pytest
from PIL import Image

from sam3d_pipeline import backends
from sam3d_pipeline.gpu.stages import (
    GpuBatch,
    ReconstructJobParam,
    SegmentJob,
    SegmentParams,
    TrackJob,
    batch_stages,
    load_track,
    merge_results,
    reconstruct_part,
    run_gpu_batch,
    segment_part,
)
from sam3d_pipeline.gpu.workers import (
    IdleClock,
    Lease,
    SessionLedger,
    lease_verdict,
    served_tasks,
    sessions_to_start,
    stage_deployment,
    task_kind,
)
from sam3d_pipeline.keys import RunKeys
from sam3d_pipeline.masks import iou
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.video import load_video, sampling

from .clips import audio_only, moving_object
from .clips import encode as encode_clip
from .doubles import DOUBLE_DIR, double_config
from .photos import encode, object_photo, three_objects_photo

ROOT = Path(__file__).resolve().parents[1]


# -- the decisions, without Prefect ----------------------------------------------------------------------------
def _lease(heartbeat_at: float) -> Lease:
    return Lease(task_run_id="t", session="s", started_at=0.0, heartbeat_at=heartbeat_at)


def test_lease_verdicts():
    assert lease_verdict(None, now=100.0, lease_s=10) == "queued"
    assert lease_verdict(_lease(95.0), now=100.0, lease_s=10) == "running"
    assert lease_verdict(_lease(85.0), now=100.0, lease_s=10) == "lost"  # stopped renewing
    assert lease_verdict(_lease(99.0), now=100.0, lease_s=10, session_ended=True) == "lost"  # its process is gone


def test_sessions_to_start_follows_the_queue_within_the_maximum():
    assert sessions_to_start(queued=0, active=0, max_workers=5) == 0
    assert sessions_to_start(queued=1, active=0, max_workers=5) == 1
    assert sessions_to_start(queued=8, active=1, max_workers=5) == 4
    assert sessions_to_start(queued=3, active=5, max_workers=5) == 0
    assert sessions_to_start(queued=2, active=7, max_workers=5) == 0


def test_idle_clock_and_ledger():
    now = [0.0]
    clock = IdleClock(10.0, clock=lambda: now[0])
    now[0] = 9.0
    assert not clock.tick(busy=False)
    assert not clock.tick(busy=True)  # busy resets the clock
    now[0] = 18.0
    assert not clock.tick(busy=False)
    now[0] = 19.5
    assert clock.tick(busy=False)
    ledger = SessionLedger("s1")
    ledger.record(task_run_id="a", work="segment", status="completed",
                  timing={"segment": {"model_load_s": 2.5, "run_s": 1.0}})
    ledger.record(task_run_id="b", work="segment", status="completed",
                  timing={"segment": {"model_load_s": 0.0, "run_s": 1.0}})
    assert ledger.summary() == {"session": "s1", "tasks": 2, "failed": 0,
                                "model_loads": {"segment": 1, "reconstruct": 0}}


# -- the GPU batch itself (storage keys in, storage keys out) ---------------------------------------------------
def test_gpu_batch_segments_selects_and_reconstructs_each_photo(tmp_path):
    out = tmp_path / "out"
    jobs = []
    truths = {}
    for seed in (1, 2):
        rgb, truth = object_photo(seed=seed)
        photo = tmp_path / f"p{seed}.png"
        photo.write_bytes(encode(rgb))
        truths[f"p{seed}-x"] = truth
        jobs.append(SegmentJob(image=str(photo), prefix=f"p{seed}-x", params=SegmentParams(prompt="thing")))
    jobs.append(SegmentJob(image=str(tmp_path / "missing.png"), prefix="missing-x", params=SegmentParams(prompt="x")))
    result = run_gpu_batch(GpuBatch(output_root=str(out), segment=jobs, reconstruct_selected=True))
    by_prefix = {r["prefix"]: r for r in result["segment"]}
    assert by_prefix["missing-x"]["error"]["code"] == "input_not_found"  # one bad photo fails only itself
    for prefix, truth in truths.items():
        assert by_prefix[prefix]["selected"] == 0
        mask = np.asarray(Image.open(out / RunKeys(prefix).stage_mask(0))) > 127
        assert iou(mask, truth) > 0.9
        summary = json.loads((out / RunKeys(prefix).reconstruct_dir / "reconstruction.json").read_text())
        assert summary["backend"]["name"] == "lite" and summary["stats"]["faces"] > 0
    assert [r["output"] for r in result["reconstruct"]] == [RunKeys(p).reconstruct_dir for p in truths]
    assert set(result["timing"]) == {"segment", "reconstruct"}


def test_which_session_serves_which_stage():
    assert served_tasks("segment") == ("segment",) and served_tasks("reconstruct") == ("reconstruct",)
    assert served_tasks("all") == ("segment", "reconstruct", "all")
    with pytest.raises(ValueError, match="segment, reconstruct, all"):
        served_tasks("both")
    both = {"worker_deployment": "gpu-worker/gpu-worker"}
    two = both | {"segment_deployment": "gpu-worker/gpu-worker-sam3",
                  "reconstruct_deployment": "gpu-worker/gpu-worker-sam3d"}
    assert {stage_deployment(s, **both) for s in ("segment", "reconstruct", "all")} == {"gpu-worker/gpu-worker"}
    assert stage_deployment("segment", **two) == "gpu-worker/gpu-worker-sam3"
    assert stage_deployment("reconstruct", **two) == "gpu-worker/gpu-worker-sam3d"
    assert stage_deployment("reconstruct", **both, segment_deployment="s", reconstruct_deployment="") == \
        "gpu-worker/gpu-worker"  # an empty setting is the default
    assert task_kind(("segment",), same_deployment=False) == "segment"
    assert task_kind(("reconstruct",), same_deployment=True) == "reconstruct"
    assert task_kind(("segment", "reconstruct"), same_deployment=True) == "all"
    assert task_kind(("segment", "reconstruct"), same_deployment=False) is None  # split


def test_a_catalog_batch_split_in_two_gives_what_one_batch_gives(tmp_path):
    """Segment on one worker, reconstruct on another: the halves write the same files and merge into the result
    shape of the combined batch (what ``catalog.apply_gpu_result`` reads)."""
    jobs = []
    for seed in (1, 2):
        photo = tmp_path / f"p{seed}.png"
        photo.write_bytes(encode(object_photo(seed=seed)[0]))
        jobs.append(SegmentJob(image=str(photo), prefix=f"p{seed}-x", seed=seed, params=SegmentParams(prompt="thing")))
    jobs.append(SegmentJob(image=str(tmp_path / "missing.png"), prefix="missing-x", params=SegmentParams(prompt="x")))
    blank = tmp_path / "blank.png"
    blank.write_bytes(encode(np.full((120, 160, 3), 127, np.uint8)))
    jobs.append(SegmentJob(image=str(blank), prefix="blank-x", params=SegmentParams(prompt="x")))
    batch = GpuBatch(output_root=str(tmp_path / "one"), segment=jobs, reconstruct_selected=True)
    assert batch_stages(batch) == ("segment", "reconstruct")
    combined = run_gpu_batch(batch)

    split = batch.model_copy(update={"output_root": str(tmp_path / "two")})
    first = segment_part(split)
    assert batch_stages(first) == ("segment",) and first.segment == split.segment
    segmented = run_gpu_batch(first)
    assert segmented["reconstruct"] == [] and set(segmented["timing"]) == {"segment"}
    second = reconstruct_part(split, segmented)
    assert batch_stages(second) == ("reconstruct",) and second.output_root == split.output_root
    by_prefix = {r["prefix"]: r for r in segmented["segment"]}
    assert [(j.mask, j.output, j.seed) for j in second.reconstruct] == [
        (RunKeys(p).stage_mask(by_prefix[p]["selected"]), RunKeys(p).reconstruct_dir, seed)
        for p, seed in (("p1-x", 1), ("p2-x", 2))]  # the missing photo and the empty one are left out
    merged = merge_results(segmented, run_gpu_batch(second))

    assert set(merged) == {"segment", "reconstruct", "timing"} and set(merged["timing"]) == {"segment", "reconstruct"}

    def comparable(result):
        return ([{k: r.get(k) for k in ("prefix", "selected", "error")} for r in result["segment"]],
                [{k: r.get(k) for k in ("output", "outputs", "pose", "error")} for r in result["reconstruct"]])
    assert comparable(merged) == comparable(combined)
    for prefix in ("p1-x", "p2-x"):
        mesh = RunKeys(prefix).reconstruct_dir + "/object.glb"
        assert (tmp_path / "two" / mesh).read_bytes() == (tmp_path / "one" / mesh).read_bytes()
    # Nothing selected anywhere: no reconstruct half at all.
    assert reconstruct_part(split, {"segment": [{"prefix": "p1-x", "selected": None}]}) is None
    assert merge_results(segmented, None)["reconstruct"] == []


def _clip_job(tmp_path: Path, frames: int = 60, name: str = "spin.mp4") -> tuple[TrackJob, object, object]:
    """A clip on disk and the job that tracks it with this process's sampling settings."""

    clip = moving_object(frames)
    path = tmp_path / name
    path.write_bytes(encode_clip(clip.frames, "mp4"))
    settings = Settings(video_stride=2)
    sample = load_video(path.read_bytes(), source=str(path), settings=settings)
    job = TrackJob(video=str(path), sha256=sample.sha256, prefix="spin-x", params=SegmentParams(prompt="red disc"),
                   sampling=sampling(settings), seed=3)
    return job, clip, sample


def test_gpu_batch_tracks_a_clip_by_its_uri_and_reconstructs_its_best_view(tmp_path):
    """The clip goes by URI with the submitter's sampling (every 2nd frame): the worker keeps the same frames,
    writes every frame's mask and score, chooses the best view and reconstructs it; split in two halves the batch
    gives the same jobs; a clip that changed since planning, or a sample this process did not keep, is refused."""
    job, clip, sample = _clip_job(tmp_path)
    out = tmp_path / "out"
    batch = GpuBatch(output_root=str(out), track=[job], reconstruct_selected=True)
    assert batch_stages(batch) == ("segment", "reconstruct") and "track 1 clip(s)" in batch.describe()
    result = run_gpu_batch(batch)
    [row] = result["segment"]
    frames = [f.index for f in sample.frames]
    assert row["video"]["frames"] == frames == list(range(0, 60, 2))  # the submitter's stride, not the worker's
    track = load_track(str(out), "spin-x", frames)
    assert len(track.masks) == 30 and track.backend.name == "lite" and track.scores == row["scores"]
    whole = [iou(track.masks[p], clip.truth[i]) for p, i in enumerate(frames) if clip.whole(i)]
    assert float(np.median(whole)) > 0.75  # the disc, tracked on the frames the submitter keeps
    assert not any(track.masks[p].any() for p, i in enumerate(frames) if clip.absent(i))
    view = row["view"]
    assert row["selected"] == 0 and clip.whole(view["index"]) and frames[view["position"]] == view["index"]
    assert iou(track.masks[view["position"]], clip.truth[view["index"]]) > 0.8
    assert Path(view["image"]) == out / RunKeys("spin-x").track_frame(view["index"])
    assert np.array_equal(np.asarray(Image.open(view["image"])), sample.frames[view["position"]].rgb)
    [recon] = result["reconstruct"]
    assert recon["output"] == RunKeys("spin-x").reconstruct_dir and recon["stats"]["faces"] > 0
    assert set(result["timing"]) == {"segment", "reconstruct"}

    halves = batch.model_copy(update={"output_root": str(tmp_path / "two")})
    segmented = run_gpu_batch(segment_part(halves))
    assert segmented["reconstruct"] == [] and segmented["segment"][0]["view"]["index"] == view["index"]
    [again] = reconstruct_part(halves, segmented).reconstruct
    assert (again.mask, again.output, again.seed) == (view["mask"], recon["output"], 3)

    with pytest.raises(Exception, match="sampled 30 frame"):
        load_track(str(out), "spin-x", frames[:-1])
    (tmp_path / "spin.mp4").write_bytes(encode_clip(clip.frames[:40], "mp4"))
    [changed] = run_gpu_batch(GpuBatch(output_root=str(out), track=[job]))["segment"]
    assert changed["error"]["type"] == "InputError" and "changed since the run was planned" in \
        changed["error"]["message"]
    (tmp_path / "spin.mp4").write_bytes(audio_only())
    [refused] = run_gpu_batch(GpuBatch(output_root=str(out), track=[job]))["segment"]
    assert refused["error"]["code"] == "invalid_video" and "audio only" in refused["error"]["message"]


def test_gpu_batch_reconstructs_every_object_a_row_asks_for_with_one_point_map(tmp_path):
    """instances=all: every object of the photo is reconstructed in the same call under its own folder, all with
    the photo as their point-map identity; in two halves the reconstruct half gets the same jobs."""
    rgb, truths, _ = three_objects_photo()
    photo = tmp_path / "three.png"
    photo.write_bytes(encode(rgb))
    job = SegmentJob(image=str(photo), prefix="three-x", params=SegmentParams(prompt="discs"), instances="all")
    out = tmp_path / "out"
    result = run_gpu_batch(GpuBatch(output_root=str(out), segment=[job], reconstruct_selected=True))
    [row] = result["segment"]
    assert len(row["instances"]) == 3 and row["objects"][0] == row["selected"] and sorted(row["objects"]) == [0, 1, 2]
    keys = RunKeys("three-x")
    assert [r["output"] for r in result["reconstruct"]] == [keys.object_reconstruct_dir(i) for i in row["objects"]]
    for i in row["objects"]:
        assert (out / keys.object_reconstruct_dir(i) / "reconstruction.json").is_file()
    split = GpuBatch(output_root=str(out), segment=[job], reconstruct_selected=True)
    jobs = reconstruct_part(split, run_gpu_batch(segment_part(split))).reconstruct
    assert [(j.mask, j.output) for j in jobs] == [(keys.stage_mask(i), keys.object_reconstruct_dir(i))
                                                  for i in row["objects"]]
    assert {j.photo_id for j in jobs} == {str(photo)}  # one point map for the photo
    bad = job.model_copy(update={"instances": [0, 7]})
    [refused] = run_gpu_batch(GpuBatch(output_root=str(out), segment=[bad], reconstruct_selected=True))["segment"]
    assert "instances [7] out of range: 3 instance(s) found" in refused["error"]["message"]


def test_gpu_batch_refuses_a_mask_of_another_size(tmp_path):
    rgb, _ = object_photo()
    photo = tmp_path / "p.png"
    photo.write_bytes(encode(rgb))
    (tmp_path / "out" / "x").mkdir(parents=True)
    Image.fromarray(np.ones((10, 10), np.uint8) * 255).save(tmp_path / "out" / "x" / "mask.png")
    result = run_gpu_batch(GpuBatch(output_root=str(tmp_path / "out"), reconstruct=[
        ReconstructJobParam(image=str(photo), mask="x/mask.png", output="x/r")]))
    error = result["reconstruct"][0]["error"]
    assert error["type"] == "InputError" and "x/mask.png" in error["message"] and "(10, 10)" in error["message"]


def test_planning_a_sam3_run_needs_no_torch():
    """The orchestrator names a sam3 run's prefix where torch cannot be imported, and it is the same prefix."""
    from sam3d_pipeline.run import pipeline
    from sam3d_pipeline.settings import Settings

    photo = object_photo(seed=4)[0]
    data = encode(photo)
    options = pipeline.RunOptions(prompt="mug", segmenter="sam3", reconstructor="lite",
                                  points=[{"x": 5, "y": 6, "label": 0}])
    with_torch = pipeline.plan("s3://b/mug.png", pipeline.content_id(data), options, "s3://b/out",
                               Settings(sam3_random_init=True, gpu_stages="inline")).prefix
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import flows.image_to_3d\n"
        "from sam3d_pipeline.run import pipeline\n"
        "from sam3d_pipeline.settings import Settings\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('torch imported')\n"
        "data = sys.stdin.buffer.read()\n"
        "options = pipeline.RunOptions(prompt='mug', segmenter='sam3', reconstructor='lite',\n"
        "                              points=[{'x': 5, 'y': 6, 'label': 0}])\n"
        "plan = pipeline.plan('s3://b/mug.png', pipeline.content_id(data), options, 's3://b/out',\n"
        "                     Settings(sam3_random_init=True, gpu_stages='workers'))\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        "print(plan.prefix)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], input=data, capture_output=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().strip().splitlines()[-1] == with_torch


# -- real worker sessions ---------------------------------------------------------------------------------------
class WorkerSession:
    """``sam3d-pipeline gpu-worker`` in its own process against the session's Prefect test server."""

    def __init__(self, tmp_path: Path, idle_s: float = 120, env: dict[str, str] | None = None) -> None:
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        self.log_path = tmp_path / f"gpu-worker-{uuid.uuid4().hex[:6]}.log"
        self.env = os.environ | {
            "PREFECT_API_URL": settings.api.url,
            "PREFECT_LOCAL_STORAGE_PATH": str(settings.results.local_storage_path),
            "PREFECT_LOGGING_LEVEL": "INFO",
            "SAM3D_GPU_LEASE_S": os.environ.get("SAM3D_GPU_LEASE_S", "30"),
            "PYTHONPATH": os.pathsep.join([str(DOUBLE_DIR), str(ROOT)]),
            "SAM3D_SAM3D_CONFIG_PATH": str(double_config(tmp_path / "ckpt")),
        } | (env or {})
        self.env.pop("CONDA_PREFIX", None)
        self.idle_s = idle_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerSession:
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "sam3d_pipeline.cli", "gpu-worker", "--idle-s",
                                      str(self.idle_s)], cwd=ROOT, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while "waiting for gpu-stage tasks" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"GPU worker did not start:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        return self

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def session(self) -> str:
        for line in self.text().splitlines():
            if "GPU worker session " in line and "serving until idle" in line:
                return line.split("GPU worker session ", 1)[1].split(":", 1)[0]
        raise AssertionError(f"no session line in:\n{self.text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture
def workers_mode(prefect_server, monkeypatch):
    monkeypatch.setenv("SAM3D_GPU_STAGES", "workers")
    monkeypatch.setenv("SAM3D_GPU_POLL_S", "0.5")
    monkeypatch.setenv("SAM3D_GPU_STAGE_RETRY_DELAY_S", "0.2")
    monkeypatch.setenv("SAM3D_GPU_STAGE_TIMEOUT_S", "300")


def _photo(tmp_path: Path, name: str, seed: int, size: tuple[int, int] = (160, 120)) -> Path:
    rgb, _ = object_photo(*size, seed=seed)
    path = tmp_path / name
    path.write_bytes(encode(rgb))
    return path


@pytest.mark.slow
def test_image_to_3d_on_a_warm_worker_loads_each_model_once(workers_mode, tmp_path):
    from flows.image_to_3d import image_to_3d

    worker = WorkerSession(tmp_path, idle_s=8).start()
    try:
        results = []
        for i in range(2):
            state = image_to_3d(image=str(_photo(tmp_path, f"cup{i}.png", seed=10 + i)), prompt="cup",
                                output_root=str(tmp_path / "out"), segmenter="lite", reconstructor="lite",
                                return_state=True)
            assert state.is_completed(), state.message
            results.append(state.result())
        assert worker.proc.wait(timeout=90) == 0  # idle after the two photos: the session ends by itself
    finally:
        worker.stop()
    for result in results:
        assert result["status"] == "completed"
        assert {s["worker"] for s in result["stages"].values()} == {worker.session}
        assert all(s["queue_wait_s"] >= 0 and s["run_s"] > 0 for s in result["stages"].values())
        on_disk = json.loads((Path(result["output_prefix"]) / "result.json").read_text())
        assert on_disk["stages"] == result["stages"]
    second = results[1]["stages"]
    assert second["segment"]["model_load_s"] == 0.0 and second["reconstruct"]["model_load_s"] == 0.0
    assert not backends._CACHE, "a model was built in the flow's process"
    assert "'tasks': 4, 'failed': 0, 'model_loads': {'segment': 1, 'reconstruct': 1}" in worker.text()


@pytest.mark.slow
def test_catalog_sends_every_gpu_batch_to_the_workers(workers_mode, tmp_path):
    from flows.catalog_batch import catalog_batch

    (tmp_path / "photos").mkdir()
    for i in range(3):
        _photo(tmp_path / "photos", f"item{i}.png", seed=20 + i)
    worker = WorkerSession(tmp_path).start()
    try:
        summary = catalog_batch(source=str(tmp_path / "photos"), output_root=str(tmp_path / "out"),
                                default_prompt="item", batch_size=2, segmenter="lite", reconstructor="lite")
    finally:
        worker.stop()
    assert summary["counts"]["completed"] == 3, summary["summary"]
    for item in summary["items"]:
        result = json.loads((Path(item["output_prefix"]) / "result.json").read_text())
        assert {s["worker"] for s in result["stages"].values()} == {worker.session}
    assert not backends._CACHE, "a model was built in the flow's process"
    assert worker.text().count("Task run 'gpu-stage") and worker.text().count("done (segment") == 2  # 2 batches


@pytest.mark.slow
def test_segment_and_reconstruct_sessions_each_serve_their_own_stage(workers_mode, tmp_path, monkeypatch):
    """The two images' sessions: one serves segment only (SAM3D_GPU_WORKER_STAGES=segment, the SAM 3 image), one
    reconstruct only (the SAM 3D Objects image), each stage with its own deployment. An image-to-3d run and a catalog
    batch (split into a segment task and a reconstruct task) each get every stage from the session of that stage."""
    from flows.catalog_batch import catalog_batch
    from flows.image_to_3d import image_to_3d

    tag = uuid.uuid4().hex[:6]  # deployments nobody created: the flows start no session, these two serve
    monkeypatch.setenv("SAM3D_GPU_SEGMENT_DEPLOYMENT", f"gpu-worker/sam3-{tag}")
    monkeypatch.setenv("SAM3D_GPU_RECONSTRUCT_DEPLOYMENT", f"gpu-worker/sam3d-{tag}")
    (tmp_path / "photos").mkdir()
    for i in range(2):
        _photo(tmp_path / "photos", f"item{i}.png", seed=60 + i)
    segmenting = WorkerSession(tmp_path, env={"SAM3D_GPU_WORKER_STAGES": "segment"}).start()
    reconstructing = WorkerSession(tmp_path, env={"SAM3D_GPU_WORKER_STAGES": "reconstruct"}).start()
    try:
        state = image_to_3d(image=str(_photo(tmp_path, "cup.png", seed=50)), prompt="cup",
                            output_root=str(tmp_path / "out"), segmenter="lite", reconstructor="lite",
                            return_state=True)
        summary = catalog_batch(source=str(tmp_path / "photos"), output_root=str(tmp_path / "catalog"),
                                default_prompt="item", batch_size=2, segmenter="lite", reconstructor="lite")
    finally:
        segmenting.stop()
        reconstructing.stop()
    assert state.is_completed(), state.message
    stages = state.result()["stages"]
    assert stages["segment"]["worker"] == segmenting.session
    assert stages["reconstruct"]["worker"] == reconstructing.session
    assert summary["counts"]["completed"] == 2, summary["summary"]
    for item in summary["items"]:
        result = json.loads((Path(item["output_prefix"]) / "result.json").read_text())
        assert result["stages"]["segment"]["worker"] == segmenting.session
        assert result["stages"]["reconstruct"]["worker"] == reconstructing.session
    seg_log, rec_log = segmenting.text(), reconstructing.text()
    assert "waiting for gpu-stage tasks (gpu-segment;" in seg_log
    assert "waiting for gpu-stage tasks (gpu-reconstruct;" in rec_log
    assert "Task run 'gpu-segment" in seg_log and "Task run 'gpu-reconstruct" not in seg_log
    assert "Task run 'gpu-reconstruct" in rec_log and "Task run 'gpu-segment" not in rec_log
    assert "Task run 'gpu-stage" not in seg_log + rec_log  # the catalog batch was split, not sent as one task
    assert not backends._CACHE, "a model was built in the flow's process"


@pytest.mark.slow
def test_a_worker_killed_mid_reconstruction_loses_nothing(workers_mode, tmp_path, monkeypatch):
    """SIGKILL during the reconstruct task: the lease goes stale, the task run is marked Crashed, the batch is
    submitted again and a new session completes the photo, exactly once."""
    from prefect.client.orchestration import get_client

    from flows.image_to_3d import image_to_3d
    from sam3d_pipeline.gpu.workers import lease_key
    from sam3d_pipeline.storage import open_storage

    monkeypatch.setenv("SAM3D_GPU_LEASE_S", "3")
    photo = _photo(tmp_path, "big.png", seed=31, size=(1400, 1000))  # a slow enough reconstruction to kill
    out = tmp_path / "out"
    first = WorkerSession(tmp_path, env={"SAM3D_LITE_MESH_RESOLUTION": "400"}).start()
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(state=image_to_3d(
        image=str(photo), prompt="thing", output_root=str(out), segmenter="lite", reconstructor="lite",
        return_state=True)))
    thread.start()
    try:
        deadline = time.monotonic() + 180
        lease = None
        while lease is None:
            for path in (out / lease_key("x")).parent.glob("*.json") if (out / "_workers").exists() else []:
                found = Lease.model_validate_json(path.read_text())
                if found.work.startswith("reconstruct"):
                    lease = found
            assert time.monotonic() < deadline, first.text()[-3000:]
            time.sleep(0.05)
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        second = WorkerSession(tmp_path, env={"SAM3D_LITE_MESH_RESOLUTION": "400"}).start()
        thread.join(timeout=300)
    finally:
        thread.join(timeout=1)
        first.stop()
    second.stop()
    state = outcome["state"]
    assert state.is_completed(), state.message
    result = state.result()
    assert result["stages"]["reconstruct"]["worker"] == second.session
    attempts = result["mesh"]["gpu_attempts"]
    assert [a["kind"] for a in attempts] == ["crashed", "ok"], attempts
    assert "stopped renewing its lease" in attempts[0]["message"]
    with get_client(sync_client=True) as client:
        assert client.read_task_run(lease.task_run_id).state.is_crashed()
    results = list(out.rglob("result.json"))
    assert len(results) == 1 and json.loads(results[0].read_text())["status"] == "completed"
    assert not open_storage(str(out)).exists(lease_key(lease.task_run_id))


@pytest.mark.slow
def test_an_idle_worker_exits_by_itself(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client

    worker = WorkerSession(tmp_path, idle_s=2).start()
    try:
        assert worker.proc.wait(timeout=60) == 0, worker.text()[-2000:]
    finally:
        worker.stop()
    assert "idle for 2 s, exiting" in worker.text()
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(uuid.UUID(worker.session)).state.is_completed()


@pytest.mark.slow
def test_out_of_memory_on_a_worker_is_retried_with_the_low_memory_settings(workers_mode, tmp_path):
    """SAM 3D Objects (the documented-interface double) on a "24 GB card": every network resident runs out of
    memory; the batch is submitted again with the low-memory settings and completes."""
    from flows.image_to_3d import image_to_3d

    worker = WorkerSession(tmp_path, env={"SAM3D_DOUBLE_GPU_MODULES_MAX": "4"}).start()
    try:
        state = image_to_3d(image=str(_photo(tmp_path, "mug.png", seed=5)), prompt="mug",
                            output_root=str(tmp_path / "out"), segmenter="lite", reconstructor="sam3d",
                            return_state=True)
    finally:
        worker.stop()
    assert state.is_completed(), state.message
    result = state.result()
    prefix = Path(result["output_prefix"])
    assert {p.name for p in prefix.iterdir()} == {"mask.png", "overlay.png", "object.glb", "object.ply",
                                                  "preview.png", "result.json", "stages", "scene.glb", "objects"}
    assert (prefix / "object.ply").read_bytes() == (prefix / "stages/reconstruct/object.ply").read_bytes()
    assert result["reconstructor"]["name"] == "sam3d" and result["pose"]["rotation"] == [1.0, 0.0, 0.0, 0.0]
    assert "GPU workers" in result["reconstructor"]["chosen_because"]
    attempts = result["mesh"]["gpu_attempts"]
    assert [(a["kind"], a["low_memory"]) for a in attempts] == [("oom", False), ("ok", True)]
    assert "CUDA out of memory" in attempts[0]["message"]


@pytest.mark.slow
def test_sam3_stays_loaded_on_the_worker_between_photos(workers_mode, tmp_path, monkeypatch):
    """The real SAM 3 (random weights, on this CPU) on one worker session: the first photo pays the model
    load, the second finds it in memory."""
    pytest.importorskip("sam3")
    from flows.image_to_3d import image_to_3d

    monkeypatch.setenv("SAM3D_SAM3_RANDOM_INIT", "true")
    worker = WorkerSession(tmp_path, env={"SAM3D_SAM3_RANDOM_INIT": "true"}).start()
    try:
        stages = []
        for i in range(2):
            state = image_to_3d(image=str(_photo(tmp_path, f"shoe{i}.png", seed=40 + i)), prompt="shoe",
                                output_root=str(tmp_path / "out"), segmenter="sam3", reconstructor="lite",
                                return_state=True)
            assert state.is_completed(), state.message
            result = state.result()
            assert result["segmenter"]["name"] == "sam3" and result["segmenter"]["weights"] == "random-init"
            stages.append(result["stages"]["segment"])
    finally:
        worker.stop()
    assert stages[0]["worker"] == stages[1]["worker"] == worker.session
    assert stages[0]["model_load_s"] > 1.0  # building SAM 3 takes seconds
    assert stages[1]["model_load_s"] == 0.0
    assert not backends._CACHE  # the flow's process built no model


@pytest.mark.slow
def test_flows_starting_sessions_at_once_stay_within_the_maximum(prefect_server, monkeypatch):
    """Four flows that see queued work at the same moment start at most SAM3D_GPU_MAX_WORKERS sessions."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    from flows.gpu_worker import gpu_worker
    from sam3d_pipeline.settings import get_settings
    from tasks import gpu_dispatch

    name = f"race-{uuid.uuid4().hex[:8]}"
    gpu_worker.to_deployment(name=name).apply()  # no worker polls it: its sessions stay scheduled
    monkeypatch.setenv("SAM3D_GPU_WORKER_DEPLOYMENT", f"gpu-worker/{name}")
    monkeypatch.setenv("SAM3D_GPU_MAX_WORKERS", "2")
    settings = get_settings()
    kept = []

    def start() -> None:
        with get_client(sync_client=True) as client:
            kept.append(gpu_dispatch.ensure_sessions(client, settings, queued=5))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"gpu-worker/{name}")
        active = gpu_dispatch._active_sessions(client, deployment.id)
        assert len(active) == 2 and sum(kept) == 2, (len(active), kept)
        for run in active:
            client.set_flow_run_state(run.id, Cancelled(), force=True)


def test_a_heartbeat_that_fails_to_write_is_logged_and_written_again_before_the_lease_goes_stale(tmp_path):
    """Storage refuses three heartbeats in a row: the worker says so and tries again within a second, so a submitter
    looking all along never sees a stale lease (it would count the worker lost and submit the work twice)."""
    import logging

    from sam3d_pipeline.errors import TransientStorageError
    from sam3d_pipeline.gpu.workers import lease_key, lease_verdict
    from sam3d_pipeline.storage import LocalStorage
    from tasks.gpu_dispatch import read_lease
    from tasks.gpu_tasks import held_lease

    class FlakyStorage(LocalStorage):
        refuse = 0

        def write_bytes(self, key, data, **kwargs):
            if self.refuse:
                self.refuse -= 1
                raise TransientStorageError(f"{key}: storage unreachable")
            return super().write_bytes(key, data, **kwargs)

    storage, lease_s = FlakyStorage(tmp_path), 6.0
    verdicts, lines = [], []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("prefect.gpu_worker").addHandler(handler)
    with held_lease(storage, "run-1", "session-1", lease_s):
        storage.refuse = 3  # the next three heartbeats (at 2 s and its retries) fail
        started = time.monotonic()
        while time.monotonic() - started < 7.5:
            verdicts.append(lease_verdict(read_lease(storage, "run-1"), now=time.time(), lease_s=lease_s))
            time.sleep(0.2)
    logging.getLogger("prefect.gpu_worker").removeHandler(handler)
    assert storage.refuse == 0 and set(verdicts) == {"running"}, verdicts
    text = "\n".join(lines)
    assert "heartbeat not written (TransientStorageError" in text and "written again after 3" in text
    assert not storage.exists(lease_key("run-1"))


# -- videos and several objects on the workers ------------------------------------------------------------------
@pytest.mark.slow
def test_a_clip_is_tracked_and_reconstructed_on_a_worker(workers_mode, tmp_path):
    """image-to-3d on a clip with SAM3D_GPU_STAGES=workers: the worker tracks it (a gpu-segment task, the clip by
    its URI) and reconstructs the chosen frame (a gpu-reconstruct task, the frame by key); the flow's process builds
    no model, and result.json has the video section and both stages on the worker session."""
    from flows.image_to_3d import image_to_3d

    clip = moving_object(90)
    path = tmp_path / "turntable.mp4"
    path.write_bytes(encode_clip(clip.frames, "mp4"))
    worker = WorkerSession(tmp_path).start()
    try:
        state = image_to_3d(image=str(path), prompt="red disc", output_root=str(tmp_path / "out"), segmenter="lite",
                            reconstructor="lite", export=["glb"], video_frames=2, return_state=True)
    finally:
        worker.stop()
    assert state.is_completed(), state.message
    result = state.result()
    assert result["status"] == "completed" and result["video"]["frames_sampled"] == 90
    assert {name: stage["worker"] for name, stage in result["stages"].items()} == {
        "segment": worker.session, "reconstruct": worker.session}
    chosen = result["video"]["chosen"]
    assert clip.whole(chosen["index"]) and len(result["video"]["candidates"]) == 2
    assert {"frame.png", "track.webp", "object.glb"} <= set(result["outputs"])
    prefix = Path(result["output_prefix"])
    assert iou(np.asarray(Image.open(prefix / "mask.png")) > 127, clip.truth[chosen["index"]]) > 0.8
    assert (prefix / "stages/track/track.json").is_file() and (prefix / "stages/reconstruct/input-image.png").is_file()
    assert not backends._CACHE, "a model was built in the flow's process"
    log = worker.text()
    assert "track 1 clip(s) with lite" in log and "Task run 'gpu-reconstruct" in log


@pytest.mark.slow
def test_a_review_picking_another_frame_reconstructs_that_frame_on_a_worker(workers_mode, tmp_path, monkeypatch):
    """A clip tracked on a worker, reviewed here: the reviewer picks the third best frame, and the worker
    reconstructs from that frame (sent by key) with its tracked mask."""
    from .test_review_video import assert_reconstructed_from, offered_frames, paused_clip

    monkeypatch.setenv("SAM3D_REVIEW_POLL_INTERVAL_S", "0.2")
    worker = WorkerSession(tmp_path).start()
    try:
        clip, run = paused_clip(tmp_path)
        k = offered_frames(run)[2]["index"]
        run.resume(action="approve", frame=k)
        result = assert_reconstructed_from(run, clip, k)
    finally:
        worker.stop()
    assert {name: stage["worker"] for name, stage in result["stages"].items()} == {
        "segment": worker.session, "reconstruct": worker.session}
    sent = np.asarray(Image.open(run.prefix / "stages/reconstruct/input-image.png"))
    assert np.array_equal(sent, np.asarray(Image.open(run.prefix / "frame.png")))
    assert not backends._CACHE, "a model was built in the flow's process"


@pytest.mark.slow
def test_bad_videos_are_refused_on_the_workers_path_as_inline(workers_mode, tmp_path, monkeypatch):
    """A truncated clip, an audio-only file, a clip over the length limit and a box outside the frame: refused
    before any GPU work, with the same error (type, code, message) on the workers path as on the embedded default.
    No worker serves here: a clip that reached the GPU queue would wait until SAM3D_GPU_STAGE_TIMEOUT_S."""
    from flows.image_to_3d import image_to_3d

    monkeypatch.setenv("SAM3D_GPU_STAGE_TIMEOUT_S", "30")
    monkeypatch.setenv("SAM3D_VIDEO_MAX_SECONDS", "2")
    mp4 = encode_clip(moving_object(30).frames, "mp4")
    bad = {"cut.mp4": (mp4[: len(mp4) // 2], {}), "sound.mp4": (audio_only(), {}),
           "long.mp4": (encode_clip(moving_object(90).frames, "mp4"), {}),
           "boxed.mp4": (mp4, {"boxes": [[200, 10, 220, 40]]})}
    for name, (data, _) in bad.items():
        (tmp_path / name).write_bytes(data)
    errors = {}
    for mode in ("inline", "workers"):
        monkeypatch.setenv("SAM3D_GPU_STAGES", mode)
        for name, (_, extra) in bad.items():
            out = tmp_path / f"out-{mode}"
            started = time.monotonic()
            state = image_to_3d(image=str(tmp_path / name), prompt="red disc", output_root=str(out),
                                segmenter="lite", reconstructor="lite", return_state=True, **extra)
            assert state.is_failed() and time.monotonic() - started < 25, (mode, name, state.message)
            [written] = [json.loads(p.read_text()) for p in out.glob(f"{name.split('.')[0]}-*/result.json")]
            errors[mode, name] = (written["status"], written["error"]["type"], written["error"]["code"],
                                  written["error"]["message"])
    for name in bad:
        assert errors["workers", name] == errors["inline", name], name
    assert errors["workers", "cut.mp4"][2] == "invalid_video" and "truncated" in errors["workers", "cut.mp4"][3]
    assert "audio only" in errors["workers", "sound.mp4"][3]
    assert errors["workers", "long.mp4"][2] == "video_too_large"
    assert "lies outside the 96x72 image" in errors["workers", "boxed.mp4"][3]
    assert not (tmp_path / "out-workers" / "_workers").exists() or not any((tmp_path / "out-workers" /
                                                                           "_workers").rglob("*.json"))


@pytest.mark.slow
def test_a_catalog_with_a_clip_and_every_object_runs_on_the_workers(workers_mode, tmp_path):
    """A manifest with a video row, an instances=all row and a plain photo: one GPU batch on a worker; the clip is
    tracked and reconstructed from its best view, the photo gets one object folder per object found, reconstructed
    in one call; catalog.json and the gallery list every object."""
    from flows.catalog_batch import catalog_batch

    clip = moving_object(60)
    (tmp_path / "spin.mp4").write_bytes(encode_clip(clip.frames, "mp4"))
    (tmp_path / "three.png").write_bytes(encode(three_objects_photo()[0]))
    _photo(tmp_path, "one.png", seed=70)
    (tmp_path / "items.csv").write_text("image,prompt,instances\nspin.mp4,red disc,\nthree.png,discs,all\n"
                                        "one.png,thing,\nspin.mp4,red disc,\n")
    worker = WorkerSession(tmp_path).start()
    try:
        summary = catalog_batch(source=str(tmp_path / "items.csv"), output_root=str(tmp_path / "out"),
                                segmenter="lite", reconstructor="lite")
    finally:
        worker.stop()
    assert summary["counts"]["completed"] == 3 and summary["counts"]["duplicate"] == 1, summary["summary"]
    items = {item["id"]: item for item in summary["items"]}
    spin = json.loads((Path(items["spin"]["output_prefix"]) / "result.json").read_text())
    three = json.loads((Path(items["three"]["output_prefix"]) / "result.json").read_text())
    for result in (spin, three):
        assert {s["worker"] for s in result["stages"].values()} == {worker.session}
    assert spin["video"]["frames_sampled"] == 60 and clip.whole(spin["video"]["chosen"]["index"])
    assert {"frame.png", "track.webp"} <= set(spin["outputs"])
    assert items["spin"]["video"]["chosen"] == spin["video"]["chosen"]
    found = len(three["instances"])
    assert found == 3 and sorted(o["index"] for o in three["objects"]) == [0, 1, 2]
    assert sorted(p.name for p in (Path(items["three"]["output_prefix"]) / "objects").iterdir()) == ["0", "1", "2"]
    assert three["stages"]["reconstruct"]["objects"] == 3  # the three went in one reconstruction call
    catalog = json.loads((tmp_path / "out" / "catalog.json").read_text())
    listed = {item["id"]: item for item in catalog["items"]}
    assert [o["index"] for o in listed["three"]["objects"]] == [o["index"] for o in three["objects"]]
    assert all(f"objects/{o['index']}/object.glb" in o["files"] for o in listed["three"]["objects"])
    assert len(listed["one"]["objects"]) == 1 and listed["spin-5"]["video"] == listed["spin"]["video"]
    gallery = (tmp_path / "out" / "index.html").read_text()
    assert "3 object(s)" in gallery and f"video: frame {spin['video']['chosen']['index']}" in gallery
    assert not backends._CACHE, "a model was built in the flow's process"
    assert worker.text().count("Task run 'gpu-stage") and "track 1 clip(s)" in worker.text()
