"""The pipeline's steps as plain functions. Flows wrap each in a task; ``run_plain`` chains them directly.

Steps: read input → decode/validate → plan (resolve backends, output prefix) → segment → select →
reconstruct → render outputs → publish (files first, ``result.json`` last).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from . import backends
from .errors import InputError, PipelineError
from .images import LoadedImage, encode_png, load_image
from .keys import output_prefix_name
from .masks import mask_to_png, overlay, select_instance
from .preview import render_preview
from .report import RunResult
from .settings import Settings, get_settings
from .storage import Storage, open_storage, read_input
from .types import Box, BoxParam, Point, Reconstruction, Segmentation, SegmentRequest

RESULT_FILE = "result.json"
CONTENT_TYPES = {
    "mask.png": "image/png",
    "overlay.png": "image/png",
    "preview.png": "image/png",
    "object.glb": "model/gltf-binary",
    "object.ply": "application/octet-stream",
    "result.json": "application/json",
}


class RunOptions(BaseModel):
    """Per-run knobs (the ``image-to-3d`` flow's parameters, less the image and output root)."""

    prompt: str = Field(min_length=1, max_length=500, description="What to segment, e.g. 'red chair'.")
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
    """Step 2: resolve backends (no model load) and compute the deterministic output prefix.

    Needs only the input's identity (``content_id``), so a file that fails to decode still gets a
    prefix where its failure is recorded.
    """
    s = settings or get_settings()
    seg = backends.resolve("segmenter", options.segmenter, s)
    rec = backends.resolve("reconstructor", options.reconstructor, s)
    seg_info = backends.get_segmenter(seg.name, s).info()
    rec_info = backends.get_reconstructor(rec.name, s).info()
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
    """Step 4: find instances with the planned segmenter."""
    request = segment_request(options, image.width, image.height)
    return backends.get_segmenter(run_plan.segmenter.name, settings).segment(image.rgb, request)


def reconstruct(image: LoadedImage, mask: np.ndarray, options: RunOptions, run_plan: RunPlan,
                settings: Settings | None = None) -> Reconstruction:
    """Step 6: lift the selected mask into a mesh with the planned reconstructor."""
    return backends.get_reconstructor(run_plan.reconstructor.name, settings).reconstruct(
        image.rgb, mask, seed=options.seed
    )


def backend_label(info: dict[str, Any]) -> str:
    weights = "" if info.get("weights") in (None, "none", "checkpoint") else f", {info['weights']}"
    return f"{info['name']} {info['version']}{weights}"


def render_outputs(image: LoadedImage, seg: Segmentation, selected: int | None, recon: Reconstruction | None,
                   run_plan: RunPlan, settings: Settings | None = None) -> dict[str, bytes]:
    """Step 7: encode every output file (except ``result.json``) in memory."""
    s = settings or get_settings()
    mask = seg.instances[selected].mask if selected is not None else None
    files = {
        "overlay.png": encode_png(
            overlay(image.rgb, mask, label=f"segmenter: {backend_label(run_plan.segmenter_info)}")
        )
    }
    if mask is not None:
        files["mask.png"] = mask_to_png(mask)
    if recon is not None:
        label = f"reconstructor: {backend_label(run_plan.reconstructor_info)}"
        files["preview.png"] = encode_png(render_preview(recon.mesh, size_px=s.preview_size_px, label=label))
        files["object.glb"] = export_glb(recon, run_plan)
        if recon.splat_ply is not None:
            files["object.ply"] = recon.splat_ply
    return files


def export_glb(recon: Reconstruction, run_plan: RunPlan) -> bytes:
    """Binary glTF of the mesh with vertex colours; ``scenes[0].extras`` names the producing backends."""
    import trimesh

    scene = trimesh.Scene(recon.mesh)
    scene.metadata.update(
        {
            "generator": "sam3d-pipeline",
            "segmenter": f"{run_plan.segmenter_info.get('name')}@{run_plan.segmenter_info.get('version')}",
            "reconstructor": f"{recon.backend.name}@{recon.backend.version}",
        }
    )
    return trimesh.exchange.gltf.export_glb(scene)


def publish(storage: Storage, prefix: str, files: dict[str, bytes], result: RunResult) -> RunResult:
    """Step 8: write the files, then ``result.json`` last, so a prefix with a result is complete.

    An earlier ``result.json`` at the same prefix is removed first, so readers never pair a new
    file with an old report. Returns the result with ``outputs`` filled in.
    """
    storage.delete(f"{prefix}/{RESULT_FILE}")
    outputs = {}
    for name in sorted(files):
        outputs[name] = storage.write_bytes(f"{prefix}/{name}", files[name], content_type=CONTENT_TYPES.get(name))
    outputs[RESULT_FILE] = storage.uri(f"{prefix}/{RESULT_FILE}")
    result = result.model_copy(update={"outputs": outputs})
    storage.write_bytes(f"{prefix}/{RESULT_FILE}", result_json(result), content_type="application/json")
    return result


def result_json(result: RunResult) -> bytes:
    return json.dumps(result.model_dump(mode="json"), indent=2).encode()


def existing_result(storage: Storage, prefix: str, statuses: tuple[str, ...] = ("completed",)) -> RunResult | None:
    """The result already at ``prefix`` when its status is one of ``statuses`` (a re-run then reuses it).

    A missing, unreadable or other-status result (e.g. ``failed``) returns None: the work must run.
    """
    key = f"{prefix}/{RESULT_FILE}"
    if not storage.exists(key):
        return None
    try:
        result = RunResult.model_validate_json(storage.read_bytes(key))
    except ValueError:
        return None
    return result if result.status in statuses else None


def build_result(
    *,
    status: str,
    image: LoadedImage | None,
    input_uri: str,
    options: RunOptions,
    run_plan: RunPlan | None,
    seg: Segmentation | None = None,
    selected: int | None = None,
    recon: Reconstruction | None = None,
    timings: dict[str, float] | None = None,
    error: BaseException | None = None,
    flow_run_id: str | None = None,
    review: dict[str, Any] | None = None,
) -> RunResult:
    """Assemble the report for any outcome (completed, no_object, failed)."""
    messages = list(seg.messages) if seg else []
    if run_plan:
        messages[:0] = [run_plan.segmenter.reason, run_plan.reconstructor.reason]
    return RunResult(
        status=status,
        input=image.describe() if image else {"uri": input_uri},
        prompt=options.prompt,
        prompt_used_by_segmenter=bool(seg.used_text_prompt) if seg else False,
        segmenter=run_plan.segmenter_info if run_plan else None,
        reconstructor=run_plan.reconstructor_info if run_plan else None,
        instances=[inst.summary(i) for i, inst in enumerate(seg.instances)] if seg else [],
        selected=selected,
        selection=options.selection(),
        review=review or {"mode": "none"},
        mesh=recon.stats if recon else None,
        pose=recon.pose if recon else None,
        timings_s={k: round(v, 3) for k, v in (timings or {}).items()},
        flow_run_id=flow_run_id,
        output_prefix=f"{run_plan.output_root.rstrip('/')}/{run_plan.prefix}" if run_plan else "",
        messages=messages,
        error={"type": type(error).__name__, "code": getattr(error, "code", "error"), "message": str(error)}
        if error
        else None,
    )


def run_plain(image_uri: str, options: RunOptions, output_root: str | None = None,
              settings: Settings | None = None, force: bool = False) -> RunResult:
    """The whole pipeline without Prefect: the baseline the orchestration overhead is measured against."""
    s = settings or get_settings()
    root = output_root or s.output_root
    storage = open_storage(root, s)
    timings: dict[str, float] = {}
    start = t = time.perf_counter()
    data = read_bytes(image_uri, s)
    run_plan = plan(image_uri, content_id(data), options, storage.root, s)
    if not force and (done := existing_result(storage, run_plan.prefix)):
        return done
    image = decode(data, image_uri, s)
    timings["intake"] = time.perf_counter() - t
    t = time.perf_counter()
    seg = segment(image, options, run_plan, s)
    selected = select_instance(seg.instances, options.instance_index)
    timings["segment"] = time.perf_counter() - t
    recon = None
    if selected is not None:
        t = time.perf_counter()
        recon = reconstruct(image, seg.instances[selected].mask, options, run_plan, s)
        timings["reconstruct"] = time.perf_counter() - t
    t = time.perf_counter()
    files = render_outputs(image, seg, selected, recon, run_plan, s)
    timings["render"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    status = "completed" if recon is not None else "no_object"
    result = build_result(status=status, image=image, input_uri=image_uri, options=options, run_plan=run_plan,
                          seg=seg, selected=selected, recon=recon, timings=timings)
    return publish(storage, run_plan.prefix, files, result)


__all__ = ["PipelineError", "RunOptions", "RunPlan", "run_plain"]
