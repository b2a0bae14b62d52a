"""The pipeline's steps as plain functions. Flows wrap each in a task; ``run_plain`` chains them directly.

Steps: read input → decode/validate → plan (resolve backends, output prefix) → segment → select →
reconstruct → render outputs → publish (files first, ``result.json`` last).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from sam3d_pipeline import backends, video
from sam3d_pipeline.errors import InputError, PipelineError
from sam3d_pipeline.export import ProfileName
from sam3d_pipeline.gpu import stages as gpu_stages
from sam3d_pipeline.images import LoadedImage, load_image
from sam3d_pipeline.keys import content_id, output_prefix_name
from sam3d_pipeline.masks import select_instance
from sam3d_pipeline.run import finish, objects
from sam3d_pipeline.run.report import RunResult
from sam3d_pipeline.settings import Settings, get_settings
from sam3d_pipeline.storage import open_storage
from sam3d_pipeline.types import (
    PROMPT_MAX_CHARS,
    Box,
    BoxList,
    PointList,
    Reconstruction,
    Segmentation,
    SegmentRequest,
    Track,
    clean_prompt,
)
from sam3d_pipeline.video.views import VideoRun, best_views, score_views


class RunOptions(BaseModel):
    """Per-run knobs (the ``image-to-3d`` flow's parameters, less the image and output root)."""

    prompt: str = Field(min_length=1, max_length=PROMPT_MAX_CHARS, description="What to segment, e.g. 'red chair'.")
    boxes: BoxList = Field(default_factory=list, description="Box prompts, xyxy in image pixels (at most 16).")
    points: PointList = Field(default_factory=list, description="Click prompts in image pixels (at most 64).")
    instance_index: int | None = Field(None, ge=0, description="Instance to reconstruct; default: highest score.")
    segmenter: Literal["auto", "lite", "sam3"] = "auto"
    reconstructor: Literal["auto", "lite", "sam3d"] = "auto"
    seed: int = Field(0, ge=0, description="Seed for stochastic reconstructors.")
    video_frames: int = Field(
        1, ge=1, le=8, description="Video input: reconstruct from the best tracked frame (1), or from the K best and "
        "keep the one the reconstructor scores highest (when it scores its output; else the best view).")
    instances: Literal["best", "all"] | list[Annotated[int, Field(ge=0)]] = Field(
        "best", description="Objects to reconstruct: best (the selected instance), all, or instance indices.")
    profile: ProfileName = Field(
        "web", description="web: simplified to the triangle budget, quantised GLB; ar: simplified, plain GLB; "
        "raw: the reconstructor's mesh as it came; store: textured PBR GLB and USDZ checked against the "
        "marketplaces' rules.")
    export: list[Literal["glb", "usdz", "obj", "ply"]] = Field(
        default_factory=lambda: ["glb", "usdz"], min_length=1,
        description="Formats of every object: glb, usdz (AR Quick Look), obj (+ mtl, texture), ply (the splat).")

    @field_validator("instances")
    @classmethod
    def _instances(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("instances: give at least one index, or best / all")
            return sorted(set(value))
        return value

    @field_validator("export")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    def export_options(self) -> dict[str, Any]:
        """What changes the exported files (part of the output prefix)."""
        return {"instances": self.instances, "profile": self.profile, "export": sorted(self.export)}

    @field_validator("prompt")
    @classmethod
    def _strip(cls, value: str) -> str:
        value = clean_prompt(value)
        if not value:
            raise ValueError("prompt is blank (only spaces or invisible characters)")
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
    """Step 1: the input's bytes (local path or s3:// URI); for a folder / prefix of video frames, the manifest
    that names them (``video.read_clip``)."""
    return video.read_clip(uri, settings)


def decode(data: bytes, uri: str, settings: Settings | None = None) -> LoadedImage:
    """Step 3: decode and validate the photo."""
    return load_image(data, source=uri, max_pixels=(settings or get_settings()).max_pixels)


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
    hash_options |= {"export": options.export_options() | {
        "max_triangles": s.export_max_triangles, "max_bytes": s.export_max_bytes,
        "texture_max_px": s.export_texture_max_px, "default_size_m": s.export_default_size_m},
        "preview_size_px": s.preview_size_px}
    if review_mode != "none":  # a reviewed result is a different result
        hash_options |= {"review": review_mode}
    if video.is_video_uri(input_uri):  # what changes which frames are read and which one is reconstructed
        hash_options |= {"video": {"frames": options.video_frames, "stride": s.video_stride,
                                   "max_frames": s.video_max_frames, "max_seconds": s.video_max_seconds,
                                   "folder_fps": s.video_folder_fps}}
    if seg.name == "lite":  # the settings that change each segmenter's masks
        hash_options |= {"lite_work_size_px": s.lite_work_size_px}
    if seg.name == "sam3":
        hash_options |= {"sam3_confidence_threshold": s.sam3_confidence_threshold}
    if rec.name == "lite":
        hash_options |= {"lite_mesh_resolution": s.lite_mesh_resolution, "lite_thickness": s.lite_thickness}
    if rec.name == "sam3d":  # what changes SAM 3D Objects' output (low-memory mode does not)
        from sam3d_pipeline.backends.sam3d_reconstructor import sampling

        plan = sampling(s)
        hash_options |= {"sam3d_dtype": s.sam3d_dtype, "sam3d_ss_steps": plan.ss_steps,
                         "sam3d_slat_steps": plan.slat_steps, "sam3d_decode_formats": list(s.sam3d_decode_formats)}
        if plan.distillation:  # (absent otherwise: the keys of earlier results stay the same)
            hash_options["sam3d_distillation"] = True
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


def reconstruct_objects(image: LoadedImage, seg: Segmentation, indices: list[int], options: RunOptions,
                        run_plan: RunPlan, settings: Settings | None = None) -> dict[int, Reconstruction]:
    """Step 6 for several objects of one photo: reconstructed together (one point map), in this process."""
    s = settings or get_settings()
    recons, timing = objects.reconstruct_together(image, {i: seg.instances[i].mask for i in indices}, options.seed,
                                                  run_plan.input_uri, run_plan.reconstructor.name, s)
    for recon in recons.values():
        recon.stage = in_process_stage(timing) | {"objects": len(recons)}
    return recons


def in_process_stage(timing: dict[str, float]) -> dict[str, Any]:
    """The ``stages`` entry of a stage that ran in this process (no queue, no worker session)."""
    return {"worker": "inline", "model_load_s": round(timing["model_load_s"], 6), "queue_wait_s": 0.0,
            "run_s": round(timing["run_s"], 3)}


def decode_video(data: bytes, uri: str, settings: Settings | None = None) -> video.LoadedVideo:
    """Step 3 for a clip: decode, validate and sample its frames (``video.load_video``)."""
    return video.load_video(data, source=uri, settings=settings or get_settings())


def track_video(clip: video.LoadedVideo, options: RunOptions, run_plan: RunPlan,
                settings: Settings | None = None) -> VideoRun:
    """Step 4 for a clip, in this process: follow the object through the sampled frames, then ``choose_views``.

    Raises:
        InputError: a box or click outside the first frame.
        BackendUnavailableError: the segmenter cannot track.
    """
    s = settings or get_settings()
    request = segment_request(options, clip.width, clip.height)
    track, timing = gpu_stages.track_frames([f.rgb for f in clip.frames], request, run_plan.segmenter.name, s)
    return choose_views(clip, track, options.video_frames, in_process_stage(timing))


def choose_views(clip: video.LoadedVideo, track: Track, count: int, stage: dict[str, Any],
                 chosen_position: int | None = None) -> VideoRun:
    """Score every tracked frame and choose the ``count`` best views (wherever the track was made: ``stage``).

    ``chosen_position``: the view already reconstructed (a GPU batch chose it), kept as the chosen one.
    """
    views = score_views(clip, track)
    candidates = best_views(views, count)
    if chosen_position is not None:
        candidates = [views[chosen_position]] + [v for v in candidates if v.position != chosen_position]
    return VideoRun(clip, track, views, candidates[:max(count, 1)], stage=stage)


def start_from_video(record: Any, run: VideoRun) -> None:
    """The chosen frame of a tracked clip becomes the run's photo and the tracked mask there its segmentation (no
    instance when the object was never found). ``record``: a ``finish.RunRecord`` or a catalog item's work (any
    object with ``video``, ``image``, ``seg`` and ``messages``)."""
    record.video = run
    chosen = run.chosen
    record.image = run.video.frame_image(chosen.position if chosen else 0)
    record.seg = run.view_segmentation()
    if chosen is not None:
        record.messages.append(f"video: reconstructed from frame {chosen.index} ({chosen.time_s:.2f} s), the best of "
                               f"{run.track.tracked} tracked frames (view score {chosen.view_score:.3f})")


def pick_view(record: Any, index: int) -> None:
    """The reviewer picked source frame ``index`` of a tracked clip: it becomes the run's photo and the tracked mask
    there its segmentation (its one instance selected), instead of the view chosen by score. ``record``: a
    ``finish.RunRecord`` with ``video``.

    Raises:
        KeyError: the clip has no sampled frame ``index``.
    """
    run = record.video
    view, before = run.view_at(index), run.chosen
    if view == before:
        return
    run.chosen, run.chosen_by = view, "reviewer"
    record.image = run.video.frame_image(view.position)
    record.seg = run.view_segmentation(view)
    record.selected = select_instance(record.seg.instances, None)
    record.messages.append(
        f"video: the reviewer picked frame {view.index} ({view.time_s:.2f} s, view score {view.view_score:.3f}) "
        f"instead of frame {before.index if before else None}: reconstructed from frame {view.index}")


def try_other_views(record: finish.RunRecord,
                    reconstruct_view: Callable[[LoadedImage, Segmentation], Reconstruction]) -> None:
    """``video_frames`` > 1: reconstruct the other candidate views too and keep the one the reconstructor scores
    highest (``stats["score"]``). A reconstructor that does not score its output keeps the best view, untried; a
    frame the reviewer picked is kept as it is."""
    run = record.video
    if run is None or len(run.candidates) < 2 or record.recon is None or run.chosen is None:
        return
    if run.chosen_by == "reviewer":
        record.messages.append(f"video: {len(run.candidates)} candidate views, but the reviewer picked frame "
                               f"{run.chosen.index}: the others were not reconstructed")
        return
    if not isinstance(record.recon.stats.get("score"), int | float):
        record.messages.append(f"video: {len(run.candidates)} candidate views, but the reconstructor does not score "
                               "its output: kept the best view without reconstructing the others")
        return
    best = (float(record.recon.stats["score"]), run.chosen, record.image, record.seg, record.recon)
    run.candidate_scores[run.chosen.position] = best[0]
    for view in run.candidates:
        if view.position == run.chosen.position:
            continue
        image, seg = run.video.frame_image(view.position), run.view_segmentation(view)
        recon = reconstruct_view(image, seg)
        score = float(recon.stats.get("score", 0.0))
        run.candidate_scores[view.position] = score
        if score > best[0]:
            best = (score, view, image, seg, recon)
    if best[1] != run.chosen:
        run.chosen_by = "reconstructor_score"
    _, run.chosen, record.image, record.seg, record.recon = best


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
    if video.is_video_uri(image_uri):
        clip = decode_video(data, image_uri, s)
        record.timings["intake"] = time.perf_counter() - t
        t = time.perf_counter()
        start_from_video(record, track_video(clip, options, record.run_plan, s))
    else:
        record.image = decode(data, image_uri, s)
        record.timings["intake"] = time.perf_counter() - t
        t = time.perf_counter()
        record.seg = segment(record.image, options, record.run_plan, s)
    record.selected = objects.primary_of(options.instances, select_instance(record.seg.instances,
                                                                           options.instance_index),
                                         options.instance_index)
    record.objects = objects.choose(record.seg.instances, options.instances, record.selected)
    record.timings["segment"] = time.perf_counter() - t
    if len(record.objects) > 1:
        t = time.perf_counter()
        record.recons = reconstruct_objects(record.image, record.seg, record.objects, options, record.run_plan, s)
        record.recon = record.recons[record.selected]
        record.timings["reconstruct"] = time.perf_counter() - t
    elif record.selected is not None:
        t = time.perf_counter()
        record.recon = reconstruct(record.image, record.seg.instances[record.selected].mask, options,
                                   record.run_plan, s)
        try_other_views(record, lambda image, seg: reconstruct(image, seg.instances[0].mask, options,
                                                               record.run_plan, s))
        record.timings["reconstruct"] = time.perf_counter() - t
    return finish.finish_run(storage, record, s)


__all__ = ["PipelineError", "RunOptions", "RunPlan", "content_id", "run_plain"]
