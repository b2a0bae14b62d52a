"""The sam3d adapter against SAM 3D Objects' own classes (cf06676) where they run on a CPU.

Upstream's files come from PyPI ``sam3d==0.1.2`` (a dev dependency), copied into a temporary folder only where
their sha256 equals upstream's at cf06676 (``tests/sam3d_double/upstream.py``). What runs for real here: the
MoGe depth-model wrapper, ``InferencePipeline.__init__``'s device placement and checkpoint loading,
``decode_slat`` + ``postprocess_slat_output`` (the output dict, and the KeyError of a mesh-only decode), and
DINOv2's ``torch.hub.load`` in ``Dino.__init__``. The networks are tiny ones of our own
(``tests/sam3d_double/networks.py``); third-party packages that need CUDA are stubbed.
"""

from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
import yaml
from pydantic import ValidationError

from sam3d_pipeline.backends import sam3d_reconstructor as adapter
from sam3d_pipeline.errors import BackendUnavailableError
from sam3d_pipeline.settings import Settings

pytest.importorskip("hydra", reason="hydra-core is a dev dependency (upstream builds its pipeline with it)")
pytest.importorskip("loguru", reason="loguru is a dev dependency (upstream logs with it)")

DOUBLE_DIR = Path(__file__).parent / "sam3d_double"
sys.path.insert(0, str(DOUBLE_DIR))
import upstream  # noqa: E402  (tests/sam3d_double/upstream.py)

sys.path.remove(str(DOUBLE_DIR))


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """Upstream's verified modules, imported; removed from ``sys.modules`` after this file's tests."""
    if upstream.package_root() is None:
        pytest.skip(f"{upstream.PACKAGE} is not installed (pip install -e '.[dev]')")
    dest = tmp_path_factory.mktemp("upstream")
    report = upstream.assemble(dest)
    with upstream.imported(dest) as modules:
        modules.report = report
        yield modules


def test_the_package_is_upstream_at_cf06676_where_we_use_it(up):
    report = up.report
    assert report["absent"] == []
    assert set(report["left_out"]) == upstream.PACKAGE_CHANGED  # a new package release would show up here
    assert len(report["verified"]) == len(upstream.expected_hashes()) - len(upstream.PACKAGE_CHANGED) == 102
    for module in (up.inference_pipeline, up.moge, up.depth_base, up.dino):
        rel = Path(module.__file__).as_posix().split("/sam3d_objects/", 1)[1]
        assert f"sam3d_objects/{rel}" in report["verified"]


def test_the_double_mirrors_upstreams_defaults(up):
    """Each default the double copies, read from upstream's signatures (not from our assumptions)."""
    init = inspect.signature(up.inference_pipeline.InferencePipeline.__init__).parameters
    assert init["device"].default == "cuda" and init["dtype"].default == "bfloat16"
    assert init["decode_formats"].default == ["gaussian", "mesh"]
    assert inspect.signature(up.depth_base.DepthModel.__init__).parameters["device"].default == "cuda"
    assert not hasattr(up.moge.MoGe, "to")  # a plain wrapper: the network is .model
    assert inspect.signature(up.dino.Dino.__init__).parameters["source"].default == "github"
    double = (DOUBLE_DIR / "inference.py").read_text()
    assert "class MoGe:" in double and "def to(" not in double.split("class MoGe:")[1].split("class ")[0]


def test_the_quality_levers_are_upstreams_own_options(up):
    """SAM3D_SAM3D_QUALITY sets the two steps (InferencePipeline.__init__'s defaults are the balanced row) and
    passes run()'s distillation flags, which reach sample_sparse_structure / sample_slat."""
    pipeline = up.inference_pipeline.InferencePipeline
    init = inspect.signature(pipeline.__init__).parameters
    ss, slat, distilled = adapter.QUALITIES["balanced"]
    assert (init["ss_inference_steps"].default, init["slat_inference_steps"].default) == (ss, slat)
    assert not distilled and init["compile_model"].default is False
    run = inspect.signature(pipeline.run).parameters
    assert run["use_stage1_distillation"].default is False and run["use_stage2_distillation"].default is False
    for stage in (pipeline.sample_sparse_structure, pipeline.sample_slat):
        assert inspect.signature(stage).parameters["use_distillation"].default is False


