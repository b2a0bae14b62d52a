"""The ``sam3`` tracker: SAM 3's video predictor (``sam3==0.1.4``) behind our ``VideoTracker`` protocol.

A clip's sampled frames are written as a JPEG folder (the predictor's documented input) and go through its
request API: ``handle_request`` ``start_session``, ``add_prompt`` (frame 0, the text prompt and box exemplars),
``handle_stream_request`` ``propagate_in_video`` (forward), and ``close_session`` whatever happens, so a failed
run never keeps a session's frames and features in memory. SAM 3 detects on every frame, so an object first seen
later (or lost and seen again) is still found; the track is the object the detector was most sure of over the
clip.

On CUDA with a checkpoint the predictor is the one ``build_sam3_video_predictor()`` builds. Elsewhere (a CPU, or
random weights) the same predictor class serves the requests around a model built on the right device without
downloading anything (``build_sam3_video_model(load_from_HF=False)``); on a CPU the requests run under bfloat16
autocast, as they do on a GPU, and ``sam3_compat.apply_video`` covers the few CUDA-only lines they reach.
Importing this module imports torch and sam3.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sam3d_pipeline.backends.sam3 import compat as sam3_compat
from sam3d_pipeline.backends.sam3 import version as sam3_version
from sam3d_pipeline.backends.sam3.assets import find_bpe_vocab, resolve_checkpoint
from sam3d_pipeline.backends.sam3.build import RANDOM_INIT_SEED, UNINITIALISED_PARAMS, pick_device
from sam3d_pipeline.errors import BackendUnavailableError, InputError
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import BackendInfo, SegmentRequest, Track

log = logging.getLogger(__name__)

JPEG_QUALITY = 95
VIDEO_LIMITS = (
    "video: tracks one object, the one SAM 3 is most sure of over the clip; clicks are not used on videos",
)


@dataclass
class LoadedPredictor:
    """A built SAM 3 video predictor plus what we know about it."""

    predictor: object
    device: str
    weights: str  # "checkpoint" or "random-init"
    build_s: float
    compat: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


_PREDICTORS: dict[tuple[str, str, bool], LoadedPredictor] = {}
_PREDICTORS_LOCK = threading.Lock()


def _predictor_class():
    from sam3.model.sam3_video_predictor import Sam3VideoPredictor

    class LocalVideoPredictor(Sam3VideoPredictor):
        """``Sam3VideoPredictor``'s request handling around a model we built (any device, no download)."""

        def __init__(self, model):  # the parent's __init__ builds and moves the model to CUDA itself
            self.async_loading_frames = False
            self.video_loader_type = "cv2"
            self.model = model

        def _get_session_stats(self):  # the parent's reads CUDA memory counters
            return f"live sessions: {len(self._ALL_INFERENCE_STATES)}"

        def _get_torch_and_gpu_properties(self):
            import torch

            return f"torch {torch.__version__} on {self.model.device}"

    return LocalVideoPredictor


def load_predictor(settings: Settings) -> LoadedPredictor:
    """Build (once per process) SAM 3's video predictor.

    Raises:
        BackendUnavailableError: no checkpoint and random init not requested; vocabulary missing.
    """
    import torch

    if not settings.sam3_checkpoint and not settings.sam3_random_init:
        raise BackendUnavailableError("sam3 video tracking needs a checkpoint: set SAM3D_SAM3_CHECKPOINT, or "
                                      "SAM3D_SAM3_RANDOM_INIT=true for a smoke test")
    device = pick_device(settings.sam3_device)
    random_init = bool(settings.sam3_random_init and not settings.sam3_checkpoint)
    key = (settings.sam3_checkpoint or "", device, random_init)
    with _PREDICTORS_LOCK:
        if key in _PREDICTORS:
            return _PREDICTORS[key]
        compat = sam3_compat.apply_video()
        from sam3.model_builder import build_sam3_video_model, build_sam3_video_predictor

        vocab = find_bpe_vocab(settings)
        ckpt = resolve_checkpoint(settings)
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            if ckpt is not None and device == "cuda":
                predictor = build_sam3_video_predictor(checkpoint_path=str(ckpt.path), bpe_path=str(vocab))
            else:
                model = build_sam3_video_model(checkpoint_path=str(ckpt.path) if ckpt else None, load_from_HF=False,
                                               bpe_path=str(vocab), device=device)
                if ckpt is None:
                    _fill_uninitialised(model)
                predictor = _predictor_class()(model.to(device).eval())
        loaded = LoadedPredictor(predictor, device, "checkpoint" if ckpt else "random-init",
                                 time.perf_counter() - started, compat)
        _PREDICTORS[key] = loaded
        log.info("SAM 3 video predictor built on %s in %.1f s (%s)", device, loaded.build_s, loaded.weights)
        return loaded


def _fill_uninitialised(model) -> None:
    """Random init leaves the text encoder's ``torch.empty`` parameters (and any non-finite one) unset."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(UNINITIALISED_PARAMS) or not torch.isfinite(param).all():
                torch.nn.init.normal_(param, std=0.02)


def xyxy_to_xywh_norm(box: tuple[float, float, float, float], width: int, height: int) -> list[float]:
    """An xyxy pixel box as the normalised ``[x, y, w, h]`` that ``add_prompt``'s ``bounding_boxes`` take."""
    x0, y0 = max(0.0, box[0]), max(0.0, box[1])
    x1, y1 = min(float(width), box[2]), min(float(height), box[3])
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"box {tuple(box)}: no area inside the {width}x{height} frame")
    return [x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height]


