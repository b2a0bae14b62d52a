"""The ``sam3d`` reconstructor: Meta's SAM 3D Objects (facebookresearch/sam-3d-objects) behind our Protocol.

Tested against a double of ``notebook/inference.py`` (``tests/test_sam3d_adapter.py``) and, where they run on a
CPU, against upstream's own classes (``tests/test_sam3d_upstream.py``: PyPI ``sam3d==0.1.2``'s copy, checked
byte for byte against cf06676).

Upstream interface, read at facebookresearch/sam-3d-objects @ cf066761706cd02b07e2fc6274570ec8cdafb683
(main, 2025-11-21; the commit the gpu_worker image pins), ``notebook/inference.py``:
``Inference(config_file, compile=False)`` builds an ``InferencePipelinePointMap`` from a hydra config whose
checkpoint paths are relative to the config's folder; calling it with ``(image, mask, seed, pointmap=None)``
returns a dict holding ``gs`` (a Gaussian splat with ``save_ply(path)``), ``glb`` (a ``trimesh.Trimesh`` with
vertex colours) and the pose ``rotation`` (1x4 quaternion wxyz), ``translation`` (1x3), ``scale`` (1x3).
The pipeline (``sam3d_objects/pipeline/inference_pipeline_pointmap.py``, same commit) computes a MoGe point map
per call with ``compute_pointmap(rgba)`` unless one is passed, keeps its networks in ``pipeline.models``
(``ss_generator``, ``slat_generator``, ``ss_decoder``, ``slat_decoder_gs``, ``slat_decoder_mesh``, ...),
``pipeline.condition_embedders`` (DINOv2) and ``pipeline.depth_model`` (MoGe), and reads ``dtype``,
``ss_inference_steps``, ``slat_inference_steps`` and ``decode_formats`` from its config.

What this adapter adds:
- ``notebook/inference.py`` runs ``os.environ["CUDA_HOME"] = os.environ["CONDA_PREFIX"]`` (a KeyError outside
  conda) and imports UI packages (gradio, seaborn, matplotlib, kaolin's notebook visualiser) at import time:
  ``_import_inference`` is the one place that prepares the environment (``CUDA_HOME``, ``CONDA_PREFIX``,
  ``LIDRA_SKIP_INIT``, headless ``MPLBACKEND``) and imports it.
- Settings become a patched copy of the config (steps, decode formats, dtype, device) written beside the
  original, so the relative checkpoint paths still resolve. The dtype is written only when
  ``SAM3D_SAM3D_DTYPE`` is set: otherwise the config's stays (``float16`` in the released ``pipeline.yaml``,
  whose generators set ``use_fp16: true``; upstream's own default, ``bfloat16``, is never exercised there).
- Decode formats: both ``gaussian`` and ``mesh`` (settings refuse others): ``postprocess_slat_output``
  (``inference_pipeline.py`` L541-543) calls ``to_glb(outputs["gaussian"][0], ...)`` whenever a mesh was decoded.
- The mask goes upstream as a bool array: ``Inference.merge_mask_to_rgba`` (``notebook/inference.py`` L95) computes
  ``mask.astype(np.uint8) * 255``, so a 0/255 uint8 mask would wrap to alpha 1.
- DINOv2: ``Dino.__init__`` (``sam3d_objects/model/backbone/dit/embedder/dino.py`` L35-41) calls
  ``torch.hub.load("facebookresearch/dinov2", ..., source="github")``, which asks GitHub at every load.
  ``local_torch_hub`` redirects that call, while the pipeline is built, to the baked copy
  ``$TORCH_HOME/hub/facebookresearch_dinov2_main`` (``source="local"``); a missing copy is a clear error, not
  a download.
- Low-memory mode (``SAM3D_SAM3D_LOW_MEMORY=true``). Upstream places every network on its ``device`` while it
  builds: ``InferencePipeline.__init__`` (``inference_pipeline.py`` L96, L288 ``model.to(device)``; safetensors
  checkpoints even load with ``load_file(ckpt_path, device="cuda")``, L272) and the MoGe wrapper
  (``depth_models/base.py`` L6-9, default ``device="cuda"``), so offloading after construction cannot lower the
  load-time peak. This mode therefore writes ``device: cpu`` (pipeline and depth model) into the patched config,
  reads safetensors onto the CPU while building, then sets ``pipeline.device`` to the GPU (inputs go there) and
  moves each stage's networks to the GPU only while that stage runs (``StageOffloader``; the depth model is the
  plain ``MoGe(DepthModel)`` wrapper, which has no ``.to()``: its ``.model`` moves and its ``.device`` follows).
  Memory (gpu_worker/README.md, "SAM 3D Objects memory on a 24 GB A10G"): ``bench/sam3d_memory.py`` counts
  the parameter bytes per stage from upstream's classes (counted, not measured: weights of at most ~4.2 GiB per
  stage, ~9.3 GiB all resident; activations unknown), and ``bench/gpu.py`` measures time and peak GPU memory per
  stage, default and low-memory, on whatever GPU runs it. No GPU has run either mode for this project yet.
- The loaded reconstructor's ``info()`` reports the device and dtype the pipeline really uses and
  ``checkpoint_sha256``: the first 12 hex of ``checkpoints.folder_digest`` over the ``sam-3d-objects/`` entries of
  ``<SAM3D_CHECKPOINT_DIR>/manifest.json`` when there is one. A declared ``SAM3D_SAM3D_CHECKPOINT_SHA256`` names
  the version (``sam3d-objects-cf06676+<12 hex>``), and weights whose digest differs are refused at load.
- Frames: the mesh (``object.glb``) comes Y-up from upstream's GLB post-processing; the splat (``object.ply``,
  written by upstream's ``save_ply``) stays in the Z-up object frame. ``stats["splat_frame"]`` says so in
  ``result.json`` (the conversion is ``export.frame.GLB_TO_OBJECT``).
- ``reconstruct_batch`` computes the point map once per photo and reuses it for every mask on that photo.
- Outputs become our own types: the mesh as a ``trimesh.Trimesh`` (GLB written by the pipeline), the splat as
  PLY bytes, the pose as plain JSON lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sam3d_pipeline import checkpoints
from sam3d_pipeline.errors import BackendUnavailableError, InputError
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import BackendInfo, Reconstruction

VERSION = "sam3d-objects-cf06676"
INFERENCE_MODULE = "inference"  # notebook/inference.py, installed on sys.path by the gpu_worker image
LIMITS = ("one object per call; pose is relative to the photo's camera (MoGe point map)",)
CHECKPOINT_SUBFOLDER = "sam-3d-objects"  # its folder under SAM3D_CHECKPOINT_DIR (and in manifest.json)
SPLAT_FRAME = "sam3d-object-z-up"  # object.ply's frame; object.glb is Y-up: export.frame.GLB_TO_OBJECT maps them

# Which networks each pipeline stage needs on the GPU in low-memory mode (attribute paths on the pipeline).
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "compute_pointmap": ("depth_model",),
    "sample_sparse_structure": (
        "models.ss_generator",
        "models.ss_decoder",
        "models.ss_encoder",
        "condition_embedders.ss_condition_embedder",
    ),
    "sample_slat": ("models.slat_generator", "condition_embedders.slat_condition_embedder"),
    "decode_slat": ("models.slat_decoder_gs", "models.slat_decoder_gs_4", "models.slat_decoder_mesh"),
}


@dataclass(frozen=True)
class ReconstructJob:
    """One object to reconstruct.

    Attributes:
        rgb: ``(H, W, 3)`` uint8 photo.
        mask: ``(H, W)`` bool mask of the object.
        photo_id: identity of the photo (jobs with the same id share one point map).
        seed: sampling seed.
    """

    rgb: np.ndarray
    mask: np.ndarray
    photo_id: str
    seed: int = 0


def _import_inference() -> Any:
    """Import ``inference.Inference`` once, with its import-time expectations met here and nowhere else.

    Raises:
        BackendUnavailableError: the package (or a CUDA-only dependency) cannot be imported.
    """
    os.environ.setdefault("LIDRA_SKIP_INIT", "true")
    os.environ.setdefault("MPLBACKEND", "Agg")  # the module imports matplotlib.pyplot
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # ... and gradio
    if not os.environ.get("CUDA_HOME"):
        cuda_home = os.environ.get("CONDA_PREFIX") or ("/usr/local/cuda" if Path("/usr/local/cuda").exists() else "")
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("CONDA_PREFIX", os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    try:
        module = importlib.import_module(INFERENCE_MODULE)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"SAM 3D Objects cannot be imported ({exc}); it needs CUDA: use the gpu_worker image"
        ) from exc
    return module.Inference


def _empty_cuda_cache() -> None:
    """Return freed CUDA memory to the driver (nothing to do when the pipeline never imported torch)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def patched_config(config_path: str | Path, settings: Settings) -> Path:
    """Write the pipeline config with our steps, decode formats, dtype and build device beside the original.

    Plain YAML round trip: hydra's ``_target_`` keys and ``${...}`` interpolations are kept as written.

    Args:
        config_path: upstream ``pipeline.yaml`` (hydra config; checkpoint paths relative to its folder).
        settings: ``sam3d_dtype`` (left as the config's when None), the steps of :func:`sampling`,
            ``sam3d_decode_formats``, ``sam3d_low_memory`` (builds on the CPU: ``device: cpu``).

    Returns:
        Path of ``pipeline.sam3d-pipeline-<hash>.yaml`` in the same folder (reused when identical).

    Raises:
        BackendUnavailableError: the config file does not exist.
    """
    import yaml

    src = Path(config_path)
    if not src.is_file():
        raise BackendUnavailableError(f"SAM 3D Objects config {src} not found (run gpu_worker/fetch_checkpoints.py)")
    config = yaml.safe_load(src.read_text()) or {}
    if not isinstance(config, dict):
        raise BackendUnavailableError(f"SAM 3D Objects config {src} is not a mapping")
    plan = sampling(settings)
    config |= {
        "ss_inference_steps": plan.ss_steps,
        "slat_inference_steps": plan.slat_steps,
        "decode_formats": list(settings.sam3d_decode_formats),
    }
    if settings.sam3d_dtype:  # else the config's own (float16 in the released pipeline.yaml)
        config["dtype"] = settings.sam3d_dtype
    if settings.sam3d_low_memory:
        # Build on the CPU: InferencePipeline.__init__ moves each network to `device` (L96, L288) and the MoGe
        # wrapper moves its model to its own `device` (depth_models/base.py L9); both default to "cuda".
        config["device"] = "cpu"
        if isinstance(config.get("depth_model"), dict):
            config["depth_model"] = config["depth_model"] | {"device": "cpu"}
    text = yaml.safe_dump(config, sort_keys=False)
    dst = src.with_name(f"{src.stem}.sam3d-pipeline-{hashlib.sha256(text.encode()).hexdigest()[:10]}.yaml")
    if not dst.exists() or dst.read_text() != text:
        tmp = dst.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(dst)
    return dst


