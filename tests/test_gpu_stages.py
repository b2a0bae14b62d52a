"""GPU stages: failure classification, the storage-keyed batch with SAM 3D Objects (the documented-interface
double), and the in-process path. Worker sessions themselves are in ``test_gpu_workers.py``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sam3d_pipeline.gpu import failures as gpu_failures

from .doubles import DOUBLE_DIR, double_config
from .photos import encode, object_photo


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
    from sam3d_pipeline.backoff import backoff_s

    assert [backoff_s(n, 30) for n in (1, 2, 3)] == [30, 60, 120]
    assert backoff_s(20, 30) == 600


# -- SAM 3D Objects (the documented-interface double) in process and in a GPU batch ------------------------
@pytest.fixture
def sam3d_double(tmp_path, monkeypatch):
    for var in ("LIDRA_SKIP_INIT", "MPLBACKEND", "CUDA_HOME", "CONDA_PREFIX", "GRADIO_ANALYTICS_ENABLED"):
        monkeypatch.setenv(var, "")  # restored after the test; the adapter sets them
        monkeypatch.delenv(var)
    monkeypatch.syspath_prepend(str(DOUBLE_DIR))
    monkeypatch.delitem(sys.modules, "inference", raising=False)
    monkeypatch.setenv("SAM3D_SAM3D_CONFIG_PATH", str(double_config(tmp_path / "ckpt")))
    from sam3d_pipeline.backends.sam3d_reconstructor import _import_inference

    _import_inference()
    inference = sys.modules["inference"]

    inference.INSTANCES.clear()
    inference.CALLS.clear()
    return inference


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_inline_image_to_3d_with_sam3d_writes_glb_ply_and_pose(tmp_path, sam3d_double, monkeypatch):
    """The embedded default: stages in-process (pixels stay in memory), SAM 3D Objects' outputs published."""
    from dataclasses import replace

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
                                                  "preview.png", "result.json", "scene.glb", "objects"}
    on_disk = json.loads((prefix / "result.json").read_text())
    assert on_disk["reconstructor"]["name"] == "sam3d" and on_disk["reconstructor"]["weights"] == "checkpoint"
    assert on_disk["pose"]["rotation"] == [1.0, 0.0, 0.0, 0.0] and len(on_disk["pose"]["translation"]) == 3
    assert on_disk["mesh"]["splat_points"] == ply_header((prefix / "object.ply").read_bytes())["vertex_count"]
    from sam3d_pipeline.export import read_glb

    gltf, [mesh] = read_glb((prefix / "object.glb").read_bytes())
    assert len(mesh.faces) > 0 and "COLOR_0" in gltf["meshes"][0]["primitives"][0]["attributes"]
    assert on_disk["objects"][0]["pose"] == on_disk["pose"] and on_disk["objects"][0]["scale_source"] == "sam3d-pose"
    assert sam3d_double.CALLS[-1]["seed"] == 3


def test_gpu_batch_exchanges_storage_keys_on_s3(s3, sam3d_double):
    """Segment then reconstruct two masks of one photo through S3 keys: one model load, one point map."""
    from sam3d_pipeline.gpu import stages as gpu_stages
    from sam3d_pipeline.gpu.stages import GpuBatch, ReconstructJobParam, SegmentJob, SegmentParams
    from sam3d_pipeline.masks import iou

    client, bucket = s3
    rgb, truth = object_photo(seed=3)
    client.put_object(Bucket=bucket, Key="photos/red thing.png", Body=encode(rgb))
    image = f"s3://{bucket}/photos/red thing.png"
    root = f"s3://{bucket}/outputs"
    prefix = "red-thing-0123456789ab"
    result = gpu_stages.run_gpu_batch(GpuBatch(output_root=root, segmenter="lite", segment=[
        SegmentJob(image=image, prefix=prefix, params=SegmentParams(prompt="red thing"))]))
    summary = result["segment"][0]
    assert summary["backend"]["name"] == "lite" and summary["instances"] and summary["selected"] == 0
    seg = gpu_stages.load_segmentation(root, prefix)
    assert iou(seg.instances[0].mask, truth) > 0.9
    assert seg.instances[0].area == summary["instances"][0]["area"]

    mask_key = summary["instances"][0]["mask"]
    jobs = [ReconstructJobParam(image=image, mask=mask_key, output=f"{prefix}/stages/reconstruct/{i}", seed=i)
            for i in range(2)]
    result = gpu_stages.run_gpu_batch(GpuBatch(output_root=root, reconstructor="sam3d", reconstruct=jobs))
    assert [r["stats"]["pointmap_reused"] for r in result["reconstruct"]] == [False, True]
    assert len(sam3d_double.INSTANCES) == 1 and sam3d_double.INSTANCES[0]._pipeline.pointmap_computations == 1
    assert result["timing"]["reconstruct"]["model_load_s"] > 0
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"outputs/{prefix}/")["Contents"]}
    for i in range(2):
        for name in ("object.glb", "object.ply", "reconstruction.json"):
            assert f"outputs/{prefix}/stages/reconstruct/{i}/{name}" in keys
    recon = gpu_stages.load_reconstruction(root, jobs[0].output)
    assert recon.backend.name == "sam3d" and recon.pose["rotation"] == [1.0, 0.0, 0.0, 0.0]
    assert len(recon.mesh.faces) > 0 and recon.splat_ply.startswith(b"ply\n")
    again = gpu_stages.run_gpu_batch(GpuBatch(output_root=root, reconstructor="sam3d", reconstruct=jobs[:1]))
    assert again["timing"]["reconstruct"]["model_load_s"] == 0.0  # the model stayed loaded in this process