class RecordingNet(torch.nn.Module):
    """MoGe's network: records where it is sent (this machine has no GPU to send it to)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        self.sent_to: list[str] = []

    def to(self, device):
        self.sent_to.append(str(device))
        return self

    def infer(self, image, force_projection=False):
        return {"points": image.permute(1, 2, 0)}


def test_low_memory_moves_upstreams_moge_wrapper(up):
    """The old offloader called depth_model.to(): upstream's wrapper has none (AttributeError at install)."""
    net = RecordingNet()
    depth_model = up.moge.MoGe(net, device="cpu")  # as the low-memory config builds it
    with pytest.raises(AttributeError):
        depth_model.to("cpu")
    seen = {}

    def compute_pointmap(image):
        seen["device"], seen["net"] = depth_model.device, net.sent_to[-1]
        return {"pointmap": image}

    pipeline = types.SimpleNamespace(depth_model=depth_model, compute_pointmap=compute_pointmap, models={},
                                     condition_embedders={})
    offloader = adapter.StageOffloader(pipeline, "cuda", lambda: None)
    offloader.install()
    pipeline.compute_pointmap("rgba")
    assert seen == {"device": torch.device("cuda"), "net": "cuda"}  # MoGe.__call__ sends inputs to .device
    assert net.sent_to[-1] == "cpu" and depth_model.device == torch.device("cpu")
    out = depth_model(torch.zeros(3, 4, 5))  # upstream's __call__ still works where it now lives
    assert out["pointmaps"].shape == (4, 5, 3)


def _tiny_checkpoint(folder: Path) -> Path:
    """A checkpoint folder in the HF layout (pipeline.yaml + one yaml and one checkpoint per network)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    linear = {"linear.weight": torch.ones(4, 4), "linear.bias": torch.zeros(4)}
    config: dict = {"_target_": "sam3d_objects.pipeline.inference_pipeline.InferencePipeline", "dtype": "float16",
                    "slat_mean": [0.0] * 8, "slat_std": [1.0] * 8, "decode_formats": ["gaussian", "mesh"]}
    for name in ("ss_generator", "slat_generator"):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"module": {
            "generator": {"backbone": {"_target_": "networks.TinyGenerator"}},
            "condition_embedder": {"backbone": {"_target_": "networks.TinyNet", "kind": "dinov2"}}}}))
        save_file({f"_base_models.generator.{k}": v.clone() for k, v in linear.items()}
                  | {f"_base_models.condition_embedder.{k}": v.clone() for k, v in linear.items()},
                  folder / f"{name}.safetensors")
    for name, kind in (("ss_decoder", "ss"), ("slat_decoder_gs", "gaussian"), ("slat_decoder_mesh", "mesh")):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"_target_": "networks.TinyNet", "kind": kind}))
        save_file(linear, folder / f"{name}.safetensors")
    for name in ("ss_generator", "slat_generator", "ss_decoder", "slat_decoder_gs", "slat_decoder_mesh"):
        config[f"{name}_config_path"] = f"{name}.yaml"
        config[f"{name}_ckpt_path"] = f"{name}.safetensors"
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(config))
    return folder / "pipeline.yaml"


@pytest.fixture
def build(up, tmp_path, monkeypatch):
    """``build(settings, safetensors_on_cpu=True)``: upstream's InferencePipeline from a tiny HF-layout folder,
    through our patched config, as ``notebook/inference.py`` instantiates it (hydra). Records the devices that
    upstream asked safetensors to load onto."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    monkeypatch.syspath_prepend(str(DOUBLE_DIR))  # hydra targets networks.TinyNet
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # L100 logs it
    config_path = _tiny_checkpoint(tmp_path / "sam-3d-objects")
    real_load_file = up.inference_pipeline.load_file
    asked: list[str] = []

    def load_file(path, device="cpu"):
        asked.append(str(device))
        if str(device) != "cpu":
            raise RuntimeError(f"asked to load {Path(path).name} onto {device}: no GPU here")
        return real_load_file(path, device=device)

    monkeypatch.setattr(up.inference_pipeline, "load_file", load_file)

    def run(settings: Settings, safetensors_on_cpu: bool = True):
        asked.clear()
        config = OmegaConf.load(adapter.patched_config(config_path, settings))
        config.workspace_dir = str(config_path.parent)  # notebook/inference.py L90
        with adapter.safetensors_on_cpu() if safetensors_on_cpu else adapter.contextlib.nullcontext():
            return instantiate(config), list(asked)

    run.config_path = config_path
    return run