@dataclass(frozen=True)
class Sampling:
    """How the two sampling stages run: steps each, and upstream's distilled shortcut samplers."""

    quality: str
    ss_steps: int
    slat_steps: int
    distillation: bool

    def as_dict(self) -> dict[str, Any]:
        return {"quality": self.quality, "ss_steps": self.ss_steps, "slat_steps": self.slat_steps,
                "distillation": self.distillation}


# SAM3D_SAM3D_QUALITY → (stage-1 steps, stage-2 steps, distillation), on upstream's own options (cf06676):
# - steps: ``InferencePipeline.__init__`` ``ss_inference_steps=25``, ``slat_inference_steps=25`` (its defaults,
#   the "balanced" row), read from the config (``patched_config``).
# - distillation: ``InferencePipelinePointMap.run(..., use_stage1_distillation, use_stage2_distillation)``
#   → ``sample_sparse_structure`` / ``sample_slat(use_distillation=True)``: the generator's shortcut model
#   (``no_shortcut = False``) with classifier-free guidance off (``reverse_fn.strength = 0``), meant for few
#   steps. ``notebook/inference.py``'s ``Inference.__call__`` does not pass these, so ``distilled_run`` sets them.
QUALITIES = {"fast": (4, 4, True), "balanced": (25, 25, False), "best": (50, 50, False)}


