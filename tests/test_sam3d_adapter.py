"""The sam3d reconstructor against a double of SAM 3D Objects' inference API, and its output conversions.

Upstream's own classes, where they run on a CPU, are in ``test_sam3d_upstream.py``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
import yaml
from pydantic import ValidationError

from sam3d_pipeline import backends
from sam3d_pipeline.backends import sam3d_reconstructor as adapter
from sam3d_pipeline.errors import BackendUnavailableError, InputError
from sam3d_pipeline.export.glb import glb_to_mesh, mesh_to_glb
from sam3d_pipeline.settings import Settings

from .photos import object_photo

DOUBLE_DIR = Path(__file__).parent / "sam3d_double"
ENV_VARS = ("LIDRA_SKIP_INIT", "MPLBACKEND", "CUDA_HOME", "CONDA_PREFIX", "GRADIO_ANALYTICS_ENABLED")


@pytest.fixture
def sam3d(tmp_path, monkeypatch):
    """The double importable as ``inference``, a config with checkpoints beside it; yields the module."""
    for var in ENV_VARS:  # unset now, restored after the test (the adapter sets them)
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.syspath_prepend(str(DOUBLE_DIR))
    monkeypatch.delitem(sys.modules, "inference", raising=False)
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for name in ("ss_generator.ckpt", "slat_generator.ckpt"):
        (ckpt / name).write_bytes(b"weights")
    config = {
        "_target_": "sam3d_objects.pipeline.inference_pipeline_pointmap.InferencePipelinePointMap",
        "ss_generator_ckpt_path": "ss_generator.ckpt",
        "slat_generator_ckpt_path": "slat_generator.ckpt",
        "depth_model": {"_target_": "moge.model.MoGeModel", "path": "${workspace}/moge.pt"},
        "dtype": "float32",
        "clip_pointmap_beyond_scale": 3.0,
    }
    (ckpt / "pipeline.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("SAM3D_SAM3D_CONFIG_PATH", str(ckpt / "pipeline.yaml"))
    empties = []
    monkeypatch.setattr(adapter, "_empty_cuda_cache", lambda: empties.append(1))
    adapter._import_inference()  # the one place that prepares the import (the double needs CONDA_PREFIX)
    inference = sys.modules["inference"]

    inference.CALLS.clear()
    inference.INSTANCES.clear()
    inference.empties = empties
    yield inference


def _settings(**kw) -> Settings:
    return Settings(**kw)


def test_reconstruct_returns_our_types_with_backend_and_pose(sam3d):
    rgb, mask = object_photo()
    rec = adapter.Sam3dReconstructor(_settings())
    recon = rec.reconstruct(rgb, mask, seed=7)
    assert recon.backend.name == "sam3d" and recon.backend.weights == "checkpoint"
    # What the loaded pipeline really uses: the config's dtype (float32 in this fixture), its device.
    assert recon.backend.dtype == "float32" and recon.backend.device == "cuda"
    assert recon.stats["splat_frame"] == "sam3d-object-z-up"  # object.ply's frame, recorded in result.json
    assert isinstance(recon.mesh, trimesh.Trimesh) and len(recon.mesh.faces) > 0
    assert recon.pose["rotation"] == [1.0, 0.0, 0.0, 0.0]  # the double's (2, 0, 0, 0), normalised
    assert len(recon.pose["translation"]) == 3 and len(recon.pose["scale"]) == 3
    header = adapter.ply_header(recon.splat_ply)
    assert header["format"] == "binary_little_endian"
    assert header["properties"][:3] == ["x", "y", "z"] and "opacity" in header["properties"]
    assert recon.stats["splat_points"] == len(recon.mesh.vertices)
    assert sam3d.CALLS == [{"seed": 7, "pointmap_given": True, "mask_area": int(mask.sum()), "mask_dtype": "bool"}]
    # Import-time expectations of notebook/inference.py were met in one place.
    assert os.environ["LIDRA_SKIP_INIT"] == "true" and os.environ["MPLBACKEND"] == "Agg"
    assert os.environ["CONDA_PREFIX"]


def test_settings_reach_the_pipeline_config_and_originals_are_kept(sam3d):
    rgb, mask = object_photo()
    settings = _settings(sam3d_dtype="bfloat16", sam3d_ss_steps=12, sam3d_slat_steps=9)
    recon = adapter.Sam3dReconstructor(settings).reconstruct(rgb, mask)
    [instance] = sam3d.INSTANCES
    used = Path(instance.config_file)
    assert used.parent == Path(settings.sam3d_config_path).parent  # relative checkpoint paths still resolve
    config = yaml.safe_load(used.read_text())
    assert config["dtype"] == "bfloat16" and config["ss_inference_steps"] == 12
    assert config["slat_inference_steps"] == 9 and config["decode_formats"] == ["gaussian", "mesh"]
    assert config["depth_model"]["path"] == "${workspace}/moge.pt"  # interpolations untouched
    assert "device" not in config  # default mode: upstream's own placement
    assert recon.backend.dtype == "bfloat16"


@pytest.mark.parametrize(("quality", "steps", "distilled"), [("fast", (4, 4), True), ("balanced", (25, 25), False),
                                                             ("best", (50, 50), False)])
def test_quality_maps_onto_upstreams_steps_and_distilled_samplers(sam3d, quality, steps, distilled):
    sam3d.RUN_OPTIONS.clear()
    settings = _settings(sam3d_quality=quality, sam3d_compile=quality == "best")
    recon = adapter.Sam3dReconstructor(settings).reconstruct(*object_photo())
    [instance] = sam3d.INSTANCES
    config = yaml.safe_load(Path(instance.config_file).read_text())
    assert (config["ss_inference_steps"], config["slat_inference_steps"]) == steps
    assert instance._pipeline.config["compile_model"] is (quality == "best")  # Inference(config, compile=...)
    [options] = sam3d.RUN_OPTIONS
    if distilled:
        assert options["use_stage1_distillation"] is True and options["use_stage2_distillation"] is True
    else:
        assert "use_stage1_distillation" not in options and "use_stage2_distillation" not in options
    said = [limit for limit in recon.backend.limits if limit.startswith("quality")]
    assert bool(said) == (quality != "balanced")  # the result says when it is not upstream's default
    # Explicit steps win over the quality's.
    assert adapter.sampling(_settings(sam3d_quality="fast", sam3d_ss_steps=8)).ss_steps == 8


def test_dtype_is_the_configs_unless_set(sam3d):
    """The released pipeline.yaml says float16 (its generators use_fp16): an unset dtype must not override it."""
    assert Settings().sam3d_dtype is None
    rec = adapter.Sam3dReconstructor(_settings())
    assert rec.info().dtype is None  # before loading: nothing claimed
    rec.reconstruct(*object_photo())
    config = yaml.safe_load(Path(sam3d.INSTANCES[0].config_file).read_text())
    assert config["dtype"] == "float32"  # the fixture config's, untouched
    assert rec.info().dtype == "float32"


def test_a_0_255_mask_reaches_upstream_as_bool(sam3d):
    """Upstream computes mask.astype(np.uint8) * 255: a 0/255 uint8 mask would become alpha 1."""
    rgb, mask = object_photo()
    recon = adapter.Sam3dReconstructor(_settings()).reconstruct(rgb, mask.astype(np.uint8) * 255)
    assert sam3d.CALLS[-1]["mask_dtype"] == "bool" and sam3d.CALLS[-1]["mask_area"] == int(mask.sum())
    assert len(recon.mesh.faces) > 0
    wrapped = sam3d.Inference.merge_mask_to_rgba(None, rgb, mask.astype(np.uint8) * 255)[..., 3]
    assert set(np.unique(wrapped).tolist()) == {0, 1}  # what upstream would have seen without the conversion


def test_decode_formats_without_both_are_refused_at_settings():
    """Mesh alone raises KeyError upstream (to_glb reads outputs["gaussian"]); gaussian alone makes no GLB."""
    with pytest.raises(ValidationError, match=r"to_glb reads outputs\['gaussian'\]"):
        _settings(sam3d_decode_formats=("mesh",))
    with pytest.raises(ValidationError, match="no GLB"):
        _settings(sam3d_decode_formats=("gaussian",))
    assert _settings(sam3d_decode_formats=("mesh", "gaussian")).sam3d_decode_formats == ("mesh", "gaussian")


def test_double_fails_like_upstream_on_mesh_only(sam3d):
    """What the settings check prevents (settings built without validation reach the pipeline as they are)."""
    rgb, mask = object_photo()
    settings = Settings.model_construct(**(_settings().model_dump() | {"sam3d_decode_formats": ("mesh",)}))
    with pytest.raises(KeyError, match="gaussian"):
        adapter.Sam3dReconstructor(settings).reconstruct(rgb, mask)


def test_info_reports_the_checkpoint_digest_from_the_manifest(sam3d, tmp_path, monkeypatch):
    entries = [{"path": "sam-3d-objects/ss_generator.ckpt", "size": 7, "sha256": "a" * 64},
               {"path": "sam-3d-objects/pipeline.yaml", "size": 9, "sha256": "b" * 64},
               {"path": "sam3/sam3.pt", "size": 5, "sha256": "c" * 64}]
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "files": entries}))
    monkeypatch.setenv("SAM3D_CHECKPOINT_DIR", str(tmp_path))
    rec = adapter.Sam3dReconstructor(_settings())
    assert rec.info().checkpoint_sha256 is None  # not loaded: not claimed
    recon = rec.reconstruct(*object_photo())
    lines = "".join(sorted(f"{e['path']} {e['sha256']}\n" for e in entries if e["path"].startswith("sam-3d-objects/")))
    assert recon.backend.checkpoint_sha256 == hashlib.sha256(lines.encode()).hexdigest()[:12]
    assert recon.backend.as_dict()["checkpoint_sha256"] == recon.backend.checkpoint_sha256
    # A declared identity names the version; weights that differ from it are refused at load.
    digest = hashlib.sha256(lines.encode()).hexdigest()
    assert adapter.Sam3dReconstructor(_settings(sam3d_checkpoint_sha256=digest)).info().version.endswith(digest[:12])
    with pytest.raises(BackendUnavailableError, match="not the declared"):
        adapter.Sam3dReconstructor(_settings(sam3d_checkpoint_sha256="f" * 64)).load_model()
    (tmp_path / "manifest.json").unlink()
    assert adapter.checkpoint_digest(_settings()) is None


def test_batch_loads_once_and_computes_one_point_map_per_photo(sam3d):
    rgb_a, mask_a = object_photo(seed=1)
    rgb_b, mask_b = object_photo(seed=2)
    half = mask_a.copy()
    half[:, : mask_a.shape[1] // 2] = False
    jobs = [
        adapter.ReconstructJob(rgb_a, mask_a, photo_id="a"),
        adapter.ReconstructJob(rgb_a, half, photo_id="a"),
        adapter.ReconstructJob(rgb_b, mask_b, photo_id="b"),
    ]
    rec = adapter.Sam3dReconstructor(_settings())
    out = rec.reconstruct_batch(jobs)
    assert len(sam3d.INSTANCES) == 1
    assert sam3d.INSTANCES[0]._pipeline.pointmap_computations == 2
    assert [r.stats["pointmap_reused"] for r in out] == [False, True, False]
    # The shared point map was computed unclipped; clipping stays configured for per-mask calls.
    assert sam3d.INSTANCES[0]._pipeline.clip_pointmap_beyond_scale == 3.0
    assert out[0].pose["translation"] != out[1].pose["translation"]


def test_bad_job_is_refused_before_the_model_loads(sam3d):
    rgb, mask = object_photo()
    with pytest.raises(InputError, match="job 1 .*mask is empty"):
        adapter.Sam3dReconstructor(_settings()).reconstruct_batch(
            [adapter.ReconstructJob(rgb, mask, "p"), adapter.ReconstructJob(rgb, np.zeros_like(mask), "p")]
        )
    assert sam3d.INSTANCES == []


def test_low_memory_puts_only_the_running_stage_on_the_gpu(sam3d):
    rgb, mask = object_photo()
    rec = adapter.Sam3dReconstructor(_settings(sam3d_low_memory=True))
    rec.reconstruct(rgb, mask)
    pipeline = sam3d.INSTANCES[0]._pipeline
    # Built on the CPU (upstream places networks while building), inputs sent to the GPU afterwards.
    config = yaml.safe_load(Path(sam3d.INSTANCES[0].config_file).read_text())
    assert config["device"] == "cpu" and config["depth_model"]["device"] == "cpu"
    assert str(pipeline.device) == "cuda"
    seen = [name for name, _ in pipeline.stage_devices]
    assert seen == ["compute_pointmap", "sample_sparse_structure", "sample_slat", "decode_slat"]
    for stage, devices in pipeline.stage_devices:
        wanted = {p.rsplit(".", 1)[-1] for p in adapter.STAGE_MODULES[stage]}
        on_gpu = {name for name, device in devices.items() if device == "cuda"}
        assert on_gpu == wanted, stage
    assert all(m.device == "cpu" for m in pipeline.models.values())  # everything back off the GPU
    assert pipeline.depth_model.model.device == "cpu" and str(pipeline.depth_model.device) == "cpu"
    assert len(sam3d.empties) >= 5  # once after offloading, once after each stage
    assert "low-memory" in " ".join(rec.info().limits) and rec.info().device == "cuda"


def test_low_memory_lowers_the_load_time_peak(sam3d, monkeypatch):
    """A GPU with room for 4 resident networks: upstream's default placement fails while building; low-memory
    mode builds on the CPU and never holds more than one stage's networks."""
    monkeypatch.setenv("SAM3D_DOUBLE_GPU_MODULES_MAX", "4")
    with pytest.raises(RuntimeError, match="out of memory"):
        adapter.Sam3dReconstructor(_settings()).load_model()
    recon = adapter.Sam3dReconstructor(_settings(sam3d_low_memory=True)).reconstruct(*object_photo())
    assert len(recon.mesh.faces) > 0


