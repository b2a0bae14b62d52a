"""A test double of SAM 3D Objects' ``notebook/inference.py`` (the package needs CUDA; it cannot install here).

It follows the real interface read at facebookresearch/sam-3d-objects @ cf066761706cd02b07e2fc6274570ec8cdafb683
(main, the commit gpu_worker/sam3d.Dockerfile pins):
- ``notebook/inference.py``: at import it runs ``os.environ["CUDA_HOME"] = os.environ["CONDA_PREFIX"]`` (copied
  here as behaviour: importing without ``CONDA_PREFIX`` fails); ``Inference(config_file, compile=False)`` loads
  the config (checkpoint paths relative to its folder) into ``self._pipeline``; ``__call__(image, mask,
  seed=None, pointmap=None)`` merges the mask into an RGBA image and returns ``self._pipeline.run(...)``'s dict.
- ``sam3d_objects/pipeline/inference_pipeline_pointmap.py``: ``compute_pointmap(rgba, pointmap=None)`` returns
  ``{"pointmap": (3, H, W), ...}`` and clips by the alpha mask when ``clip_pointmap_beyond_scale`` is set;
  ``run`` calls ``compute_pointmap``, ``sample_sparse_structure``, ``sample_slat``, ``decode_slat`` in that
  order and returns ``rotation`` (1x4, wxyz), ``translation`` (1x3), ``scale`` (1x3) and the decoded outputs.
- ``sam3d_objects/pipeline/inference_pipeline.py``: networks live in ``models`` (ModuleDict),
  ``condition_embedders`` (dict); outputs hold ``glb`` (``trimesh.Trimesh``, vertex colours) and
  ``gs = gaussian[0]``; config keys ``dtype``, ``ss_inference_steps``, ``slat_inference_steps``,
  ``decode_formats``.
- ``sam3d_objects/model/backbone/tdfy_dit/representations/gaussian/gaussian_model.py``: ``save_ply`` writes
  one binary little-endian ``vertex`` element of float32 ``x y z nx ny nz f_dc_0..2 opacity scale_0..2
  rot_0..3`` (with plyfile).

What runs here for real instead (``tests/test_sam3d_upstream.py``, upstream's own files from PyPI ``sam3d==0.1.2``
checked byte for byte against cf06676): the MoGe wrapper, ``InferencePipeline.__init__``'s device placement,
``decode_slat``/``postprocess_slat_output`` and DINOv2's ``torch.hub.load``. This double keeps what cannot run
here (``notebook/inference.py`` imports gradio and kaolin; ``inference_pipeline_pointmap.py`` needs pytorch3d and
the package's copy of it differs from upstream), and each behaviour below cites the upstream line it mirrors.

It does no learning: the "reconstruction" is an ellipsoid spanning the mask's box, coloured from the photo,
so tests can check that inputs reach the model and outputs come back converted.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["CUDA_HOME"] = os.environ["CONDA_PREFIX"]  # notebook/inference.py L5: KeyError outside conda
os.environ["LIDRA_SKIP_INIT"] = "true"  # L6

import numpy as np
import trimesh
import yaml

CALLS: list[dict] = []  # every __call__, for assertions
RUN_OPTIONS: list[dict] = []  # the keyword options of every pipeline.run
INSTANCES: list[Inference] = []


class Module:
    """Stands in for a torch module: remembers the device it was moved to."""

    def __init__(self, name: str, device: str = "cuda"):
        self.name = name
        self.device = device
        self.moves: list[str] = []

    def to(self, device):
        self.device = str(device)
        self.moves.append(self.device)
        return self


class MoGe:
    """Upstream's depth-model wrapper (``sam3d_objects/pipeline/depth_models/base.py`` L5-10, ``moge.py``): a plain
    class, no ``.to()``; it moves ``.model`` to ``device`` (default ``"cuda"``) when built and sends inputs to
    ``.device`` when called."""

    def __init__(self, model, device="cuda"):
        self.model = model
        self.device = str(device)
        self.model.to(self.device)


class PointMap:
    """A (3, H, W) array with torch's ``permute`` (what ``compute_pointmap`` returns)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def permute(self, *dims):
        return PointMap(np.transpose(self.array, dims))

    @property
    def shape(self):
        return self.array.shape