def sampling(settings: Settings) -> Sampling:
    """The quality's steps and distillation; ``SAM3D_SAM3D_SS_STEPS`` / ``_SLAT_STEPS`` override the steps."""
    ss, slat, distill = QUALITIES[settings.sam3d_quality]
    return Sampling(settings.sam3d_quality, settings.sam3d_ss_steps or ss, settings.sam3d_slat_steps or slat,
                    distill)


def distilled_run(pipeline: Any) -> None:
    """Make ``pipeline.run`` use both stages' distilled samplers unless a caller passes the flags itself."""
    run = pipeline.run

    def run_distilled(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("use_stage1_distillation", True)
        kwargs.setdefault("use_stage2_distillation", True)
        return run(*args, **kwargs)

    pipeline.run = run_distilled


def _get_path(obj: Any, path: str) -> Any:
    """``pipeline.models.ss_generator`` style lookup through attributes and mappings; None when absent."""
    for part in path.split("."):
        if obj is None:
            return None
        if hasattr(obj, "keys"):  # dict, torch.nn.ModuleDict
            obj = obj[part] if part in obj else None
        else:
            obj = getattr(obj, part, None)
    return obj


def _as_device(device: Any) -> Any:
    """``torch.device(device)`` when torch is loaded (the pipeline compares devices), else the string."""
    torch = sys.modules.get("torch")
    return torch.device(device) if torch is not None and isinstance(device, str) else device


def place(network: Any, device: Any) -> None:
    """Move one pipeline network to ``device``.

    A ``torch.nn.Module`` moves with ``.to``. Upstream's depth model is a plain ``MoGe(DepthModel)`` wrapper
    (``sam3d_objects/pipeline/depth_models/base.py`` @ cf06676: no ``.to()``; the network is ``.model`` and
    ``MoGe.__call__`` sends its input to ``.device``), so its ``.model`` moves and its ``.device`` follows.

    Raises:
        TypeError: the object is neither (a new upstream layout: fail loudly rather than leave it on the GPU).
    """
    if callable(getattr(network, "to", None)):
        network.to(device)
    elif callable(getattr(getattr(network, "model", None), "to", None)):
        network.model.to(device)
        if hasattr(network, "device"):
            network.device = _as_device(device)
    else:
        raise TypeError(f"cannot move {type(network).__name__} between devices (no .to(), no .model)")


class StageOffloader:
    """Low-memory mode: networks live on the CPU; each stage moves what it needs to the GPU and frees it after.

    Wraps the pipeline's stage methods (``STAGE_MODULES``) in place. ``empty_cache`` releases the freed
    memory to the driver so the next stage can use it. The pipeline must have been built on the CPU
    (``patched_config`` with ``sam3d_low_memory``): moving networks off the GPU after upstream built them there
    does not lower the load-time peak.
    """

    def __init__(self, pipeline: Any, device: str, empty_cache: Callable[[], None], offload_device: str = "cpu"):
        self.pipeline = pipeline
        self.device = device
        self.offload_device = offload_device
        self.empty_cache = empty_cache
        self.peaks: dict[str, float] = {}

    def install(self) -> None:
        for modules in STAGE_MODULES.values():
            for path in modules:
                if (module := _get_path(self.pipeline, path)) is not None:
                    place(module, self.offload_device)
        self.empty_cache()
        for method_name, modules in STAGE_MODULES.items():
            original = getattr(self.pipeline, method_name, None)
            if original is not None:
                setattr(self.pipeline, method_name, self._wrap(method_name, original, modules))

    @contextlib.contextmanager
    def on_device(self, modules: Sequence[str]) -> Iterator[None]:
        present = [m for m in (_get_path(self.pipeline, p) for p in modules) if m is not None]
        for module in present:
            place(module, self.device)
        try:
            yield
        finally:
            for module in present:
                place(module, self.offload_device)
            self.empty_cache()

    def _wrap(self, name: str, fn: Callable[..., Any], modules: Sequence[str]) -> Callable[..., Any]:
        def staged(*args: Any, **kwargs: Any) -> Any:
            with self.on_device(modules):
                return fn(*args, **kwargs)

        staged.__name__ = name
        return staged


def dinov2_hub_dir() -> Path:
    """Where the image bakes DINOv2's hub repo: ``$TORCH_HOME/hub/facebookresearch_dinov2_main`` (torch.hub's own
    cache name for ``facebookresearch/dinov2`` at ``main``)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(torch_home) / "hub" / "facebookresearch_dinov2_main"


@contextlib.contextmanager
def local_torch_hub() -> Iterator[None]:
    """While the pipeline builds, ``torch.hub.load(<owner>/<repo>[:ref], ..., source="github")`` loads the baked
    copy ``$TORCH_HOME/hub/<owner>_<repo>_<ref>`` with ``source="local"`` instead of asking GitHub.

    Covers ``Dino.__init__`` (``sam3d_objects/model/backbone/dit/embedder/dino.py`` L35-41 @ cf06676:
    ``torch.hub.load(repo_or_dir="facebookresearch/dinov2", model=dino_model, source="github", ...)``), which
    otherwise contacts api.github.com at every load (a 403/429 there fails the load) although the image has the
    code. Upstream files are not modified: the hub function is swapped for the duration of the build only.

    Raises:
        BackendUnavailableError: (inside the block) the baked copy is missing; nothing is downloaded.
    """
    import torch

    original = torch.hub.load
    hub_dir = dinov2_hub_dir().parent

    def load(repo_or_dir: str, model: str, *args: Any, source: str = "github", **kwargs: Any) -> Any:
        if source != "github":
            return original(repo_or_dir, model, *args, source=source, **kwargs)
        repo, _, ref = repo_or_dir.partition(":")
        local = hub_dir / f"{repo.replace('/', '_')}_{(ref or 'main').replace('/', '_')}"  # torch.hub's cache name
        if not (local / "hubconf.py").is_file():
            raise BackendUnavailableError(
                f"torch.hub repo {repo_or_dir} is not baked at {local} (no run-time downloads): put it under "
                "TORCH_HOME (gpu_worker/README.md, Checkpoints)"
            )
        kwargs.pop("trust_repo", None)
        return original(str(local), model, *args, source="local", **kwargs)

    torch.hub.load = load
    try:
        yield
    finally:
        torch.hub.load = original


@contextlib.contextmanager
def safetensors_on_cpu() -> Iterator[None]:
    """While a low-memory pipeline builds, safetensors checkpoints load onto the CPU: upstream's
    ``instantiate_and_load_from_pretrained`` calls ``load_file(ckpt_path, device="cuda")`` whatever the pipeline's
    device (``inference_pipeline.py`` L272 @ cf06676), which would put every state dict on the GPU at load."""
    module = sys.modules.get("sam3d_objects.pipeline.inference_pipeline")
    original = getattr(module, "load_file", None)
    if original is None:
        yield
        return

    def load_file(filename: Any, device: Any = "cpu") -> Any:
        return original(filename, device="cpu")

    module.load_file = load_file
    try:
        yield
    finally:
        module.load_file = original


def checkpoint_digest(settings: Settings) -> str | None:
    """``checkpoints.folder_digest`` (64 hex) over the ``sam-3d-objects/`` entries of the checkpoint folder's
    ``manifest.json`` (``SAM3D_CHECKPOINT_DIR``, else the folder above the config's); None without one."""
    folder = os.environ.get("SAM3D_CHECKPOINT_DIR") or str(Path(settings.sam3d_config_path).parent.parent)
    try:
        files = checkpoints.read_manifest(folder)
        return checkpoints.folder_digest(files, CHECKPOINT_SUBFOLDER) if files else None
    except InputError:
        return None


def version(settings: Settings) -> str:
    """``sam3d-objects-cf06676``, ``+<first 12 hex>`` of the declared ``SAM3D_SAM3D_CHECKPOINT_SHA256`` when set
    (as ``sam3_version.version`` does: outputs of other weights get other output keys)."""
    declared = settings.sam3d_checkpoint_sha256
    return f"{VERSION}+{declared.lower()[:12]}" if declared else VERSION


def _device_name(device: Any) -> str:
    """``cuda`` → ``cuda:<current index>``, as results report devices."""
    text = str(device)
    torch = sys.modules.get("torch")
    if text == "cuda" and torch is not None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return text


def _dtype_name(dtype: Any) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def describe(settings: Settings) -> BackendInfo:
    """The reconstructor's ``BackendInfo``, known without loading (or importing) SAM 3D Objects: the device and
    dtype it will ask for (the loaded reconstructor's ``info()`` reports what it really uses)."""
    limits = LIMITS
    if settings.sam3d_low_memory:
        limits += ("low-memory mode: stages load one at a time (slower)",)
    plan = sampling(settings)
    if plan.quality != "balanced" or plan.ss_steps != 25 or plan.slat_steps != 25:
        limits += (f"quality {plan.quality}: {plan.ss_steps} + {plan.slat_steps} sampling steps"
                   + (", distilled samplers" if plan.distillation else "") + " (upstream's default: 25 + 25)",)
    return BackendInfo(name="sam3d", version=version(settings), device="cuda:0", limits=limits,
                       weights="checkpoint", dtype=settings.sam3d_dtype)


class Sam3dReconstructor:
    """SAM 3D Objects reconstructor (see module docstring). The model loads on the first ``reconstruct``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._inference: Any = None
        self.offloader: StageOffloader | None = None
        self._checkpoint_sha256: str | None = None

    def info(self) -> BackendInfo:
        """``describe`` before the model loads; after, the device and dtype the pipeline uses (``pipeline.device``,
        ``pipeline.dtype``) and the checkpoint digest."""
        if self._inference is None:
            return describe(self.settings)
        pipeline = self._inference._pipeline
        device = self.offloader.device if self.offloader else getattr(pipeline, "device", "cuda")
        return replace(describe(self.settings), device=_device_name(device),
                       dtype=_dtype_name(getattr(pipeline, "dtype", None)), checkpoint_sha256=self._checkpoint_sha256)

    # -- model -----------------------------------------------------------------------------------------
    def _load(self) -> Any:
        if self._inference is None:
            inference_cls = _import_inference()
            config = patched_config(self.settings.sam3d_config_path, self.settings)
            digest = checkpoint_digest(self.settings)
            declared = (self.settings.sam3d_checkpoint_sha256 or "").lower()
            if declared and digest and digest != declared:
                raise BackendUnavailableError(
                    f"SAM 3D Objects weights here (manifest digest {digest[:12]}) are not the declared "
                    f"SAM3D_SAM3D_CHECKPOINT_SHA256 {declared[:12]}: set the same identity on every pool"
                )
            self._checkpoint_sha256 = digest[:12] if digest else None
            low_memory = self.settings.sam3d_low_memory
            with local_torch_hub(), (safetensors_on_cpu() if low_memory else contextlib.nullcontext()):
                inference = inference_cls(str(config), compile=self.settings.sam3d_compile)
            if sampling(self.settings).distillation:
                distilled_run(inference._pipeline)
            if low_memory:
                # Built on the CPU; run() sends its inputs to pipeline.device, so that is the GPU from now on.
                inference._pipeline.device = _as_device("cuda")
                self.offloader = StageOffloader(inference._pipeline, "cuda", _empty_cuda_cache)
                self.offloader.install()
            self._inference = inference
        return self._inference

    def load_model(self) -> bool:
        """Load the pipeline now unless it is in memory. Returns True when this call loaded it."""
        was_loaded = self._inference is not None
        self._load()
        return not was_loaded

    @property
    def pipeline(self) -> Any:
        """Upstream's pipeline object (``InferencePipelinePointMap``), loaded first: what ``gpu_worker/smoke.py`` and
        ``bench/gpu.py`` time stage by stage."""
        return self._load()._pipeline

    # -- inference -------------------------------------------------------------------------------------
    def reconstruct(self, rgb: np.ndarray, mask: np.ndarray, *, seed: int = 0) -> Reconstruction:
        """Reconstruct the object under ``mask``.

        Args:
            rgb: ``(H, W, 3)`` uint8 photo.
            mask: ``(H, W)`` mask, same size: bool, or numbers where non-zero is the object (passed upstream as
                bool).
            seed: sampling seed.

        Returns:
            Mesh (``trimesh.Trimesh``, vertex colours, Y-up), splat PLY bytes (Z-up object frame:
            ``stats["splat_frame"]``), pose (JSON lists) and stats.

        Raises:
            InputError: empty mask or size mismatch.
            BackendUnavailableError: the package or its config/checkpoints are missing.
        """
        return self.reconstruct_batch([ReconstructJob(rgb, mask, photo_id="single", seed=seed)])[0]

    def reconstruct_batch(self, jobs: Sequence[ReconstructJob]) -> list[Reconstruction]:
        """Reconstruct several objects with one model load; one point map per distinct ``photo_id``.

        Returns:
            One ``Reconstruction`` per job, in order. ``stats["pointmap_reused"]`` says whether the job
            reused a point map computed for an earlier job on the same photo.

        Raises:
            InputError: a job's mask is empty or does not match its photo (raised before any model work).
        """
        for i, job in enumerate(jobs):
            _check_inputs(job.rgb, job.mask, f"job {i} ({job.photo_id})")
        inference = self._load()
        pointmaps: dict[str, Any] = {}
        results = []
        for job in jobs:
            reused = job.photo_id in pointmaps
            if not reused:
                pointmaps[job.photo_id] = shared_pointmap(inference, job.rgb)
            # A bool mask: upstream computes mask.astype(np.uint8) * 255 (a 0/255 uint8 mask would wrap to 1).
            mask = np.asarray(job.mask).astype(bool)
            output = inference(job.rgb, mask, seed=job.seed, pointmap=pointmaps[job.photo_id])
            results.append(self._to_reconstruction(output, reused))
        return results

    def _to_reconstruction(self, output: dict[str, Any], pointmap_reused: bool) -> Reconstruction:
        mesh = output.get("glb")
        splat = output.get("gs")
        if splat is None and output.get("gaussian"):
            splat = output["gaussian"][0]
        if mesh is None:
            raise BackendUnavailableError(
                "SAM 3D Objects returned no mesh: SAM3D_SAM3D_DECODE_FORMATS must hold gaussian and mesh"
            )
        mesh = mesh_from_output(mesh)
        ply = splat_to_ply_bytes(splat) if splat is not None else None
        pose = pose_to_json(output["rotation"], output["translation"], output["scale"])
        stats = {
            "vertices": int(len(mesh.vertices)),
            "faces": int(len(mesh.faces)),
            "watertight": bool(mesh.is_watertight),
            "extent": [round(float(v), 4) for v in mesh.extents],
            "splat_points": ply_vertex_count(ply) if ply else 0,
            "pointmap_reused": pointmap_reused,
            "splat_frame": SPLAT_FRAME if ply else None,
        }
        return Reconstruction(mesh=mesh, backend=self.info(), splat_ply=ply, pose=pose, stats=stats)


def _check_inputs(rgb: np.ndarray, mask: np.ndarray, what: str) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError(f"{what}: image must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if mask.shape != rgb.shape[:2]:
        raise InputError(f"{what}: mask is {mask.shape[::-1]}, image is {rgb.shape[1::-1]} (width, height)")
    if not mask.any():
        raise InputError(f"{what}: mask is empty: nothing to reconstruct")


def shared_pointmap(inference: Any, rgb: np.ndarray) -> Any:
    """The photo's point map, computed once (MoGe) without the per-mask depth clipping.

    ``compute_pointmap`` clips far points using the alpha mask when ``clip_pointmap_beyond_scale`` is set;
    a point map shared by several masks must not be clipped for one of them, so clipping is off here and
    the pipeline applies it per mask when it receives the point map.

    Returns:
        ``(H, W, 3)`` point map tensor in the pipeline's camera convention (what ``pointmap=`` accepts).
    """
    pipeline = inference._pipeline
    rgba = np.concatenate([rgb[..., :3], np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    clip = getattr(pipeline, "clip_pointmap_beyond_scale", None)
    pipeline.clip_pointmap_beyond_scale = None
    try:
        pointmap_dict = pipeline.compute_pointmap(rgba)
    finally:
        pipeline.clip_pointmap_beyond_scale = clip
    return pointmap_dict["pointmap"].permute(1, 2, 0)


# -- conversions (pure; tested on real objects) ----------------------------------------------------------
def mesh_from_output(glb: Any) -> Any:
    """The pipeline's mesh as a ``trimesh.Trimesh`` (a ``Scene`` is flattened into one mesh).

    Raises:
        BackendUnavailableError: the object is not a trimesh mesh or scene, or has no faces.
    """
    import trimesh

    if isinstance(glb, trimesh.Scene):
        glb = glb.to_geometry() if hasattr(glb, "to_geometry") else glb.dump(concatenate=True)
    if not isinstance(glb, trimesh.Trimesh) or len(glb.faces) == 0:
        raise BackendUnavailableError(f"SAM 3D Objects returned an unusable mesh ({type(glb).__name__})")
    return glb


def splat_to_ply_bytes(splat: Any) -> bytes:
    """Bytes of the splat's 3D Gaussian Splatting PLY, written by its own ``save_ply``.

    Raises:
        BackendUnavailableError: the file written is not a PLY with Gaussian fields.
    """
    with tempfile.TemporaryDirectory(prefix="sam3d-splat-") as tmp:
        path = Path(tmp) / "splat.ply"
        splat.save_ply(str(path))
        data = path.read_bytes()
    header = ply_header(data)
    missing = {"x", "y", "z", "opacity", "f_dc_0", "scale_0", "rot_0"} - set(header["properties"])
    if missing:
        raise BackendUnavailableError(f"splat PLY lacks Gaussian fields {sorted(missing)}")
    return data


def ply_header(data: bytes) -> dict[str, Any]:
    """Parse a PLY header: ``{"format": str, "vertex_count": int, "properties": [names]}``.

    Raises:
        ValueError: not a PLY file.
    """
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError("not a PLY file")
    fmt, count, props = "", 0, []
    for line in data[:end].decode("ascii").splitlines():
        parts = line.split()
        if parts[:1] == ["format"]:
            fmt = parts[1]
        elif parts[:2] == ["element", "vertex"]:
            count = int(parts[2])
        elif parts[:1] == ["property"]:
            props.append(parts[-1])
    return {"format": fmt, "vertex_count": count, "properties": props}


def ply_vertex_count(data: bytes) -> int:
    return int(ply_header(data)["vertex_count"])


def _as_list(value: Any, size: int, name: str) -> list[float]:
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size != size or not np.all(np.isfinite(arr)):
        raise BackendUnavailableError(f"SAM 3D Objects returned an invalid {name}: {arr.tolist()}")
    return [float(v) for v in arr]


def pose_to_json(rotation: Any, translation: Any, scale: Any) -> dict[str, list[float]]:
    """The object's pose in the photo's camera frame as JSON lists.

    Args:
        rotation: quaternion ``(1, 4)`` or ``(4,)``, ``w, x, y, z`` (tensor or array).
        translation: ``(1, 3)`` or ``(3,)``.
        scale: ``(1, 3)`` or ``(3,)``.

    Returns:
        ``{"rotation": [w, x, y, z] (unit norm), "translation": [x, y, z], "scale": [x, y, z]}``.

    Raises:
        BackendUnavailableError: wrong sizes, non-finite values or a zero quaternion.
    """
    quat = np.asarray(_as_list(rotation, 4, "rotation"))
    norm = float(np.linalg.norm(quat))
    if norm < 1e-8:
        raise BackendUnavailableError("SAM 3D Objects returned a zero rotation quaternion")
    return {
        "rotation": [float(v) for v in quat / norm],
        "translation": _as_list(translation, 3, "translation"),
        "scale": _as_list(scale, 3, "scale"),
    }
