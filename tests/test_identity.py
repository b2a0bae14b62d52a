"""Which weights ran: checkpoint parts and identities, the declared identity that names output prefixes, and the
worker's own report in ``result.json`` (pure parts; the real worker session is in ``test_gpu_real_config``)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from sam3d_pipeline import checkpoints
from sam3d_pipeline.backends.sam3 import version as sam3_version
from sam3d_pipeline.errors import BackendUnavailableError, InputError
from sam3d_pipeline.gpu import stages as gpu_stages
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import BackendInfo


def _folder(tmp_path):
    files = {"sam3/sam3.pt": b"weights" * 100, "sam-3d-objects/pipeline.yaml": b"dtype: float16\n",
             "sam-3d-objects/ss_generator.ckpt": b"\x00" * 300, "torch/hub/dinov2.pth": b"d" * 50}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    manifest = checkpoints.build_manifest(tmp_path)
    (tmp_path / checkpoints.MANIFEST).write_text(json.dumps(manifest))
    return manifest["files"], files


def test_parts_select_whole_top_level_folders(tmp_path):
    files, _ = _folder(tmp_path)
    assert [e["path"] for e in checkpoints.select_parts(files, "sam3")] == ["sam3/sam3.pt"]
    assert {e["path"] for e in checkpoints.select_parts(files, "sam-3d-objects, torch")} == {
        "sam-3d-objects/pipeline.yaml", "sam-3d-objects/ss_generator.ckpt", "torch/hub/dinov2.pth"}
    assert checkpoints.select_parts(files, "") == files
    with pytest.raises(InputError, match="no files under sam4"):
        checkpoints.select_parts(files, "sam3,sam4")


def test_folder_digest_changes_with_any_file_of_the_folder_only(tmp_path):
    files, _ = _folder(tmp_path)
    digest = checkpoints.folder_digest(files, "sam-3d-objects")
    assert len(digest) == 64 and digest == checkpoints.folder_digest(list(reversed(files)), "sam-3d-objects/")
    other = [dict(e, sha256="0" * 64) if e["path"] == "sam3/sam3.pt" else e for e in files]
    assert checkpoints.folder_digest(other, "sam-3d-objects") == digest
    changed = [dict(e, sha256="1" * 64) if e["path"].endswith("ss_generator.ckpt") else e for e in files]
    assert checkpoints.folder_digest(changed, "sam-3d-objects") != digest


def test_declared_identities_and_the_manifest_sha(tmp_path):
    files, raw = _folder(tmp_path)
    lines = checkpoints.declared_identities(tmp_path)
    assert lines == [f"SAM3D_SAM3_CHECKPOINT_SHA256={hashlib.sha256(raw['sam3/sam3.pt']).hexdigest()}",
                     f"SAM3D_SAM3D_CHECKPOINT_SHA256={checkpoints.folder_digest(files, 'sam-3d-objects')}"]
    sha = checkpoints.manifest_sha256(tmp_path / "sam3/sam3.pt", tmp_path)
    assert sha == hashlib.sha256(raw["sam3/sam3.pt"]).hexdigest()
    assert checkpoints.manifest_sha256(tmp_path / "sam3/sam3.pt", None) is None
    (tmp_path / "sam3/sam3.pt").write_bytes(b"other size")  # not the file the manifest lists
    assert checkpoints.manifest_sha256(tmp_path / "sam3/sam3.pt", tmp_path) is None


def test_the_declared_sha_names_the_prefix_without_a_checkpoint():
    """An orchestrator with only the declared sha256 plans the same version as the worker holding the file."""
    sha = "c0ffee" + "0" * 58
    planned = sam3_version.describe(Settings(sam3_checkpoint_sha256=sha))
    on_worker = Settings(sam3_checkpoint="/opt/checkpoints/sam3/sam3.pt", sam3_checkpoint_sha256=sha)
    worker = sam3_version.describe(on_worker, "cuda", checkpoint_sha256=sha, dtype="float32")
    assert planned.version == worker.version == "sam3-0.1.4+c0ffee000000"
    assert planned.weights == worker.weights == "checkpoint"
    assert worker.as_dict()["checkpoint_sha256"] == "c0ffee000000" and worker.as_dict()["dtype"] == "float32"
    assert "checkpoint_sha256" not in planned.as_dict()
    # Nothing declared: random weights, and a worker with a checkpoint is another version (refused, below).
    assert sam3_version.describe(Settings()).version.endswith("+random-init")


def test_a_worker_running_other_weights_refuses_the_stage():
    ran = BackendInfo("sam3", "sam3-0.1.4+src-1234abcd", device="cuda", weights="checkpoint",
                      checkpoint_sha256="99aa00000000")
    gpu_stages.check_identity("segmenter", "sam3-0.1.4+src-1234abcd", ran)
    gpu_stages.check_identity("segmenter", None, ran)
    with pytest.raises(BackendUnavailableError) as caught:
        gpu_stages.check_identity("segmenter", "sam3-0.1.4+random-init", ran)
    assert "sam3-0.1.4+src-1234abcd" in str(caught.value) and "sam3-0.1.4+random-init" in str(caught.value)
    assert "99aa00000000" in str(caught.value) and not caught.value.transient


def test_a_checkpoint_other_than_the_declared_one_is_refused_where_it_loads(tmp_path):
    from sam3d_pipeline.backends.sam3.assets import resolve_checkpoint

    path = tmp_path / "sam3.pt"
    path.write_bytes(b"not the declared weights")
    real = hashlib.sha256(path.read_bytes()).hexdigest()
    assert resolve_checkpoint(Settings(sam3_checkpoint=str(path))).sha256 == real
    with pytest.raises(BackendUnavailableError, match=f"{real[:12]}.*declares {'ab' * 6}"):
        resolve_checkpoint(Settings(sam3_checkpoint=str(path), sam3_checkpoint_sha256="ab" * 32))


def test_the_report_names_what_the_worker_ran(tmp_path):
    """``result.json``'s backends come from the stage's own report, over the plan (which keeps why it chose)."""
    from sam3d_pipeline.run import finish, pipeline
    from sam3d_pipeline.types import Instance, Segmentation

    sha = "ab" * 32
    settings = Settings(sam3_checkpoint_sha256=sha, gpu_stages="workers")
    options = pipeline.RunOptions(prompt="cup", segmenter="sam3", reconstructor="lite")
    plan = pipeline.plan("s3://b/cup.png", "sha256:" + "0" * 64, options, str(tmp_path), settings)
    worker = BackendInfo("sam3", plan.segmenter_info["version"], device="cuda:0", weights="checkpoint",
                         checkpoint_sha256=sha[:12], dtype="float32")
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    record = finish.RunRecord(input_uri="s3://b/cup.png", options=options)
    record.run_plan = plan
    record.seg = Segmentation([Instance(mask=mask, box=(2, 2, 5, 5), score=0.9)], worker, used_text_prompt=True)
    result = finish.build_result(record, "no_object")
    assert result.segmenter["device"] == "cuda:0" and result.segmenter["checkpoint_sha256"] == sha[:12]
    assert result.segmenter["dtype"] == "float32" and "GPU workers" in result.segmenter["chosen_because"]