class Gaussian:
    """Writes the 3DGS PLY layout that the real ``Gaussian.save_ply`` writes."""

    FIELDS = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
              "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]

    def __init__(self, xyz: np.ndarray, colours: np.ndarray):
        self.xyz = xyz.astype(np.float32)
        self.colours = colours.astype(np.float32)

    def save_ply(self, path):
        n = len(self.xyz)
        data = np.zeros((n, len(self.FIELDS)), np.float32)
        data[:, 0:3] = self.xyz
        data[:, 6:9] = (self.colours / 255.0 - 0.5) / 0.28209479  # SH DC term
        data[:, 9] = 2.0  # logit opacity
        data[:, 10:13] = np.log(0.01)
        data[:, 13] = 1.0  # identity rotation
        header = "ply\nformat binary_little_endian 1.0\n" + f"element vertex {n}\n"
        header += "".join(f"property float {f}\n" for f in self.FIELDS) + "end_header\n"
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(header.encode("ascii"))
            fh.write(data.astype("<f4").tobytes())


class Pipeline:
    """The parts of ``InferencePipelinePointMap`` the adapter touches."""

    def __init__(self, config: dict, workspace_dir: str):
        self.config = config
        self.workspace_dir = workspace_dir
        for key in ("ss_generator_ckpt_path", "slat_generator_ckpt_path"):
            ckpt = Path(workspace_dir) / config[key]
            if not ckpt.is_file():
                raise FileNotFoundError(ckpt)
        # inference_pipeline.py L69 (dtype="bfloat16" default), L119 (_get_dtype), L68 (decode_formats default).
        self.dtype = {"bfloat16": "torch.bfloat16", "float16": "torch.float16",
                      "float32": "torch.float32"}[config.get("dtype", "bfloat16")]
        self.decode_formats = config.get("decode_formats", ["gaussian", "mesh"])
        self.clip_pointmap_beyond_scale = config.get("clip_pointmap_beyond_scale")
        # L72 device="cuda" default, L96 self.device, L288 model.to(device): networks are placed while building.
        self.device = config.get("device", "cuda")
        names = ["ss_generator", "slat_generator", "ss_encoder", "ss_decoder", "slat_decoder_gs",
                 "slat_decoder_gs_4", "slat_decoder_mesh"]
        self.models = {n: Module(n, self.device) for n in names}
        self.condition_embedders = {n: Module(n, self.device)
                                    for n in ("ss_condition_embedder", "slat_condition_embedder")}
        depth = config.get("depth_model") or {}
        self.depth_model = MoGe(Module("moge"), device=depth.get("device", "cuda"))  # hydra-built before L96
        self._devices()  # a small GPU runs out of memory at load when everything is built on it
        self.pointmap_computations = 0
        self.stage_devices: list[tuple[str, dict[str, str]]] = []

    def _devices(self) -> dict[str, str]:
        out = {n: m.device for n, m in self.models.items()}
        out |= {n: m.device for n, m in self.condition_embedders.items()}
        out["depth_model"] = self.depth_model.model.device
        budget = os.environ.get("SAM3D_DOUBLE_GPU_MODULES_MAX")  # a small GPU: too many resident networks → OOM
        resident = sum(device == "cuda" for device in out.values())
        if budget is not None and resident > int(budget):
            raise RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({resident} networks resident, "
                               f"room for {budget})")
        return out

    def compute_pointmap(self, image, pointmap=None):  # inference_pipeline_pointmap.py L242-289
        if pointmap is None:
            self.pointmap_computations += 1
            self.stage_devices.append(("compute_pointmap", self._devices()))
            h, w = image.shape[:2]
            ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
            pm = np.stack([xs / w - 0.5, ys / h - 0.5, np.ones_like(xs)], axis=0)
            if self.clip_pointmap_beyond_scale is not None:
                pm[:, image[..., 3] == 0] = np.nan  # L273-274 _clip_pointmap: depends on the mask (not shareable)
            return {"pointmap": PointMap(pm), "intrinsics": None}
        return {"pointmap": pointmap.permute(2, 0, 1)}  # L262 + L273: an (H, W, 3) point map given, (3, H, W) out

    def sample_sparse_structure(self, *args, **kwargs):
        self.stage_devices.append(("sample_sparse_structure", self._devices()))

    def sample_slat(self, *args, **kwargs):
        self.stage_devices.append(("sample_slat", self._devices()))

    def decode_slat(self, *args, **kwargs):
        self.stage_devices.append(("decode_slat", self._devices()))

    def run(self, image, mask, seed, pointmap=None, **kwargs):  # pointmap.py L316-423, stages in this order
        RUN_OPTIONS.append(kwargs)  # e.g. use_stage1/2_distillation (run's keyword arguments upstream)
        pointmap_dict = self.compute_pointmap(image, pointmap)
        if np.isnan(pointmap_dict["pointmap"].array[:, image[..., 3] > 0]).any():
            raise ValueError("point map is NaN under the mask")
        self.sample_sparse_structure()
        self.sample_slat()
        self.decode_slat()
        alpha = image[..., 3] > 0
        ys, xs = np.nonzero(alpha)
        h, w = alpha.shape
        cx, cy = xs.mean() / w - 0.5, ys.mean() / h - 0.5
        sx, sy = (xs.max() - xs.min() + 1) / w, (ys.max() - ys.min() + 1) / h
        mesh = trimesh.creation.icosphere(subdivisions=2)
        mesh.apply_scale([sx / 2, sy / 2, min(sx, sy) / 2])
        colour = image[alpha][:, :3].mean(axis=0).astype(np.uint8)
        mesh.visual.vertex_colors = np.tile(np.append(colour, 255), (len(mesh.vertices), 1))
        decoded = {}  # decode_slat, inference_pipeline.py L605-612
        if "mesh" in self.decode_formats:
            decoded["mesh"] = [mesh]
        if "gaussian" in self.decode_formats:
            decoded["gaussian"] = [Gaussian(np.asarray(mesh.vertices), np.tile(colour, (len(mesh.vertices), 1)))]
        outputs = dict(decoded)  # postprocess_slat_output, L541-562
        if "mesh" in decoded:
            outputs["glb"] = (decoded["gaussian"][0], decoded["mesh"][0])[1]  # L542-543: reads "gaussian" first
        else:
            outputs["glb"] = None  # L557
        if "gaussian" in decoded:
            outputs["gs"] = decoded["gaussian"][0]  # L562
        return {
            "rotation": np.array([[2.0, 0.0, 0.0, 0.0]]),  # unnormalised on purpose: the adapter normalises
            "translation": np.array([[-cx, -cy, 1.0]]),  # PyTorch3D camera frame: +X left, +Y up, +Z forward
            "scale": np.array([[sx, sx, sx]]),
            **outputs,
        }


class Inference:
    def __init__(self, config_file: str, compile: bool = False):  # notebook/inference.py L85-92
        with open(config_file) as fh:
            config = yaml.safe_load(fh)
        config["compile_model"] = compile
        self.config_file = config_file
        self._pipeline = Pipeline(config, os.path.dirname(config_file))
        INSTANCES.append(self)

    def merge_mask_to_rgba(self, image, mask):  # notebook/inference.py L94-99: uint8 arithmetic, wraps for 0/255
        return np.concatenate([image[..., :3], (mask.astype(np.uint8) * 255)[..., None]], axis=-1)

    def __call__(self, image, mask, seed=None, pointmap=None, **kwargs):  # L101-120: run(rgba, None, seed, ...)
        CALLS.append({"seed": seed, "pointmap_given": pointmap is not None, "mask_area": int(mask.sum()),
                      "mask_dtype": str(mask.dtype)})
        return self._pipeline.run(self.merge_mask_to_rgba(image, mask), None, seed, pointmap=pointmap)
