"""The ``sam3`` segmenter: Meta's SAM 3 image model (``sam3==0.1.4``) behind our ``Segmenter`` protocol.

Text prompts go through ``Sam3Processor.set_text_prompt``, box exemplars through ``add_geometric_prompt``,
clicks through the SAM-1-style interactive path (``Sam3Image.predict_inst``). The model is built once per
process per (checkpoint, device, random-init) and shared. Importing this module imports torch and sam3.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sam3d_pipeline.backends.sam3 import compat as sam3_compat
from sam3d_pipeline.backends.sam3 import version as sam3_version
from sam3d_pipeline.backends.sam3.assets import find_bpe_vocab, resolve_checkpoint
from sam3d_pipeline.backends.sam3.build import RANDOM_INIT_SEED, UNINITIALISED_PARAMS, pick_device
from sam3d_pipeline.backends.sam3.version import VERSION  # noqa: F401 - re-exported
from sam3d_pipeline.errors import BackendUnavailableError, InputError
from sam3d_pipeline.masks import clip_box
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import BackendInfo, Box, Instance, Point, Segmentation, SegmentRequest

log = logging.getLogger(__name__)

def xyxy_to_cxcywh_norm(box: tuple[float, float, float, float], width: int, height: int) -> list[float]:
    """Convert an xyxy pixel box to the normalised ``[cx, cy, w, h]`` that ``add_geometric_prompt`` takes.

    Args:
        box: ``(x0, y0, x1, y1)`` in pixels; clipped to the image first.
        width, height: image size in pixels.

    Returns:
        ``[cx, cy, w, h]``, each in [0, 1] relative to the image width (x, w) or height (y, h).

    Raises:
        InputError: the box has no area inside the image.
    """
    x0, y0, x1, y1 = clip_box(box, width, height)
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"box {tuple(box)}: no area inside the {width}x{height} image")
    return [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]


@dataclass
class LoadedModel:
    """A built SAM 3 image model plus what we know about it."""

    model: object
    processor: object
    device: str
    weights: str  # "checkpoint" or "random-init"
    checkpoint: str | None
    build_s: float
    compat: list[str] = field(default_factory=list)
    sha256: str | None = None  # the checkpoint file's, when one was loaded
    dtype: str = "float32"
    lock: threading.RLock = field(default_factory=threading.RLock)
    # The last image's encoder state, shared by every segmenter on this model (segment, click, embeddings
    # and flow tasks on one image pay for set_image once): (image_key, state).
    last_image: tuple[str, dict] | None = None


_MODELS: dict[tuple[str, str, bool], LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


def _random_init_fill(model) -> list[str]:
    """Initialise parameters a checkpoint would fill and random init leaves empty or non-finite."""
    import torch

    fixed = []
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in UNINITIALISED_PARAMS:
            if name in params:
                torch.nn.init.normal_(params[name], std=0.02)
                fixed.append(name)
        for name, p in params.items():
            if name not in fixed and not torch.isfinite(p).all():
                torch.nn.init.normal_(p, std=0.02)
                fixed.append(name)
    return fixed


def load_model(settings: Settings) -> LoadedModel:
    """Build (once per process) the SAM 3 image model with instance interactivity.

    Raises:
        BackendUnavailableError: no checkpoint and random init not requested; vocabulary missing; ...
        InputError: the configured checkpoint path does not exist.
    """
    import torch

    if not settings.sam3_checkpoint and not settings.sam3_random_init:
        raise BackendUnavailableError(
            "sam3 needs a checkpoint: set SAM3D_SAM3_CHECKPOINT (local file, s3:// URI, or hf://facebook/sam3 "
            "with SAM3D_SAM3_ALLOW_HUB=true), or SAM3D_SAM3_RANDOM_INIT=true for a smoke test"
        )
    device = pick_device(settings.sam3_device)
    key = (settings.sam3_checkpoint or "", device, bool(settings.sam3_random_init and not settings.sam3_checkpoint))
    with _MODELS_LOCK:
        if key in _MODELS:
            return _MODELS[key]
        compat = sam3_compat.apply()
        from sam3.model.sam3_image_processor import Sam3Processor
        from sam3.model_builder import build_sam3_image_model

        vocab = find_bpe_vocab(settings)
        ckpt = resolve_checkpoint(settings)
        started = time.perf_counter()
        # Random weights are seeded (without disturbing the caller's RNG) so smoke results are reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = build_sam3_image_model(
                bpe_path=str(vocab),
                device=device,
                checkpoint_path=str(ckpt.path) if ckpt else None,
                load_from_HF=False,  # never download implicitly; the hub goes through resolve_checkpoint
                enable_inst_interactivity=True,
            )
            weights = "checkpoint"
            if ckpt is None:
                fixed = _random_init_fill(model)
                log.warning("SAM 3 built with random weights (re-initialised %s)", ", ".join(fixed))
                weights = "random-init"
        model = model.to(device).eval()
        processor = Sam3Processor(model, device=device, confidence_threshold=settings.sam3_confidence_threshold)
        build_s = time.perf_counter() - started
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        loaded = LoadedModel(model, processor, device, weights, ckpt.source if ckpt else None, build_s, compat,
                             sha256=ckpt.sha256 if ckpt else None, dtype=dtype)
        _MODELS[key] = loaded
        log.info("SAM 3 built on %s in %.1f s (%s)", device, build_s, weights)
        return loaded


def clear_models() -> None:
    """Forget built models (frees their memory once nothing else holds them)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def image_key(rgb: np.ndarray) -> str:
    return hashlib.sha1(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()


class Sam3Segmenter:
    """SAM 3 segmenter (see module docstring). Scores are SAM 3's presence x class probabilities."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._loaded: LoadedModel | None = None
        self._tracker = None  # the video predictor, built on the first track()

    # Model and image state ---------------------------------------------------------------------------

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            self._loaded = load_model(self.settings)
        return self._loaded

    def load_model(self) -> bool:
        """Load the model now unless it is in memory. Returns True when this call loaded it."""
        was_loaded = self._loaded is not None
        _ = self.loaded
        return not was_loaded

    def info(self) -> BackendInfo:
        """What runs here: once the model is loaded, the device, dtype and checkpoint sha256 it really has."""
        if self._loaded is not None:
            return sam3_version.describe(self.settings, self._loaded.device, checkpoint_sha256=self._loaded.sha256,
                                         dtype=self._loaded.dtype)
        device = None
        if self.settings.sam3_device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return sam3_version.describe(self.settings, device)

    def version(self) -> str:
        """See ``sam3_version.version``."""
        return sam3_version.version(self.settings)

    def image_state(self, rgb: np.ndarray) -> dict:
        """Run the image encoder (``Sam3Processor.set_image``) once per distinct image; reuse the state.

        Args:
            rgb: ``(H, W, 3)`` uint8.
        """
        from PIL import Image

        key = image_key(rgb)
        loaded = self.loaded
        with loaded.lock:
            if loaded.last_image is None or loaded.last_image[0] != key:
                loaded.last_image = None  # free the previous image's features first
                started = time.perf_counter()
                state = loaded.processor.set_image(Image.fromarray(rgb))
                state["timings_s"] = {"set_image": time.perf_counter() - started}
                loaded.last_image = (key, state)
            return loaded.last_image[1]

    # Protocol ----------------------------------------------------------------------------------------

    def segment(self, rgb: np.ndarray, request: SegmentRequest) -> Segmentation:
        """Segment ``rgb`` (``(H, W, 3)`` uint8) for the text prompt and box exemplars; refine with clicks.

        Returns:
            Instances best first: masks ``(H, W)`` bool at image size, xyxy boxes clipped, scores in [0, 1].
            With clicks, one instance: the interactive decoder's best mask for the clicks (and the top
            detection's box when there is one).
        """
        import torch

        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InputError(f"image array: expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        height, width = rgb.shape[:2]
        loaded = self.loaded
        state = self.image_state(rgb)
        timings = dict(state["timings_s"])
        processor = loaded.processor
        messages = []
        started = time.perf_counter()
        with loaded.lock:
            processor.set_confidence_threshold(self.settings.sam3_confidence_threshold)
            processor.reset_all_prompts(state)
            prompt = request.prompt.strip()
            if prompt:
                processor.set_text_prompt(prompt, state)
            for box in request.boxes:
                label = bool(getattr(box, "label", 1))
                processor.add_geometric_prompt(xyxy_to_cxcywh_norm(box.as_tuple(), width, height), label, state)
            if not prompt and not request.boxes:
                processor.add_geometric_prompt([0.5, 0.5, 1.0, 1.0], True, state)
                messages.append("no text or box prompt: used the whole image as the box exemplar")
            with torch.no_grad():
                masks = state["masks"].squeeze(1).cpu().numpy().astype(bool)
                boxes = state["boxes"].float().cpu().numpy()
                scores = state["scores"].float().cpu().numpy()
        timings["prompt"] = time.perf_counter() - started
        instances = []
        for mask, box, score in zip(masks, boxes, scores, strict=True):
            if not np.isfinite(score) or not mask.any():
                continue
            instances.append(Instance(mask=mask, box=clip_box(tuple(map(float, box)), width, height),
                                      score=float(score)))
        instances.sort(key=lambda inst: inst.score, reverse=True)
        if request.points:
            started = time.perf_counter()
            box = instances[0].box if instances else None
            mask, score, _ = self.click(rgb, request.points, box=box)
            timings["click"] = time.perf_counter() - started
            from sam3d_pipeline.masks import box_from_mask

            instances = [Instance(mask=mask, box=clip_box(box_from_mask(mask), width, height), score=score)]
            if not mask.any():
                instances = []
            messages.append(f"refined with {len(request.points)} click(s) through predict_inst")
        messages.append("timings_s " + ", ".join(f"{k}={v:.2f}" for k, v in timings.items()))
        if self.info().weights == "random-init":
            messages.append("random weights: output is not a real segmentation")
        return Segmentation(instances, self.info(), used_text_prompt=bool(request.prompt.strip()),
                            messages=messages)

    def click(
        self,
        rgb: np.ndarray,
        points: tuple[Point, ...] | list[Point],
        *,
        box: tuple[float, float, float, float] | None = None,
        mask_input: np.ndarray | None = None,
    ) -> tuple[np.ndarray, float, np.ndarray]:
        """Interactive refinement through ``Sam3Image.predict_inst`` (SAM-1-style decoder).

        Args:
            rgb: ``(H, W, 3)`` uint8.
            points: clicks in pixels (label 1 object, 0 background).
            box: optional xyxy pixel box.
            mask_input: optional ``(1, 288, 288)`` float32 low-resolution logits from a previous call.

        Returns:
            ``(mask, score, low_res_logits)``: ``(H, W)`` bool, predicted IoU, ``(1, 288, 288)`` float32.
        """
        state = self.image_state(rgb)
        loaded = self.loaded
        coords = np.array([[p.x, p.y] for p in points], dtype=np.float32) if points else None
        labels = np.array([p.label for p in points], dtype=np.int32) if points else None
        multimask = len(points) <= 1 and box is None and mask_input is None
        with loaded.lock:
            masks, ious, low = loaded.model.predict_inst(
                state,
                point_coords=coords,
                point_labels=labels,
                box=np.array(box, dtype=np.float32) if box is not None else None,
                mask_input=mask_input,
                multimask_output=multimask,
            )
        best = int(np.argmax(ious))
        return masks[best].astype(bool), float(ious[best]), low[best:best + 1].astype(np.float32)

    def embeddings(self, rgb: np.ndarray) -> dict[str, np.ndarray]:
        """What the click decoder consumes for ``rgb`` (same computation as ``Sam3Image.predict_inst``).

        Returns:
            ``image_embed`` ``(1, 256, 72, 72)``, ``high_res_feats_0`` ``(1, 32, 288, 288)``,
            ``high_res_feats_1`` ``(1, 64, 144, 144)``, all float32.
        """
        import torch

        state = self.image_state(rgb)
        predictor = self.loaded.model.inst_interactive_predictor
        with self.loaded.lock, torch.no_grad():
            _, vision_feats, _, _ = predictor.model._prepare_backbone_features(
                state["backbone_out"]["sam2_backbone_out"]
            )
            vision_feats = list(vision_feats)
            vision_feats[-1] = vision_feats[-1] + predictor.model.no_mem_embed
            feats = [
                feat.permute(1, 2, 0).reshape(1, -1, *size)
                for feat, size in zip(vision_feats[::-1], predictor._bb_feat_sizes[::-1], strict=True)
            ][::-1]
        return {
            "image_embed": feats[2].float().cpu().numpy(),
            "high_res_feats_0": feats[0].float().cpu().numpy(),
            "high_res_feats_1": feats[1].float().cpu().numpy(),
        }

    def load_tracker(self) -> bool:
        """Build SAM 3's video predictor now unless this process has it (``sam3_video``; the image model is not
        needed to track). Returns True when this call built it."""
        from sam3d_pipeline.backends.sam3.video import _PREDICTORS, Sam3VideoTracker

        if self._tracker is None:
            self._tracker = Sam3VideoTracker(self.settings)
        before = len(_PREDICTORS)
        _ = self._tracker.loaded
        return len(_PREDICTORS) != before

    def track(self, frames, request: SegmentRequest):
        """Track ``request``'s object through ``frames`` with SAM 3's video predictor (see ``load_tracker``)."""
        self.load_tracker()
        return self._tracker.track(frames, request)

    def export_click_decoder(self, out_path: Path, quantized: bool = True) -> dict:
        """Export this model's click decoder for the review page, checked against torch before it is written to
        ``out_path``: uint8 weights when ``quantized`` (4.7 MB instead of 16.5 MB, faster in onnxruntime-web),
        else float32.

        Returns:
            The export report (sizes, differences from torch, latency), plus ``weights``.
        """
        import tempfile

        from sam3d_pipeline.backends.sam3.onnx_export import export

        with tempfile.TemporaryDirectory() as tmp:
            report = export(self.loaded.model, Path(tmp) / "decoder.onnx", quantize=quantized)
            Path(out_path).write_bytes(Path(report["quant_path" if quantized else "path"]).read_bytes())
        return report | {"path": str(out_path), "weights": self.loaded.weights}


def usable(settings: Settings) -> str | None:
    """Registry hook: why ``sam3`` cannot run with these settings (None when it can)."""
    if not settings.sam3_checkpoint and not settings.sam3_random_init:
        return "no checkpoint configured (SAM3D_SAM3_CHECKPOINT)"
    try:
        find_bpe_vocab(settings)
    except BackendUnavailableError as exc:
        return str(exc)
    try:
        import torch  # noqa: F401

        sam3_compat.apply()
        import sam3  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (any import failure makes the backend unusable; reported)
        return f"sam3 does not import: {type(exc).__name__}: {exc}"
    return None


__all__ = ["Sam3Segmenter", "load_model", "usable", "xyxy_to_cxcywh_norm", "Box"]
