"""The pipeline's steps as plain functions. Flows wrap each in a task; ``run_plain`` chains them directly.

Steps: read input → decode/validate → plan (resolve backends, output prefix) → segment → select →
reconstruct → render outputs → publish (files first, ``result.json`` last).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from . import backends, finish, gpu_stages
from .errors import InputError, PipelineError
from .images import LoadedImage, load_image
from .keys import output_prefix_name
from .masks import select_instance
from .report import RunResult
from .settings import Settings, get_settings
from .storage import open_storage, read_input
from .types import PROMPT_MAX_CHARS, Box, BoxParam, Point, Reconstruction, Segmentation, SegmentRequest


class RunOptions(BaseModel):
    """Per-run knobs (the ``image-to-3d`` flow's parameters, less the image and output root)."""

    prompt: str = Field(min_length=1, max_length=PROMPT_MAX_CHARS, description="What to segment, e.g. 'red chair'.")
    boxes: list[BoxParam] = Field(default_factory=list, description="Box prompts, xyxy in image pixels.")
    points: list[Point] = Field(default_factory=list, description="Click prompts in image pixels.")
    instance_index: int | None = Field(None, ge=0, description="Instance to reconstruct; default: highest score.")
    segmenter: Literal["auto", "lite", "sam3"] = "auto"
    reconstructor: Literal["auto", "lite", "sam3d"] = "auto"
    seed: int = Field(0, ge=0, description="Seed for stochastic reconstructors.")

    @field_validator("prompt")
    @classmethod
    def _strip(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("prompt is blank")
        return value

    def selection(self) -> dict[str, Any]:
        return {
            "boxes": [list(b) for b in self.boxes],
            "points": [p.as_dict() for p in self.points],
            "instance_index": self.instance_index,
        }


@dataclass
class RunPlan:
    """What a run will do and where it writes, decided before any model is loaded."""

    input_uri: str
    output_root: str
    prefix: str
    segmenter: backends.Resolved
    reconstructor: backends.Resolved
    segmenter_info: dict[str, Any] = field(default_factory=dict)
    reconstructor_info: dict[str, Any] = field(default_factory=dict)


def read_bytes(uri: str, settings: Settings | None = None) -> bytes:
    """Step 1: the input's bytes (local path or s3:// URI)."""
    return read_input(uri, settings)


def decode(data: bytes, uri: str, settings: Settings | None = None) -> LoadedImage:
    """Step 3: decode and validate the photo."""
    return load_image(data, source=uri, max_pixels=(settings or get_settings()).max_pixels)


def content_id(data: bytes) -> str:
    """The input's identity in output keys: ``sha256:<hex>`` of its bytes."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def plan(input_uri: str, input_id: str, options: RunOptions, output_root: str,
         settings: Settings | None = None, review_mode: str = "none") -> RunPlan:
    """Step 2: resolve backends (no model load, no torch import) and compute the deterministic output prefix.

    Needs only the input's identity (``content_id``), so a file that fails to decode still gets a
    prefix where its failure is recorded.
    """
    s = settings or get_settings()
    seg = backends.resolve("segmenter", options.segmenter, s)
    rec = backends.resolve("reconstructor", options.reconstructor, s)
    seg_info = backends.describe("segmenter", seg.name, s)
    rec_info = backends.describe("reconstructor", rec.name, s)
    hash_options = options.selection() | {
        "score_threshold": s.score_threshold,
        "min_instance_area_fraction": s.min_instance_area_fraction,
        "seed": options.seed,
    }
    if review_mode != "none":  # a reviewed result is a different result
        hash_options |= {"review": review_mode}
    if rec.name == "lite":
        hash_options |= {"lite_mesh_resolution": s.lite_mesh_resolution, "lite_thickness": s.lite_thickness}
    if rec.name == "sam3d":  # what changes SAM 3D Objects' output (low-memory mode does not)
        hash_options |= {"sam3d_dtype": s.sam3d_dtype, "sam3d_ss_steps": s.sam3d_ss_steps,
                         "sam3d_slat_steps": s.sam3d_slat_steps, "sam3d_decode_formats": list(s.sam3d_decode_formats)}
    prefix = output_prefix_name(
        input_uri,
        content_id=input_id,
        prompt=options.prompt,
        options=hash_options,
        backends={"segmenter": seg_info.key(), "reconstructor": rec_info.key()},
    )
    return RunPlan(
        input_uri=input_uri,
        output_root=output_root,
        prefix=prefix,
        segmenter=seg,
        reconstructor=rec,
        segmenter_info=seg_info.as_dict() | {"chosen_because": seg.reason},
        reconstructor_info=rec_info.as_dict() | {"chosen_because": rec.reason},
    )


def segment_request(options: RunOptions, width: int, height: int) -> SegmentRequest:
    """Validate box and click prompts against the image and build the backend request.

    Raises:
        InputError: a degenerate box, or a box or click outside the ``width`` x ``height`` image.
    """
    boxes = []
    for x0, y0, x1, y1 in options.boxes:
        if not (x1 > x0 and y1 > y0):
            raise InputError(f"box {[x0, y0, x1, y1]} is empty: need x0 < x1 and y0 < y1")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise InputError(f"box {[x0, y0, x1, y1]} lies outside the {width}x{height} image")
        boxes.append(Box(x0, y0, x1, y1))
    points = []
    for p in options.points:
        if not (0 <= p.x < width and 0 <= p.y < height):
            raise InputError(f"point ({p.x}, {p.y}) lies outside the {width}x{height} image")
        points.append(p)
    return SegmentRequest(prompt=options.prompt, boxes=tuple(boxes), points=tuple(points))


def segment(
    image: LoadedImage, options: RunOptions, run_plan: RunPlan, settings: Settings | None = None
) -> Segmentation:
    """Step 4: find instances with the planned segmenter, in this process."""
    request = segment_request(options, image.width, image.height)
    seg, timing = gpu_stages.segment_photo(image, request, run_plan.segmenter.name, settings or get_settings())
    seg.stage = in_process_stage(timing)
    return seg


def reconstruct(image: LoadedImage, mask: np.ndarray, options: RunOptions, run_plan: RunPlan,
                settings: Settings | None = None) -> Reconstruction:
    """Step 6: lift the selected mask into a mesh with the planned reconstructor, in this process."""
    (recon,), timing = gpu_stages.reconstruct_masks([(image, mask, options.seed, run_plan.input_uri)],
                                                    run_plan.reconstructor.name, settings or get_settings())
    recon.stage = in_process_stage(timing)
    return recon


def in_process_stage(timing: dict[str, float]) -> dict[str, Any]:
    """The ``stages`` entry of a stage that ran in this process (no queue, no worker session)."""
    return {"worker": "inline", "model_load_s": round(timing["model_load_s"], 6), "queue_wait_s": 0.0,
            "run_s": round(timing["run_s"], 3)}


def run_plain(image_uri: str, options: RunOptions, output_root: str | None = None,
              settings: Settings | None = None, force: bool = False) -> RunResult:
    """The whole pipeline without Prefect: the baseline the orchestration overhead is measured against."""
    s = settings or get_settings()
    storage = open_storage(output_root or s.output_root, s)
    record = finish.RunRecord(input_uri=image_uri, options=options)
    t = time.perf_counter()
    data = read_bytes(image_uri, s)
    record.run_plan = plan(image_uri, content_id(data), options, storage.root, s)
    if not force and (done := finish.existing_result(storage, record.run_plan.prefix)):
        return done
    record.image = decode(data, image_uri, s)
    record.timings["intake"] = time.perf_counter() - t
    t = time.perf_counter()
    record.seg = segment(record.image, options, record.run_plan, s)
    record.selected = select_instance(record.seg.instances, options.instance_index)
    record.timings["segment"] = time.perf_counter() - t
    if record.selected is not None:
        t = time.perf_counter()
        record.recon = reconstruct(record.image, record.seg.instances[record.selected].mask, options,
                                   record.run_plan, s)
        record.timings["reconstruct"] = time.perf_counter() - t
    return finish.finish_run(storage, record, s)


__all__ = ["PipelineError", "RunOptions", "RunPlan", "run_plain"]
