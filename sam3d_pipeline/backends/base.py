"""Backend protocols. Adapters take and return our own types (see ``sam3d_pipeline.types``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from sam3d_pipeline.types import BackendInfo, Reconstruction, Segmentation, SegmentRequest, Track


@runtime_checkable
class Segmenter(Protocol):
    """Finds object instances in a photo."""

    def info(self) -> BackendInfo:
        """Name, version, device and limits (cheap: must not load a model)."""
        ...

    def segment(self, rgb: np.ndarray, request: SegmentRequest) -> Segmentation:
        """Segment ``rgb`` (``(H, W, 3)`` uint8) for ``request``.

        Returns:
            Instances best first; masks ``(H, W)`` bool at image size, boxes xyxy pixels clipped.
        """
        ...


@runtime_checkable
class VideoTracker(Protocol):
    """Follows the requested object through a clip (segmenters that can track: ``lite``, ``sam3``)."""

    def track(self, frames: Sequence[np.ndarray], request: SegmentRequest) -> Track:
        """Track the object ``request`` names through ``frames`` (each ``(H, W, 3)`` uint8, one size).

        Boxes and clicks are pixels of the first frame. Returns one mask ``(H, W)`` bool and one score per frame.
        """
        ...


@runtime_checkable
class Reconstructor(Protocol):
    """Lifts one masked object into a 3D mesh (and optionally a Gaussian splat and pose)."""

    def info(self) -> BackendInfo:
        """Name, version, device and limits (cheap: must not load a model)."""
        ...

    def reconstruct(self, rgb: np.ndarray, mask: np.ndarray, *, seed: int = 0) -> Reconstruction:
        """Reconstruct the object under ``mask`` (``(H, W)`` bool) in ``rgb`` (``(H, W, 3)`` uint8)."""
        ...


@runtime_checkable
class Embedder(Protocol):
    """Computes what a click decoder consumes for one image (segmenters with an interactive decoder)."""

    def embeddings(self, rgb: np.ndarray) -> dict[str, np.ndarray]:
        """Feature tensors for ``rgb`` (``(H, W, 3)`` uint8), name → float32 array ``(1, C, h, w)``."""
        ...

    def version(self) -> str:
        """The model version; a click decoder belongs to exactly one."""
        ...

    def export_click_decoder(self, out_path: Path, quantized: bool = True) -> dict:
        """Write the click decoder that consumes :meth:`embeddings` as ONNX to ``out_path`` (uint8 weights when
        ``quantized``, else float32); return a report."""
        ...