def test_default_placement_builds_on_the_gpu_and_low_memory_builds_on_the_cpu(build):
    settings = Settings(sam3d_low_memory=True)
    # Upstream L272: safetensors load straight onto "cuda", whatever the pipeline's device.
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="onto cuda"):
        build(settings, safetensors_on_cpu=False)
    pipeline, asked = build(settings)
    assert asked and set(asked) == {"cpu"}
    assert pipeline.device == torch.device("cpu")
    networks = list(pipeline.models.values()) + list(pipeline.condition_embedders.values())
    assert len(networks) == 9 and all(p.device.type == "cpu" for n in networks if n is not None for p in n.parameters())
    assert str(pipeline.dtype) == "torch.float16"  # the config's dtype, no override
    assert torch.equal(pipeline.models["slat_decoder_gs"].linear.weight, torch.ones(4, 4))  # weights loaded
    # The offloader's stage paths resolve on upstream's own layout (ModuleDict models, dict condition_embedders).
    for stage in ("sample_sparse_structure", "sample_slat", "decode_slat"):
        found = [adapter._get_path(pipeline, p) for p in adapter.STAGE_MODULES[stage]]
        assert [type(m).__name__ for m in found if m is not None], stage
        assert all(isinstance(m, torch.nn.Module) for m in found if m is not None)
    assert {adapter._get_path(pipeline, p).kind for p in adapter.STAGE_MODULES["decode_slat"]
            if adapter._get_path(pipeline, p) is not None} == {"gaussian", "mesh"}
    moves = []
    offloader = adapter.StageOffloader(pipeline, "cpu", lambda: moves.append("empty"))
    offloader.install()
    out = pipeline.decode_slat(torch.zeros(1, 4), ["gaussian", "mesh"])  # upstream's decode_slat, staged
    assert {k: v[0].kind for k, v in out.items()} == {"mesh": "mesh", "gaussian": "gaussian"} and moves


def test_default_mode_leaves_upstreams_cuda_placement(build):
    config = yaml.safe_load(adapter.patched_config(build.config_path, Settings()).read_text())
    assert "device" not in config  # upstream's default: device="cuda" (checked in the signature test)


def test_upstream_output_dict_is_what_the_adapter_reads(build, up, monkeypatch):
    pipeline, _ = build(Settings(sam3d_low_memory=True))
    glb_inputs = []

    def to_glb(gaussian, mesh, **kwargs):
        glb_inputs.append((gaussian.kind, mesh.kind, kwargs["use_vertex_color"]))
        return trimesh.creation.box()

    monkeypatch.setattr(up.postprocessing_utils, "to_glb", to_glb)
    slat = torch.zeros(1, 4)
    outputs = pipeline.postprocess_slat_output(pipeline.decode_slat(slat, ["gaussian", "mesh"]), False, False, True)
    assert glb_inputs == [("gaussian", "mesh", True)]
    # What _to_reconstruction reads: "glb" (the mesh) and "gs" (the splat).
    assert isinstance(outputs["glb"], trimesh.Trimesh) and outputs["gs"].kind == "gaussian"
    # Mesh alone: upstream's own postprocess_slat_output reads outputs["gaussian"] (L543) → KeyError ...
    with pytest.raises(KeyError, match="gaussian"):
        pipeline.postprocess_slat_output(pipeline.decode_slat(slat, ["mesh"]), False, False, True)
    # ... so the settings refuse it before any model loads.
    with pytest.raises(ValidationError, match="gaussian"):
        Settings(sam3d_decode_formats=("mesh",))
    # Gaussian alone: no GLB (L557), refused too.
    assert pipeline.postprocess_slat_output(pipeline.decode_slat(slat, ["gaussian"]), False, False, True)["glb"] is None


HUBCONF = '''
dependencies = ["torch"]
import torch


class _Backbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_dim = 8
        self.patch_embed = torch.nn.Conv2d(3, 8, 14, 14)

    def forward_features(self, x):
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        return {"x_norm_clstoken": patches.mean(1), "x_norm_patchtokens": patches}


def dinov2_vitl14_reg(**kwargs):
    return _Backbone()
'''


def test_dinov2_loads_from_the_baked_hub_cache_not_github(up, tmp_path, monkeypatch):
    """Dino.__init__ (dino.py L35-41) calls torch.hub.load(..., source="github"): GitHub at every load."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def github(*args, **kwargs):
        raise RuntimeError("asked GitHub for facebookresearch/dinov2 (HTTP 403 rate limit)")

    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", github)
    with pytest.raises(RuntimeError, match="asked GitHub"):
        up.dino.Dino(dino_model="dinov2_vitl14_reg", input_size=14)  # upstream as it is
    with adapter.local_torch_hub(), pytest.raises(BackendUnavailableError, match="facebookresearch_dinov2_main"):
        up.dino.Dino(dino_model="dinov2_vitl14_reg", input_size=14)  # nothing baked: a clear error
    baked = adapter.dinov2_hub_dir()
    assert baked == tmp_path / "torch" / "hub" / "facebookresearch_dinov2_main"
    baked.mkdir(parents=True)
    (baked / "hubconf.py").write_text(HUBCONF)
    with adapter.local_torch_hub():
        dino = up.dino.Dino(dino_model="dinov2_vitl14_reg", input_size=14)
    assert dino.embed_dim == 8 and torch.hub.load.__module__ == "torch.hub"  # restored after the build
    tokens = dino(torch.rand(1, 3, 28, 28))
    assert tokens.shape == (1, 1 + 1, 8) and np.isfinite(tokens.numpy()).all()
