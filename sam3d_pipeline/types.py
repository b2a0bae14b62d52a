"""Domain types shared by backends, flows and reports. Backends return these, never vendor objects.

Conventions: images are ``(H, W, 3)`` uint8 RGB arrays; masks are ``(H, W)`` bool arrays at image size;
boxes are ``(x0, y0, x1, y1)`` in pixels, x to the right, y down, clipped to the image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, Field, create_model
from pydantic.dataclasses import dataclass as pydantic_dataclass


@dataclass(frozen=True)
class BackendInfo:
    """Which backend produced a result.

    Attributes:
        name: registry name (``lite``, ``sam3``, ``sam3d``).
        version: backend/algorithm version; part of the output key.
        device: ``cpu``, ``cuda:0``, ...
        limits: plain-language limits printed in logs and reports.
        weights: ``checkpoint``, ``random-init`` or ``none`` (classical algorithm).
        checkpoint_sha256: first 12 hex digits of the weights file's sha256, where a checkpoint was loaded.
        dtype: the inference dtype, where the backend runs a network (``float32``, ``bfloat16``, ...).
    """

    name: str
    version: str
    device: str = "cpu"
    limits: tuple[str, ...] = ()
    weights: str = "none"
    checkpoint_sha256: str | None = None
    dtype: str | None = None

    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "device": self.device,
            "weights": self.weights,
            "limits": list(self.limits),
        } | {k: v for k, v in (("checkpoint_sha256", self.checkpoint_sha256), ("dtype", self.dtype)) if v}


# Coordinates arrive from people and programs (CLI, manifests, the UI form, the review API): NaN and
# ±Infinity are refused where they enter, so no result ever stores an infinite box as ``null``.
Coordinate = Annotated[float, Field(allow_inf_nan=False)]

# The longest text prompt any entry point accepts (flow parameter, CLI, manifest row).
PROMPT_MAX_CHARS = 500


def clean_prompt(text: str) -> str:
    """``text`` without leading and trailing whitespace or invisible format characters (zero-width space and
    joiners, word joiner, BOM: Unicode category Cf); empty when nothing visible is left."""
    import unicodedata

    cut = " \t\n\r\x0b\x0c"
    visible = [i for i, ch in enumerate(text) if not (ch.isspace() or ch in cut or unicodedata.category(ch) == "Cf")]
    return text[visible[0]:visible[-1] + 1] if visible else ""


@pydantic_dataclass(frozen=True)
class Point:
    """A click in image pixels; ``label`` 1 = on the object, 0 = background.

    The one point type: backends, flow parameters (the UI form), manifests and the review API all use it.
    Build it positionally (``Point(10, 20, 0)``) or from ``{"x": .., "y": .., "label": ..}``.
    """

    x: Coordinate
    y: Coordinate
    label: Literal[0, 1] = 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# A box prompt as parameters carry it: xyxy in image pixels.
BoxParam = tuple[Coordinate, Coordinate, Coordinate, Coordinate]

# The most prompts one request may carry (every entry point: flow parameters, job API, CLI, manifests, review
# answers). A person clicks a handful; the bound keeps a hostile request from costing memory and minutes.
MAX_POINTS = 64
MAX_BOXES = 16
PointList = Annotated[list[Point], Field(max_length=MAX_POINTS)]
BoxList = Annotated[list[BoxParam], Field(max_length=MAX_BOXES)]


def bounded_point_model(width: int, height: int) -> type[BaseModel]:
    """A model of ``Point`` whose JSON schema also bounds x and y to a ``width`` x ``height`` image.

    The review pause's form uses it, so the Prefect server itself refuses a click outside the image.
    """
    return create_model(
        "ReviewPoint", __base__=BaseModel, x=(Annotated[float, Field(ge=0, lt=width)], ...),
        y=(Annotated[float, Field(ge=0, lt=height)], ...), label=(Literal[0, 1], 1),
    )


@dataclass(frozen=True)
class Box:
    """An xyxy box in pixels."""

    x0: float
    y0: float
    x1: float
    y1: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True)
class SegmentRequest:
    """What to segment: a text prompt plus optional box and click prompts (pixels).

    ``prior_mask`` (``(H, W)`` bool) is the mask being refined, when clicks refine an earlier result.
    """

    prompt: str
    boxes: tuple[Box, ...] = ()
    points: tuple[Point, ...] = ()
    prior_mask: np.ndarray | None = field(default=None, compare=False)


@dataclass
class Instance:
    """One detected object.

    Attributes:
        mask: ``(H, W)`` bool at image size.
        box: xyxy pixels, clipped to the image.
        score: confidence in [0, 1] (see the backend's docstring for what it means).
    """

    mask: np.ndarray
    box: tuple[float, float, float, float]
    score: float

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def summary(self, index: int) -> dict[str, Any]:
        return {
            "index": index,
            "score": round(float(self.score), 4),
            "box": [round(float(v), 1) for v in self.box],
            "area": self.area,
        }


@dataclass
class Segmentation:
    """All instances found for one request, best first."""

    instances: list[Instance]
    backend: BackendInfo
    used_text_prompt: bool
    messages: list[str] = field(default_factory=list)
    stage: dict[str, Any] = field(default_factory=dict)  # where it ran: worker, model_load_s, queue_wait_s, run_s


@dataclass
class Reconstruction:
    """A reconstructed object.

    Attributes:
        mesh: a ``trimesh.Trimesh`` with per-vertex colours, y up, metres-like units.
        splat_ply: Gaussian-splat PLY bytes when the backend produces one.
        pose: ``{"rotation": [w,x,y,z], "translation": [x,y,z], "scale": [x,y,z]}`` or None.
        backend: who produced it.
        stats: vertex/face counts, watertightness, ...
        stage: where it ran: ``worker``, ``model_load_s``, ``queue_wait_s``, ``run_s``.
    """

    mesh: Any
    backend: BackendInfo
    splat_ply: bytes | None = None
    pose: dict[str, list[float]] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    stage: dict[str, Any] = field(default_factory=dict)


@dataclass
class Track:
    """One object followed through a clip's sampled frames.

    Attributes:
        masks: one ``(H, W)`` bool mask per sampled frame, in frame order; all False where the object was not found.
        scores: one confidence per frame in [0, 1] (0.0 where not found; see the backend for what it means).
        backend: who tracked it.
        used_text_prompt: False when the tracker cannot read text (lite).
        found_at: position of the first frame where the object was found (None: never found).
        messages: what the tracker did (re-acquisitions, frames lost, the prompt's fate).
    """

    masks: list[np.ndarray]
    scores: list[float]
    backend: BackendInfo
    used_text_prompt: bool
    found_at: int | None = None
    messages: list[str] = field(default_factory=list)

    @property
    def tracked(self) -> int:
        """How many frames hold the object."""
        return sum(1 for mask in self.masks if mask.any())