class Sam3VideoTracker:
    """Tracks the prompted object through a clip with SAM 3's video predictor (see module docstring)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._loaded: LoadedPredictor | None = None

    @property
    def loaded(self) -> LoadedPredictor:
        if self._loaded is None:
            self._loaded = load_predictor(self.settings)
        return self._loaded

    def info(self) -> BackendInfo:
        base = sam3_version.describe(self.settings, self._loaded.device if self._loaded else None)
        return BackendInfo(base.name, base.version, base.device, base.limits + VIDEO_LIMITS, base.weights)

    @contextmanager
    def _precision(self) -> Iterator[None]:
        """bfloat16 autocast on the CPU, as the predictor's own CUDA autocast does on a GPU."""
        import torch

        if self.loaded.device == "cpu":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                yield
        else:
            yield

    def track(self, frames: Sequence[np.ndarray], request: SegmentRequest) -> Track:
        """Track ``request``'s object through ``frames`` (each ``(H, W, 3)`` uint8, one size).

        Returns:
            One mask ``(H, W)`` bool and SAM 3's score (in [0, 1]) per frame for the object with the highest
            total score; all False / 0.0 on frames without it.
        """
        from PIL import Image

        if not frames:
            raise InputError("no frames to track")
        height, width = frames[0].shape[:2]
        loaded = self.loaded
        messages = []
        per_frame: dict[int, dict] = {}
        timings: dict[str, float] = {}
        with loaded.lock, tempfile.TemporaryDirectory(prefix="sam3d-frames-") as folder:
            started = time.perf_counter()
            for i, rgb in enumerate(frames):
                Image.fromarray(rgb).save(Path(folder) / f"{i:05d}.jpg", quality=JPEG_QUALITY)
            predictor = loaded.predictor
            with self._precision():
                session = predictor.handle_request({"type": "start_session", "resource_path": folder})["session_id"]
                timings["start_session"] = time.perf_counter() - started
                try:
                    prompt: dict = {"type": "add_prompt", "session_id": session, "frame_index": 0,
                                    "text": request.prompt.strip() or "visual"}
                    if request.boxes:
                        prompt["bounding_boxes"] = [xyxy_to_xywh_norm(b.as_tuple(), width, height)
                                                    for b in request.boxes]
                        prompt["bounding_box_labels"] = [1] * len(request.boxes)
                    t = time.perf_counter()
                    answer = predictor.handle_request(prompt)
                    per_frame[int(answer["frame_index"])] = _outputs(answer["outputs"])
                    timings["add_prompt"] = time.perf_counter() - t
                    t = time.perf_counter()
                    for item in predictor.handle_stream_request({
                        "type": "propagate_in_video", "session_id": session, "propagation_direction": "forward",
                        "start_frame_index": 0,
                    }):
                        per_frame[int(item["frame_index"])] = _outputs(item["outputs"])
                    timings["propagate"] = time.perf_counter() - t
                finally:
                    predictor.handle_request({"type": "close_session", "session_id": session})
        if request.points:
            messages.append(f"{len(request.points)} click(s) not used: the video tracker takes text and boxes")
        totals: dict[int, float] = {}
        for out in per_frame.values():
            for obj_id, prob in zip(out["ids"], out["probs"], strict=True):
                totals[obj_id] = totals.get(obj_id, 0.0) + prob
        masks = [np.zeros((height, width), bool) for _ in frames]
        scores = [0.0] * len(frames)
        found_at = None
        if totals:
            best = max(totals, key=lambda k: (totals[k], -k))
            for position in range(len(frames)):
                out = per_frame.get(position)
                if out is None or best not in out["ids"]:
                    continue
                j = out["ids"].index(best)
                mask = out["masks"][j]
                if mask.shape != (height, width):
                    import cv2

                    mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
                if mask.any():
                    masks[position], scores[position] = mask, float(np.clip(out["probs"][j], 0.0, 1.0))
                    found_at = position if found_at is None else found_at
            messages.append(f"tracked object {best} of {len(totals)} SAM 3 found in the clip")
        else:
            messages.append(f"SAM 3 found nothing for {request.prompt!r} in any sampled frame")
        messages.append("timings_s " + ", ".join(f"{k}={v:.2f}" for k, v in timings.items()))
        if loaded.weights == "random-init":
            messages.append("random weights: output is not a real segmentation")
        return Track(masks, scores, self.info(), used_text_prompt=bool(request.prompt.strip()), found_at=found_at,
                     messages=messages)


def _outputs(outputs: dict) -> dict:
    """The predictor's per-frame outputs as plain arrays: object ids, probabilities, ``(N, H, W)`` bool masks."""
    import torch

    def array(value):
        return value.float().cpu().numpy() if isinstance(value, torch.Tensor) and value.is_floating_point() else (
            value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value))

    return {"ids": [int(i) for i in array(outputs["out_obj_ids"]).reshape(-1)],
            "probs": [float(p) for p in array(outputs["out_probs"]).reshape(-1)],
            "masks": array(outputs["out_binary_masks"]).astype(bool)}