def test_double_import_fails_like_upstream_without_conda(monkeypatch):
    """Importing inference.py outside conda raises KeyError upstream: the adapter must set CONDA_PREFIX first."""
    for var in ENV_VARS:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.syspath_prepend(str(DOUBLE_DIR))
    monkeypatch.delitem(sys.modules, "inference", raising=False)
    with pytest.raises(KeyError, match="CONDA_PREFIX"):
        import inference  # noqa: F401
    monkeypatch.delitem(sys.modules, "inference", raising=False)
    assert adapter._import_inference().__name__ == "Inference"
    assert os.environ["CUDA_HOME"] == os.environ["CONDA_PREFIX"]


def test_missing_package_says_what_to_use(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.delitem(sys.modules, "inference", raising=False)
    monkeypatch.setattr(adapter, "INFERENCE_MODULE", "sam3d_inference_not_installed")
    with pytest.raises(BackendUnavailableError, match="gpu_worker image"):
        adapter._import_inference()


def test_missing_config_names_the_file(sam3d, tmp_path):
    rgb, mask = object_photo()
    rec = adapter.Sam3dReconstructor(_settings(sam3d_config_path=str(tmp_path / "nope.yaml")))
    with pytest.raises(BackendUnavailableError, match="nope.yaml not found"):
        rec.reconstruct(rgb, mask)


# -- conversions on real objects --------------------------------------------------------------------------
def test_trimesh_mesh_to_glb_keeps_geometry_and_vertex_colours():
    mesh = trimesh.creation.box(extents=(1.0, 2.0, 0.5))
    colours = np.tile([200, 30, 10, 255], (len(mesh.vertices), 1)).astype(np.uint8)
    mesh.visual.vertex_colors = colours
    glb = mesh_to_glb(adapter.mesh_from_output(mesh), reconstructor="sam3d@x")
    assert glb[:4] == b"glTF"
    back = glb_to_mesh(glb)
    assert isinstance(back, trimesh.Trimesh)
    assert np.allclose(sorted(back.extents), sorted(mesh.extents))
    assert np.array_equal(np.asarray(back.visual.vertex_colors)[:, :3], colours[: len(back.vertices), :3])


def test_scene_is_flattened_and_empty_mesh_refused():
    scene = trimesh.Scene([trimesh.creation.box(), trimesh.creation.icosphere()])
    assert isinstance(adapter.mesh_from_output(scene), trimesh.Trimesh)
    with pytest.raises(BackendUnavailableError):
        adapter.mesh_from_output(trimesh.Trimesh())


def test_splat_to_ply_bytes_round_trips_positions(sam3d):
    Gaussian = sam3d.Gaussian
    xyz = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    data = adapter.splat_to_ply_bytes(Gaussian(xyz, np.full((50, 3), 128.0)))
    cloud = trimesh.load(io.BytesIO(data), file_type="ply")
    assert np.allclose(np.asarray(cloud.vertices), xyz, atol=1e-6)
    assert adapter.ply_vertex_count(data) == 50


def test_splat_without_gaussian_fields_is_refused(tmp_path):
    class PointsOnly:
        def save_ply(self, path):
            trimesh.PointCloud(np.zeros((3, 3))).export(path)

    with pytest.raises(BackendUnavailableError, match="lacks Gaussian fields"):
        adapter.splat_to_ply_bytes(PointsOnly())


def test_pose_to_json_from_arrays_and_errors():
    pose = adapter.pose_to_json(np.array([[0.0, 0.0, 0.0, 3.0]]), np.array([[1, 2, 3]]), [0.5, 0.5, 0.5])
    assert pose == {"rotation": [0.0, 0.0, 0.0, 1.0], "translation": [1.0, 2.0, 3.0], "scale": [0.5, 0.5, 0.5]}
    import json

    assert json.loads(json.dumps(pose)) == pose
    with pytest.raises(BackendUnavailableError, match="translation"):
        adapter.pose_to_json([1, 0, 0, 0], [1, 2], [1, 1, 1])
    with pytest.raises(BackendUnavailableError, match="zero rotation"):
        adapter.pose_to_json([0, 0, 0, 0], [1, 2, 3], [1, 1, 1])
    with pytest.raises(BackendUnavailableError, match="scale"):
        adapter.pose_to_json([1, 0, 0, 0], [1, 2, 3], [np.nan, 1, 1])


def test_workers_mode_resolves_gpu_backends_without_their_packages(monkeypatch):
    settings = _settings(gpu_stages="workers")
    resolved = backends.resolve("reconstructor", "auto", settings)
    assert resolved.name == "sam3d" and "GPU workers" in resolved.reason
    assert backends.describe("reconstructor", "sam3d", settings).name == "sam3d"  # no build, no torch
    assert backends.get_reconstructor("sam3d", settings).info().name == "sam3d"  # cheap: no torch, no model
    assert backends.resolve("reconstructor", "lite", settings).name == "lite"
    from dataclasses import replace

    missing = replace(backends.SEGMENTERS["lite"], target="sam3d_pipeline.backends.not_built:Nope", describe=None)
    monkeypatch.setitem(backends.SEGMENTERS, "sam3", missing)
    with pytest.raises(BackendUnavailableError, match="not part of this build"):
        backends.resolve("segmenter", "auto", settings)
    with pytest.raises(BackendUnavailableError, match="unknown"):
        backends.resolve("reconstructor", "nerf", settings)
    # In-process, sam3d cannot run on this machine (no torch/CUDA): refused with the reason.
    with pytest.raises(BackendUnavailableError, match="sam3d"):
        backends.resolve("reconstructor", "sam3d", _settings())


def test_sam3d_settings_that_change_the_output_change_the_prefix(monkeypatch):
    from sam3d_pipeline.run import pipeline

    options = pipeline.RunOptions(prompt="chair", segmenter="lite", reconstructor="sam3d")

    def prefix(**kw):
        settings = _settings(gpu_stages="workers", **kw)  # resolves sam3d without its packages
        return pipeline.plan("photos/chair.jpg", "sha256:abc", options, "out", settings).prefix

    base = prefix()
    assert prefix(sam3d_ss_steps=12) != base and prefix(sam3d_dtype="float32") != base
    # Upstream's default steps stated outright keep the key; another quality changes it.
    assert prefix(sam3d_ss_steps=25, sam3d_slat_steps=25, sam3d_quality="balanced") == base
    assert prefix(sam3d_quality="fast") != base and prefix(sam3d_quality="best") != base
    assert prefix(sam3d_low_memory=True) == base  # same result, only slower


def test_three_objects_of_a_photo_keep_their_own_pose_into_the_scene(sam3d):
    from sam3d_pipeline import export
    from sam3d_pipeline.run import objects
    from sam3d_pipeline.types import Instance

    from .photos import three_objects_photo

    rgb, masks, boxes = three_objects_photo()
    settings = _settings(export_check_usdz=False)
    recons, _ = objects.reconstruct_together(type("Photo", (), {"rgb": rgb})(), dict(enumerate(masks)), 3,
                                             "photo", "sam3d", settings)
    assert sam3d.INSTANCES[-1]._pipeline.pointmap_computations == 1  # one point map for the photo's objects
    assert [c["mask_area"] for c in sam3d.CALLS] == [int(m.sum()) for m in masks]
    translations = [recons[i].pose["translation"] for i in range(3)]
    assert len({tuple(t) for t in translations}) == 3  # each object's own pose, not the first one's
    instances = [Instance(mask=m, box=tuple(map(float, b)), score=0.9) for m, b in zip(masks, boxes, strict=True)]
    out = objects.export_objects(instances, recons, 0, (rgb.shape[1], rgb.shape[0]), profile="web",
                                 formats=["glb", "ply"], settings=settings)
    assert out.scene["layout"] == "reconstructor-pose"
    assert [o["pose"] for o in out.objects] == [recons[i].pose for i in range(3)]
    assert all(o["scale_source"] == "sam3d-pose" for o in out.objects)
    assert {f"objects/{i}/object.ply" for i in range(3)} <= set(out.files)  # each object's splat
    _, meshes = export.read_glb(out.files["scene.glb"])
    centres = np.array([m.vertices.mean(0) for m in meshes])
    # The double puts each object at its mask's image centre (camera x to the left): the scene keeps the photo's
    # left-to-right order, with every object at a distinct place.
    assert centres[0][0] < centres[1][0] < centres[2][0]
    assert min(np.linalg.norm(centres[i] - centres[j]) for i in range(3) for j in range(i + 1, 3)) > 0.05


def test_smoke_profile_stages_times_each_stage_and_restores_the_pipeline(sam3d, monkeypatch):
    """bench/gpu.py and gpu_worker/smoke.py time SAM 3D Objects' stages with it (over the low-memory wrappers)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "gpu_worker"))
    from smoke import profile_stages

    peaks = iter(range(1, 100))
    fake_cuda = type("Cuda", (), {"synchronize": staticmethod(lambda: None),
                                  "reset_peak_memory_stats": staticmethod(lambda: None),
                                  "max_memory_allocated": staticmethod(lambda: next(peaks) * 2**30)})
    rec = adapter.Sam3dReconstructor(_settings(sam3d_low_memory=True))
    rec.load_model()
    pipeline = rec._inference._pipeline
    staged = pipeline.sample_slat  # the offloader's wrapper
    with profile_stages(pipeline, type("Torch", (), {"cuda": fake_cuda})) as stages:
        rec.reconstruct(*object_photo())
    assert list(stages) == ["compute_pointmap", "sample_sparse_structure", "sample_slat", "decode_slat"]
    assert stages["compute_pointmap"]["calls"] == 2  # the shared point map, then run()'s pass with it given
    assert all(row["s"] >= 0 and row["peak_gib"] >= 1 for row in stages.values())
    assert pipeline.sample_slat is staged and "compute_pointmap" in vars(pipeline)  # wrappers restored
    assert [name for name, _ in pipeline.stage_devices][-1] == "decode_slat"  # the stages still moved networks

