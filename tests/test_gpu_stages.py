"""GPU stage flows (segment-image, reconstruct-objects) under the Prefect test server, and crash handling."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3d_pipeline import gpu_failures
from sam3d_pipeline import gpu_stages as stages
from sam3d_pipeline.masks import iou
from sam3d_pipeline.settings import Settings

from .photos import encode, object_photo

DOUBLE_DIR = Path(__file__).parent / "sam3d_double"


# -- failure classification (pure) ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("state", "message", "kind"),
    [
        ("COMPLETED", "", "ok"),
        ("CRASHED", "Failed to run ECS task: RESOURCE:GPU", "no_capacity"),
        ("CRASHED", "ECS task failed to start: No Container Instances were found in your cluster.", "no_capacity"),
        ("CRASHED", "Task stopped: Host EC2 (instance i-0abc) terminated.", "spot_interruption"),
        ("CRASHED", "Spot interruption notice received", "spot_interruption"),
        ("FAILED", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "oom"),
        ("CRASHED", "Container 'prefect' exited with code 137", "oom"),
        ("CRASHED", "Flow run infrastructure exited with non-zero status code 1.", "crashed"),
        ("FAILED", "InputError: mask is empty", "failed"),
        ("FAILED", "Flow run encountered an exception: TransientStorageError: s3://b/k: SlowDown", "transient"),
        ("CANCELLED", "cancelled by user", "cancelled"),
    ],
)
def test_classify(state, message, kind):
    assert gpu_failures.classify(state, message) == kind


def test_retry_rules():
    assert gpu_failures.should_retry("no_capacity", 1, 3, False)
    assert not gpu_failures.should_retry("no_capacity", 3, 3, False)  # attempts spent
    assert not gpu_failures.should_retry("failed", 1, 3, False)  # permanent
    assert gpu_failures.should_retry("oom", 1, 3, False)  # retried in low-memory mode
    assert not gpu_failures.should_retry("oom", 2, 3, True)  # OOM even in low-memory mode: give up
    assert gpu_failures.next_low_memory("oom", False) and not gpu_failures.next_low_memory("crashed", False)
    assert [gpu_failures.backoff_s(n, 30) for n in (1, 2, 3)] == [30, 60, 120]
    assert gpu_failures.backoff_s(20, 30) == 600


# -- stage flows under the Prefect test server ------------------------------------------------------------
def _double_config(folder: Path) -> Path:
    """A SAM 3D Objects config with its (placeholder) checkpoint files beside it, for the double."""
    folder.mkdir(parents=True)
    for name in ("a.ckpt", "b.ckpt"):
        (folder / name).write_bytes(b"w")
    (folder / "pipeline.yaml").write_text(json.dumps({"ss_generator_ckpt_path": "a.ckpt",
                                                      "slat_generator_ckpt_path": "b.ckpt"}))
    return folder / "pipeline.yaml"


@pytest.fixture
def sam3d_double(tmp_path, monkeypatch):
    for var in ("LIDRA_SKIP_INIT", "MPLBACKEND", "CUDA_HOME", "CONDA_PREFIX", "GRADIO_ANALYTICS_ENABLED"):
        monkeypatch.setenv(var, "")  # restored after the test; the adapter sets them
        monkeypatch.delenv(var)
    monkeypatch.syspath_prepend(str(DOUBLE_DIR))
    monkeypatch.delitem(sys.modules, "inference", raising=False)
    monkeypatch.setenv("SAM3D_SAM3D_CONFIG_PATH", str(_double_config(tmp_path / "ckpt")))
    from sam3d_pipeline.backends.sam3d_reconstructor import _import_inference

    _import_inference()
    inference = sys.modules["inference"]

    inference.INSTANCES.clear()
    inference.CALLS.clear()
    return inference


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_stage_flows_exchange_storage_keys_on_s3(s3, sam3d_double):
    from flows.gpu_stages import reconstruct_objects, segment_image

    client, bucket = s3
    rgb, truth = object_photo(seed=3)
    client.put_object(Bucket=bucket, Key="photos/red thing.png", Body=encode(rgb))
    image = f"s3://{bucket}/photos/red thing.png"
    root = f"s3://{bucket}/outputs"
    prefix = f"red-thing-{uuid.uuid4().hex[:12]}"
    summary = segment_image(image=image, output_root=root, prefix=prefix,
                            params=stages.SegmentParams(prompt="red thing"), segmenter="lite")
    assert summary["backend"]["name"] == "lite" and summary["instances"]
    seg = stages.load_segmentation(root, prefix)
    assert iou(seg.instances[0].mask, truth) > 0.9
    assert seg.instances[0].area == summary["instances"][0]["area"]

    # Two masks of one photo in one batch: one model load, one point map.
    mask_key = summary["instances"][0]["mask"]
    jobs = [stages.ReconstructJobParam(image=image, mask=mask_key, output=f"{prefix}/stages/reconstruct/{i}", seed=i)
            for i in range(2)]
    results = reconstruct_objects(jobs=jobs, output_root=root, reconstructor="sam3d")
    assert [r["stats"]["pointmap_reused"] for r in results] == [False, True]
    assert len(sam3d_double.INSTANCES) == 1 and sam3d_double.INSTANCES[0]._pipeline.pointmap_computations == 1
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"outputs/{prefix}/")["Contents"]}
    for i in range(2):
        for name in ("object.glb", "object.ply", "reconstruction.json"):
            assert f"outputs/{prefix}/stages/reconstruct/{i}/{name}" in keys
    recon = stages.load_reconstruction(root, jobs[0].output)
    assert recon.backend.name == "sam3d" and recon.pose["rotation"] == [1.0, 0.0, 0.0, 0.0]
    assert len(recon.mesh.faces) > 0 and recon.splat_ply.startswith(b"ply\n")


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_reconstruct_stage_refuses_a_mask_of_another_size(tmp_path):
    from flows.gpu_stages import reconstruct_objects

    rgb, _ = object_photo()
    photo = tmp_path / "p.png"
    photo.write_bytes(encode(rgb))
    (tmp_path / "out" / "x").mkdir(parents=True)
    Image.fromarray(np.ones((10, 10), np.uint8) * 255).save(tmp_path / "out" / "x" / "mask.png")
    state = reconstruct_objects(jobs=[stages.ReconstructJobParam(image=str(photo), mask="x/mask.png", output="x/r")],
                                output_root=str(tmp_path / "out"), reconstructor="lite", return_state=True)
    assert state.is_failed()
    assert "x/mask.png" in state.message and "(10, 10)" in state.message


# -- retries of crashed stage runs --------------------------------------------------------------------
class _Run:
    def __init__(self, state):
        self.id = uuid.uuid4()
        self.state = state


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_crashed_stage_runs_are_retried_then_fall_back_to_low_memory(monkeypatch):
    """ECS outcomes (no GPU capacity, OOM) arrive as real Prefect states; the retry loop reacts to them."""
    from prefect import flow
    from prefect.states import Completed, Crashed, Failed

    import tasks.gpu_dispatch as dispatch

    outcomes = [Crashed(message="RESOURCE:GPU"), Failed(message="CUDA out of memory. Tried to allocate 3 GiB"),
                Completed()]
    calls, sleeps = [], []

    def fake_run_deployment(name, parameters, timeout):
        calls.append(parameters)
        return _Run(outcomes[len(calls) - 1])

    monkeypatch.setattr(dispatch, "run_deployment", fake_run_deployment)
    settings = Settings(gpu_stage_attempts=4, gpu_stage_retry_delay_s=5)

    @flow
    def caller():
        return dispatch.run_gpu_stage("reconstruct-objects/x", {"jobs": []}, settings, low_memory_param=True,
                                      sleep=sleeps.append)

    attempts = caller()
    assert [a.kind for a in attempts] == ["no_capacity", "oom", "ok"]
    assert [a.low_memory for a in attempts] == [False, False, True]
    assert calls[0] == {"jobs": []} and calls[2] == {"jobs": [], "low_memory": True}
    assert sleeps == [5, 10]

    outcomes[:] = [Failed(message="InputError: mask is empty")]
    calls.clear()

    @flow
    def caller_permanent():
        return dispatch.run_gpu_stage("reconstruct-objects/x", {}, settings, sleep=sleeps.append)

    state = caller_permanent(return_state=True)
    assert state.is_failed() and "mask is empty" in state.message and len(calls) == 1


# -- deployment mode: image-to-3d calls the stage deployments served by a real runner process ---------------
@pytest.fixture
def served_stages(prefect_server, tmp_path):
    """``python -m flows.gpu_stages`` serving both stage deployments against the test server; stopped by PID."""
    import os
    import signal
    import subprocess
    import time

    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    api_url = get_current_settings().api.url
    config = _double_config(tmp_path / "stage-ckpt")
    env = os.environ | {"PREFECT_API_URL": api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                        "PREFECT_LOGGING_LEVEL": "WARNING", "SAM3D_SAM3D_CONFIG_PATH": str(config),
                        # A "24 GB card": all networks resident runs out of memory, one stage at a time fits.
                        "SAM3D_DOUBLE_GPU_MODULES_MAX": "4",
                        # The stage process stands in for the GPU image: SAM 3D Objects is the double.
                        "PYTHONPATH": os.pathsep.join([str(DOUBLE_DIR), str(Path(__file__).parents[1])])}
    env.pop("CONDA_PREFIX", None)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "flows.gpu_stages"], cwd=Path(__file__).parents[1], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        with get_client(sync_client=True) as client:
            while True:
                try:
                    client.read_deployment_by_name("segment-image/segment-image")
                    client.read_deployment_by_name("reconstruct-objects/reconstruct-objects")
                    break
                except Exception:  # noqa: BLE001 - not registered yet
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError((tmp_path / "serve.log").read_text()) from None
                    time.sleep(0.5)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_image_to_3d_calls_the_stage_deployments_and_recovers_from_oom(served_stages, tmp_path, monkeypatch):
    """Deployment mode end to end: keys not pixels; the reconstruct stage runs out of GPU memory with every
    network resident, and the retry with the low-memory settings completes."""
    from prefect.client.orchestration import get_client

    from flows.image_to_3d import image_to_3d

    monkeypatch.setenv("SAM3D_GPU_STAGES", "deployment")
    monkeypatch.setenv("SAM3D_GPU_STAGE_TIMEOUT_S", "120")
    monkeypatch.setenv("SAM3D_GPU_STAGE_RETRY_DELAY_S", "0.5")
    rgb, truth = object_photo(seed=5)
    photo = tmp_path / "mug.png"
    photo.write_bytes(encode(rgb))
    state = image_to_3d(image=str(photo), prompt="mug", output_root=str(tmp_path / "out"), segmenter="lite",
                        reconstructor="sam3d", return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["status"] == "completed"
    prefix = Path(result["output_prefix"])
    assert {p.name for p in prefix.iterdir()} == {"mask.png", "overlay.png", "object.glb", "object.ply",
                                                  "preview.png", "result.json", "stages"}
    assert result["reconstructor"]["name"] == "sam3d" and result["pose"]["rotation"] == [1.0, 0.0, 0.0, 0.0]
    assert (prefix / "object.ply").read_bytes() == (prefix / "stages/reconstruct/object.ply").read_bytes()
    assert iou(np.asarray(Image.open(prefix / "mask.png")) > 127, truth) > 0.9
    assert "GPU pool" in result["reconstructor"]["chosen_because"]
    attempts = result["mesh"]["gpu_attempts"]
    assert [(a["kind"], a["low_memory"]) for a in attempts] == [("oom", False), ("ok", True)]
    assert "CUDA out of memory" in attempts[0]["message"]
    assert any(m.startswith("reconstruct-objects attempt 1: FAILED (oom)") for m in result["messages"])
    with get_client(sync_client=True) as client:
        first, second = (client.read_flow_run(a["flow_run_id"]) for a in attempts)
    assert first.state.is_failed() and second.state.is_completed()
    assert "low_memory" not in first.parameters and second.parameters["low_memory"] is True
    assert second.parameters["jobs"][0]["mask"].endswith("stages/segment/mask-0.png")  # keys, not pixels


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_inline_image_to_3d_with_sam3d_writes_glb_ply_and_pose(tmp_path, sam3d_double, monkeypatch):
    """The embedded default: stages in-process (pixels stay in memory), SAM 3D Objects' outputs published."""
    from dataclasses import replace

    import trimesh

    from flows.image_to_3d import image_to_3d
    from sam3d_pipeline import backends
    from sam3d_pipeline.backends.sam3d_reconstructor import ply_header

    # The double stands in for the packages the registry looks for (torch, sam3d_objects).
    monkeypatch.setitem(backends.RECONSTRUCTORS, "sam3d", replace(backends.RECONSTRUCTORS["sam3d"], requires=()))
    monkeypatch.setenv("SAM3D_GPU_STAGES", "inline")
    rgb, _ = object_photo(seed=6)
    photo = tmp_path / "vase.png"
    photo.write_bytes(encode(rgb))
    state = image_to_3d(image=str(photo), prompt="vase", output_root=str(tmp_path / "out"), segmenter="lite",
                        reconstructor="sam3d", seed=3, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    prefix = Path(result["output_prefix"])
    assert {p.name for p in prefix.iterdir()} == {"mask.png", "overlay.png", "object.glb", "object.ply",
                                                  "preview.png", "result.json"}
    on_disk = json.loads((prefix / "result.json").read_text())
    assert on_disk["reconstructor"]["name"] == "sam3d" and on_disk["reconstructor"]["weights"] == "checkpoint"
    assert on_disk["pose"]["rotation"] == [1.0, 0.0, 0.0, 0.0] and len(on_disk["pose"]["translation"]) == 3
    assert on_disk["mesh"]["splat_points"] == ply_header((prefix / "object.ply").read_bytes())["vertex_count"]
    mesh = trimesh.load(prefix / "object.glb", force="mesh")
    assert len(mesh.faces) > 0 and mesh.visual.kind == "vertex"
    assert sam3d_double.CALLS[-1]["seed"] == 3


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_missing_stage_deployment_fails_the_run_with_a_record(tmp_path, monkeypatch):
    from flows.image_to_3d import image_to_3d

    monkeypatch.setenv("SAM3D_GPU_STAGES", "deployment")
    monkeypatch.setenv("SAM3D_SEGMENT_DEPLOYMENT", f"segment-image/not-deployed-{uuid.uuid4().hex[:6]}")
    photo = tmp_path / "p.png"
    photo.write_bytes(encode(object_photo()[0]))
    state = image_to_3d(image=str(photo), prompt="thing", output_root=str(tmp_path / "out"), segmenter="lite",
                        reconstructor="lite", return_state=True)
    assert state.is_failed() and "not-deployed" in state.message and "prefect deploy" in state.message
    [prefix] = list((tmp_path / "out").iterdir())
    result = json.loads((prefix / "result.json").read_text())
    assert result["status"] == "failed" and result["error"]["type"] == "GpuStageError"


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_stage_run_that_never_starts_is_cancelled_at_the_timeout():
    """No worker polls this deployment (like a GPU pool that cannot get capacity): the run is cancelled."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    import tasks.gpu_dispatch as dispatch

    name = f"never-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("segment-image")
        client.create_deployment(flow_id=flow_id, name=name)
    settings = Settings(gpu_stage_timeout_s=2, gpu_stage_attempts=2, gpu_stage_retry_delay_s=0)

    @flow
    def caller():
        return dispatch.run_gpu_stage(f"segment-image/{name}", {}, settings)

    state = caller(return_state=True)
    assert state.is_failed() and "timeout" in state.message
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
    assert run.state.type.value in ("CANCELLING", "CANCELLED")
