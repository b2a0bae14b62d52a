"""The GPU stages as plain functions: what runs where the models are, talking through storage keys.

One request type, ``GpuBatch``, covers every use: ``image-to-3d`` sends one photo to segment (or one clip to
track), later one mask to reconstruct; a catalog GPU batch segments several photos and tracks several clips,
selects the objects of each (``instances``; a clip's best view) and reconstructs them, all in one call.
``run_gpu_batch`` reads the photos and clips from their URIs and masks from storage and writes its results under
each run's deterministic prefix (``keys.RunKeys``)::

    <prefix>/stages/segment/segmentation.json       instances (score, box, area, mask key), backend, messages
    <prefix>/stages/segment/mask-<i>.png            one PNG per instance
    <prefix>/stages/track/masks.npz                 a clip's mask on every sampled frame (bit-packed)
    <prefix>/stages/track/track.json                frame indices, scores, backend, messages (written last)
    <prefix>/stages/track/frame-<n>.png, mask-<n>.png  the best view, when the batch reconstructs it
    <prefix>/stages/reconstruct/object.glb           mesh (vertex colours)
    <prefix>/stages/reconstruct/object.ply           Gaussian splat, when the backend makes one
    <prefix>/stages/reconstruct/reconstruction.json  pose, stats, backend (written last)

Each JSON is written after the files it describes, so a stage's output is complete once its JSON exists;
the orchestrator reads them back with ``load_segmentation`` / ``load_reconstruction``. Models stay loaded
in the process between calls (``backends`` caches them), which is what makes a GPU worker warm: each call
reports ``model_load_s`` (0.0 when the model was already in memory) and ``run_s`` per stage.

A clip goes to the worker by its URI, never as pixels: the worker reads and decodes it with the submitter's
sampling settings (``video.SAMPLING_SETTINGS``), checks it is the clip that was planned (its content id), and
tracks it as the segment stage (the segmenter's tracker: lite's, or SAM 3's video predictor). SAM 3's video
predictor is built on a session's first clip and then stays in the process beside the image model
(``backends.sam3.video``), so later clips in the session pay no load; a session that has served both photos and
clips holds both models in memory.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from sam3d_pipeline import backends, video
from sam3d_pipeline.backends.sam3 import clickdecoder
from sam3d_pipeline.errors import BackendUnavailableError, InputError, PipelineError, error_record
from sam3d_pipeline.export.glb import glb_to_mesh, mesh_to_glb
from sam3d_pipeline.images import LoadedImage, encode_png, load_image
from sam3d_pipeline.keys import RunKeys, reconstruction_json
from sam3d_pipeline.masks import (
    InstancesSpec,
    choose_objects,
    mask_from_png,
    mask_to_png,
    primary_object,
    select_instance,
)
from sam3d_pipeline.settings import Settings, get_settings
from sam3d_pipeline.storage import Storage, open_storage, read_input
from sam3d_pipeline.types import (
    BackendInfo,
    Box,
    BoxList,
    Instance,
    PointList,
    Reconstruction,
    Segmentation,
    SegmentRequest,
    Track,
)
from sam3d_pipeline.video.views import best_views, score_views


class SegmentParams(BaseModel):
    """What to segment (already validated against the image by the caller)."""

    prompt: str = Field(min_length=1)
    boxes: BoxList = Field(default_factory=list)
    points: PointList = Field(default_factory=list)

    def request(self) -> SegmentRequest:
        return SegmentRequest(prompt=self.prompt, boxes=tuple(Box(*b) for b in self.boxes), points=tuple(self.points))


class SegmentJob(BaseModel):
    """One photo to segment.

    Attributes:
        image: URI of the photo (local path or ``s3://bucket/key``).
        prefix: the run's output prefix name (``<stem>-<hash>``), relative to the batch's output root.
        params: prompt, boxes (xyxy px), points (px).
        instance_index: which instance a catalog batch reconstructs (None: the highest score).
        instances: the objects a catalog batch reconstructs: ``best`` (the selected instance), ``all``, or indices;
            several are reconstructed together (one point map for the photo).
        seed: sampling seed of that reconstruction.
        review_assets: also store the review page's click-decoder files while the features are at hand.
        score_threshold: override ``SAM3D_SCORE_THRESHOLD`` (a reviewer's re-prompt).
    """

    image: str
    prefix: str
    params: SegmentParams
    instance_index: int | None = Field(None, ge=0)
    instances: InstancesSpec = "best"
    seed: int = Field(0, ge=0)
    review_assets: bool = False
    score_threshold: float | None = Field(None, ge=0.0, le=1.0)


class TrackJob(BaseModel):
    """One clip to track: the segment stage of a video.

    Attributes:
        video: URI of the clip, or of a folder / S3 prefix of frames.
        sha256: the decoded clip's digest when the run was planned (``LoadedVideo.sha256``: of the clip's bytes, or
            of a folder's manifest); a clip that changed since is refused.
        prefix: the run's output prefix name, relative to the batch's output root.
        params: prompt, boxes and clicks on the first frame (validated against the frame size by the caller).
        sampling: the submitter's ``video.SAMPLING_SETTINGS``, so the worker keeps the frames the submitter keeps.
        seed: sampling seed of the best view's reconstruction (a catalog batch).
    """

    video: str
    sha256: str
    prefix: str
    params: SegmentParams
    sampling: dict[str, float] = Field(default_factory=dict)
    seed: int = Field(0, ge=0)


class ReconstructJobParam(BaseModel):
    """One (image, mask) job to reconstruct.

    Attributes:
        image: URI of the photo (local path or ``s3://bucket/key``).
        mask: key of the mask PNG, relative to the output root.
        output: key prefix (relative to the output root) where the job's files go.
        seed: sampling seed.
        photo_id: jobs with the same id share one point map (default: the image URI).
    """

    image: str
    mask: str
    output: str
    seed: int = Field(0, ge=0)
    photo_id: str | None = None


class GpuBatch(BaseModel):
    """One unit of GPU work: segment some photos, reconstruct some masks, or both (a catalog batch).

    Attributes:
        output_root: local directory or ``s3://bucket/prefix`` every key is relative to.
        segmenter, reconstructor: resolved backend names (never ``auto``).
        segment: photos to segment.
        track: clips to track (the segment stage of a video).
        reconstruct: masks to reconstruct.
        reconstruct_selected: after segmenting, also reconstruct each photo's objects (its ``instances``) and each
            clip's best view.
        choose_selected: choose (and for a clip write) what ``reconstruct_selected`` would reconstruct, without
            reconstructing it: the segment half of a batch whose reconstruct half runs elsewhere.
        low_memory: override ``SAM3D_SAM3D_LOW_MEMORY`` (set after an out-of-memory crash).
        segmenter_version, reconstructor_version: the backend identities the submitter named the output prefixes
            by (``BackendInfo.version``, from the identity the pool declares); a worker whose loaded model is
            another refuses the stage (``check_identity``). None: not checked.
    """

    output_root: str
    segmenter: str = "lite"
    reconstructor: str = "lite"
    segment: list[SegmentJob] = Field(default_factory=list)
    track: list[TrackJob] = Field(default_factory=list)
    reconstruct: list[ReconstructJobParam] = Field(default_factory=list)
    reconstruct_selected: bool = False
    choose_selected: bool = False
    low_memory: bool | None = None
    segmenter_version: str | None = None
    reconstructor_version: str | None = None

    def describe(self) -> str:
        parts = []
        if self.segment:
            parts.append(f"segment {len(self.segment)} photo(s) with {self.segmenter}")
        if self.track:
            parts.append(f"track {len(self.track)} clip(s) with {self.segmenter}")
        if self.reconstruct or self.reconstruct_selected:
            parts.append(f"reconstruct with {self.reconstructor}")
        return ", ".join(parts) or "nothing"


def read_photo(uri: str, settings: Settings) -> LoadedImage:
    """Read and decode the photo at ``uri`` (same checks as the pipeline's intake)."""
    return load_image(read_input(uri, settings), source=uri, max_pixels=settings.max_pixels)


def declared_identity(batch: GpuBatch, settings: Settings) -> GpuBatch:
    """``batch`` with the backend versions the submitter's settings declare (what its output prefixes were named
    by), for the worker to check against what it loads."""
    return batch.model_copy(update={
        "segmenter_version": backends.describe("segmenter", batch.segmenter, settings).version,
        "reconstructor_version": backends.describe("reconstructor", batch.reconstructor, settings).version,
    })


def check_identity(role: str, expected: str | None, actual: BackendInfo) -> None:
    """Refuse to write a stage's output under a prefix named for another model.

    Raises:
        BackendUnavailableError: ``actual`` (what this worker loaded) is not the ``expected`` version (permanent:
            a resubmission would meet the same worker image).
    """
    if expected is not None and actual.version != expected:
        raise BackendUnavailableError(
            f"{role} identity mismatch: this worker runs {actual.name} {actual.version} ({actual.weights} weights, "
            f"sha256 {actual.checkpoint_sha256 or 'n/a'}, {actual.device}), the submitter declared {expected}: set "
            f"the same SAM3D_*_CHECKPOINT_SHA256 on the orchestrating and the GPU pools"
        )


def stage_settings(settings: Settings, *, low_memory: bool | None = None,
                   score_threshold: float | None = None) -> Settings:
    """``settings`` with a batch's overrides applied (the backends cache one model per distinct settings)."""
    update: dict[str, Any] = {}
    if low_memory is not None and low_memory != settings.sam3d_low_memory:
        update["sam3d_low_memory"] = low_memory
    if score_threshold is not None and score_threshold != settings.score_threshold:
        update["score_threshold"] = score_threshold
    return settings.model_copy(update=update) if update else settings


# ---------------------------------------------------------------------------------------------------------------
# The stage cores, shared by the in-process path and the GPU workers


def segment_photo(image: LoadedImage, request: SegmentRequest, segmenter: str,
                  settings: Settings, expected_version: str | None = None) -> tuple[Segmentation, dict[str, float]]:
    """Run the segmenter on one decoded photo. Returns the segmentation and ``{"model_load_s", "run_s"}``.

    Raises:
        BackendUnavailableError: the loaded model is not ``expected_version`` (``check_identity``).
    """
    load_s = backends.load("segmenter", segmenter, settings)
    backend = backends.get_segmenter(segmenter, settings)
    check_identity("segmenter", expected_version, backend.info())
    t = time.perf_counter()
    seg = backend.segment(image.rgb, request)
    return seg, {"model_load_s": load_s, "run_s": time.perf_counter() - t}


def track_frames(frames: Sequence[Any], request: SegmentRequest, segmenter: str,
                 settings: Settings, expected_version: str | None = None) -> tuple[Track, dict[str, float]]:
    """Follow the requested object through ``frames`` (each ``(H, W, 3)`` uint8) with the segmenter's tracker.

    Returns the track and ``{"model_load_s", "run_s"}``.

    Raises:
        BackendUnavailableError: the segmenter cannot track, or is not ``expected_version`` (``check_identity``).
    """
    tracker = backends.get_segmenter(segmenter, settings)  # a tracker has a model of its own (sam3: the video one)
    if not hasattr(tracker, "track"):
        raise BackendUnavailableError(f"segmenter {segmenter!r} cannot track objects through a video")
    t = time.perf_counter()
    loader = getattr(tracker, "load_tracker", None)
    load_s = time.perf_counter() - t if callable(loader) and loader() else 0.0
    check_identity("segmenter", expected_version, tracker.info())
    t = time.perf_counter()
    track = tracker.track(frames, request)
    return track, {"model_load_s": load_s, "run_s": time.perf_counter() - t}


def reconstruct_masks(jobs: Sequence[tuple[LoadedImage, Any, int, str]], reconstructor: str,
                      settings: Settings, expected_version: str | None = None,
                      ) -> tuple[list[Reconstruction], dict[str, float]]:
    """Reconstruct ``(photo, mask, seed, photo_id)`` jobs with one model; one point map per photo (sam3d).

    Returns:
        One ``Reconstruction`` per job, and ``{"model_load_s", "run_s"}`` for the whole call.

    Raises:
        BackendUnavailableError: the loaded model is not ``expected_version`` (``check_identity``).
    """
    load_s = backends.load("reconstructor", reconstructor, settings)
    backend = backends.get_reconstructor(reconstructor, settings)
    check_identity("reconstructor", expected_version, backend.info())
    t = time.perf_counter()
    if hasattr(backend, "reconstruct_batch"):
        from sam3d_pipeline.backends.sam3d_reconstructor import ReconstructJob

        recons = backend.reconstruct_batch([ReconstructJob(photo.rgb, mask, photo_id=photo_id, seed=seed)
                                            for photo, mask, seed, photo_id in jobs])
    else:
        recons = [backend.reconstruct(photo.rgb, mask, seed=seed) for photo, mask, seed, _ in jobs]
    return recons, {"model_load_s": load_s, "run_s": time.perf_counter() - t}


# ---------------------------------------------------------------------------------------------------------------
# The storage-keyed batch (what a GPU worker runs)


def run_gpu_batch(batch: GpuBatch, settings: Settings | None = None) -> dict[str, Any]:
    """Run one ``GpuBatch``: segment, select and reconstruct as it asks, writing every result to storage.

    A permanent problem with one job (an unreadable photo, a mask that does not match) is recorded on that
    job and the others go on; transient storage failures raise, so the whole batch is tried again.

    Returns:
        ``{"segment": [...], "reconstruct": [...], "timing": {"segment": {...}, "reconstruct": {...}}}``: per
        segment job the contents of its ``segmentation.json`` plus ``selected`` (and ``objects`` when the batch
        reconstructs them), then per track job (the segment stage of a clip) the contents of its ``track.json``
        (plus ``selected``, ``objects`` and the best ``view`` when the batch reconstructs it), each row named by
        its ``prefix`` (or ``{"prefix", "error"}``); per reconstruction the contents of its ``reconstruction.json``
        (or ``{"output", "error"}``). A clip's tracking counts in the segment stage's timing.
    """
    s = stage_settings(settings or get_settings(), low_memory=batch.low_memory)
    storage = open_storage(batch.output_root, s)
    photos: dict[str, LoadedImage] = {}
    out: dict[str, Any] = {"segment": [], "reconstruct": [], "timing": {}}
    recon_jobs = list(batch.reconstruct)
    load_s = run_s = 0.0
    choosing = batch.reconstruct_selected or batch.choose_selected
    for job in batch.segment:
        try:
            photo = photos.get(job.image) or read_photo(job.image, s)
            photos[job.image] = photo
            seg_settings = stage_settings(s, score_threshold=job.score_threshold)
            seg, timing = segment_photo(photo, job.params.request(), batch.segmenter, seg_settings,
                                        batch.segmenter_version)
            load_s, run_s = load_s + timing["model_load_s"], run_s + timing["run_s"]
            summary = write_segmentation(storage, job, photo, seg)
            if job.review_assets:
                summary["review_assets"] = clickdecoder.publish_review_assets(
                    backends.get_segmenter(batch.segmenter, seg_settings), photo.rgb, storage, job.prefix,
                    s.review_decoder_weights)
            selected = primary_object(job.instances, select_instance(seg.instances, job.instance_index),
                                      job.instance_index)
            row = summary | {"selected": selected}
            if choosing:
                row["objects"] = choose_objects(seg.instances, job.instances, selected)
            if batch.reconstruct_selected:
                recon_jobs.extend(selected_jobs(job, row))
            out["segment"].append(row)
        except PipelineError as exc:
            if exc.transient:
                raise
            out["segment"].append({"prefix": job.prefix, "error": error_record(exc)})
    for track_job in batch.track:
        try:
            clip, track, timing = track_clip(track_job, batch.segmenter, s, batch.segmenter_version)
            load_s, run_s = load_s + timing["model_load_s"], run_s + timing["run_s"]
            row = write_track(storage, track_job, clip, track)
            if choosing:
                row |= write_best_view(storage, track_job, clip, track, photos)
            if batch.reconstruct_selected:
                recon_jobs.extend(selected_jobs(track_job, row))
            out["segment"].append(row)
        except PipelineError as exc:
            if exc.transient:
                raise
            out["segment"].append({"prefix": track_job.prefix, "error": error_record(exc)})
    if batch.segment or batch.track:
        out["timing"]["segment"] = {"model_load_s": load_s, "run_s": run_s}
    if recon_jobs:
        out["reconstruct"], out["timing"]["reconstruct"] = _reconstruct_jobs(recon_jobs, batch.reconstructor,
                                                                             storage, photos, s,
                                                                             batch.reconstructor_version)
    return out


def _reconstruct_jobs(jobs: Sequence[ReconstructJobParam], reconstructor: str, storage: Storage,
                      photos: dict[str, LoadedImage], settings: Settings, expected_version: str | None = None,
                      ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    ready = []
    for i, job in enumerate(jobs):
        try:
            photo = photos.get(job.image) or read_photo(job.image, settings)
            photos[job.image] = photo
            mask = mask_from_png(storage.read_bytes(job.mask), source=job.mask)
            if mask.shape != photo.rgb.shape[:2]:
                raise InputError(f"mask {job.mask} is {mask.shape[::-1]}, photo {job.image} is "
                                 f"{photo.rgb.shape[1::-1]} (width, height)")
            ready.append((i, (photo, mask, job.seed, job.photo_id or job.image)))
        except PipelineError as exc:
            if exc.transient:
                raise
            results[i] = {"output": job.output, "error": error_record(exc)}
    timing = {"model_load_s": 0.0, "run_s": 0.0}
    if ready:
        try:
            recons, timing = reconstruct_masks([r for _, r in ready], reconstructor, settings, expected_version)
        except PipelineError as exc:  # the backend refused the batch as a whole (checked before model work)
            if exc.transient:
                raise
            for i, _ in ready:
                results[i] = {"output": jobs[i].output, "error": error_record(exc)}
        else:
            for (i, _), recon in zip(ready, recons, strict=True):
                results[i] = write_reconstruction(storage, jobs[i].output, recon)
    return [r for r in results if r is not None], timing


def write_segmentation(storage: Storage, job: SegmentJob, photo: LoadedImage, seg: Segmentation) -> dict[str, Any]:
    """Write every instance mask, then ``segmentation.json`` (last). Returns its contents."""
    keys = RunKeys(job.prefix)
    instances = []
    for i, inst in enumerate(seg.instances):
        storage.write_bytes(keys.stage_mask(i), mask_to_png(inst.mask), content_type="image/png")
        instances.append(inst.summary(i) | {"mask": keys.stage_mask(i)})
    summary = {
        "prefix": job.prefix,
        "image": {"uri": job.image, "width": photo.width, "height": photo.height},
        "instances": instances,
        "used_text_prompt": seg.used_text_prompt,
        "messages": list(seg.messages),
        "backend": seg.backend.as_dict(),
    }
    storage.write_bytes(keys.segmentation, json.dumps(summary, indent=2).encode(), content_type="application/json")
    return summary


def selected_jobs(job: SegmentJob | TrackJob, row: dict[str, Any]) -> list[ReconstructJobParam]:
    """The reconstruct jobs of one segmented photo or tracked clip (its result ``row``), in one place for a batch run
    in one task and for its reconstruct half (``reconstruct_part``).

    One object goes to ``RunKeys(prefix).reconstruct_dir``; several objects of a photo each go to
    ``object_reconstruct_dir(i)`` with the photo as their ``photo_id`` (one point map). A clip's object is its best
    view's frame and mask (``row["view"]``). Nothing for a failed row or one without an object.
    """
    outputs = object_outputs(job.prefix, row)
    if isinstance(job, TrackJob):
        view = row["view"]
        return [ReconstructJobParam(image=view["image"], mask=view["mask"], output=output, seed=job.seed)
                for output in outputs.values()]
    keys = RunKeys(job.prefix)
    return [ReconstructJobParam(image=job.image, mask=keys.stage_mask(i), output=output, seed=job.seed,
                                photo_id=job.image if len(outputs) > 1 else None) for i, output in outputs.items()]


def object_outputs(prefix: str, row: dict[str, Any]) -> dict[int, str]:
    """Where each object of a segmented photo or tracked clip (its result ``row``) is reconstructed, by instance
    index, the selected one first: ``reconstruct_dir`` for one object, ``object_reconstruct_dir(i)`` for several.
    Empty for a failed row or one without an object."""
    if "error" in row or row.get("selected") is None:
        return {}
    keys = RunKeys(prefix)
    found = row.get("objects") or [row["selected"]]
    if len(found) == 1:
        return {found[0]: keys.reconstruct_dir}
    return {i: keys.object_reconstruct_dir(i) for i in found}


def track_clip(job: TrackJob, segmenter: str, settings: Settings, expected_version: str | None = None,
               ) -> tuple[video.LoadedVideo, Track, dict[str, float]]:
    """Read, decode and sample the clip as the submitter did, and track its object (the segment stage of a video).

    Raises:
        InputError: the clip changed since it was planned, or any of ``video.load_video``'s refusals.
        BackendUnavailableError: the segmenter cannot track, or is not ``expected_version``.
    """
    clip = video.load_video(video.read_clip(job.video, settings), source=job.video,
                            settings=video.with_sampling(settings, job.sampling))
    if clip.sha256 != job.sha256:
        raise InputError(f"{job.video}: the clip changed since the run was planned (sha256 {job.sha256[:12]}…, now "
                         f"{clip.sha256[:12]}…); run it again")
    track, timing = track_frames([f.rgb for f in clip.frames], job.params.request(), segmenter, settings,
                                 expected_version)
    return clip, track, timing


def write_track(storage: Storage, job: TrackJob, clip: video.LoadedVideo, track: Track) -> dict[str, Any]:
    """Write every sampled frame's mask (``masks.npz``, bit-packed), then ``track.json`` (last). Returns its
    contents."""
    keys = RunKeys(job.prefix)
    buf = io.BytesIO()
    np.savez_compressed(buf, masks=np.packbits(np.stack(track.masks).astype(bool), axis=-1))
    storage.write_bytes(keys.track_masks, buf.getvalue(), content_type="application/octet-stream")
    summary = {
        "prefix": job.prefix,
        "video": {"uri": job.video, "width": clip.width, "height": clip.height,
                  "frames": [f.index for f in clip.frames]},
        "masks": keys.track_masks,
        "scores": [float(v) for v in track.scores],
        "found_at": track.found_at,
        "used_text_prompt": track.used_text_prompt,
        "messages": list(track.messages),
        "backend": track.backend.as_dict(),
    }
    storage.write_bytes(keys.track_summary, json.dumps(summary, indent=2).encode(), content_type="application/json")
    return summary


def write_best_view(storage: Storage, job: TrackJob, clip: video.LoadedVideo, track: Track,
                    photos: dict[str, LoadedImage]) -> dict[str, Any]:
    """Choose the clip's best view (``video.views``) and write its frame and mask for the reconstruct stage.

    Returns ``selected`` (0, or None when the object was never found), ``objects`` and ``view`` (``position``,
    ``index``, ``image``: the frame's URI, ``mask``: its key); the frame is also left in ``photos``.
    """
    best = best_views(score_views(clip, track), 1)
    if not best:
        return {"selected": None, "objects": []}
    view, keys = best[0], RunKeys(job.prefix)
    frame = clip.frame_image(view.position)
    uri = storage.write_bytes(keys.track_frame(view.index), encode_png(frame.rgb), content_type="image/png")
    storage.write_bytes(keys.track_mask(view.index), mask_to_png(track.masks[view.position]),
                        content_type="image/png")
    photos[uri] = frame
    return {"selected": 0, "objects": [0],
            "view": {"position": view.position, "index": view.index, "image": uri, "mask": keys.track_mask(view.index)}}


def load_track(output_root: str, prefix: str, frames: Sequence[int], settings: Settings | None = None) -> Track:
    """Read back what the track stage wrote, checked against the submitter's own sample (``frames``: the source
    indices of the frames it kept).

    Raises:
        BackendUnavailableError: the worker kept other frames (a decoder that reads the clip differently).
    """
    s = settings or get_settings()
    storage = open_storage(output_root, s)
    summary = json.loads(storage.read_bytes(RunKeys(prefix).track_summary))
    if summary["video"]["frames"] != list(frames):
        raise BackendUnavailableError(
            f"{summary['video']['uri']}: the GPU worker sampled {len(summary['video']['frames'])} frame(s), this "
            f"process {len(frames)} (or other ones): the two decode the clip differently; run both from one image")
    with np.load(io.BytesIO(storage.read_bytes(summary["masks"])), allow_pickle=False) as archive:
        packed = archive["masks"]
    width, height = summary["video"]["width"], summary["video"]["height"]
    masks = np.unpackbits(packed, axis=-1, count=width).astype(bool)
    if masks.shape != (len(frames), height, width):
        raise BackendUnavailableError(f"{summary['masks']}: masks of shape {masks.shape}, expected "
                                      f"{(len(frames), height, width)}")
    return Track(masks=list(masks), scores=[float(v) for v in summary["scores"]],
                 backend=backend_from_dict(summary["backend"]), used_text_prompt=bool(summary["used_text_prompt"]),
                 found_at=summary["found_at"], messages=list(summary["messages"]))


def backend_from_dict(info: dict[str, Any]) -> BackendInfo:
    """A ``BackendInfo`` from its ``as_dict`` (what the worker that ran a stage reported)."""
    return BackendInfo(name=info["name"], version=info["version"], device=info.get("device", "cpu"),
                       limits=tuple(info.get("limits", ())), weights=info.get("weights", "none"),
                       checkpoint_sha256=info.get("checkpoint_sha256"), dtype=info.get("dtype"))


def load_segmentation(output_root: str, prefix: str, settings: Settings | None = None) -> Segmentation:
    """Read back what the segment stage wrote (masks at image size, boxes xyxy px, scores)."""
    s = settings or get_settings()
    storage = open_storage(output_root, s)
    summary = json.loads(storage.read_bytes(RunKeys(prefix).segmentation))
    size = (summary["image"]["width"], summary["image"]["height"])
    instances = [
        Instance(mask=mask_from_png(storage.read_bytes(inst["mask"]), size=size, source=inst["mask"]),
                 box=tuple(inst["box"]), score=float(inst["score"]))
        for inst in summary["instances"]
    ]
    return Segmentation(instances=instances, backend=backend_from_dict(summary["backend"]),
                        used_text_prompt=bool(summary["used_text_prompt"]), messages=list(summary["messages"]))


def write_reconstruction(storage: Storage, output: str, recon: Reconstruction) -> dict[str, Any]:
    """Write one job's mesh, splat and ``reconstruction.json`` (last) under ``output``."""
    outputs = {"object.glb": f"{output}/object.glb"}
    storage.write_bytes(outputs["object.glb"], mesh_to_glb(recon.mesh, reconstructor=recon.backend.key()),
                        content_type="model/gltf-binary")
    if recon.splat_ply is not None:
        outputs["object.ply"] = f"{output}/object.ply"
        storage.write_bytes(outputs["object.ply"], recon.splat_ply, content_type="application/octet-stream")
    summary = {"output": output, "outputs": outputs, "pose": recon.pose, "stats": recon.stats,
               "backend": recon.backend.as_dict()}
    storage.write_bytes(reconstruction_json(output), json.dumps(summary, indent=2).encode(),
                        content_type="application/json")
    return summary


def load_reconstruction(output_root: str, output: str, settings: Settings | None = None) -> Reconstruction:
    """Read back one job's ``reconstruction.json``, mesh and splat."""
    s = settings or get_settings()
    storage = open_storage(output_root, s)
    summary = json.loads(storage.read_bytes(reconstruction_json(output)))
    mesh = glb_to_mesh(storage.read_bytes(summary["outputs"]["object.glb"]))
    ply = storage.read_bytes(summary["outputs"]["object.ply"]) if "object.ply" in summary["outputs"] else None
    return Reconstruction(mesh=mesh, backend=backend_from_dict(summary["backend"]), splat_ply=ply,
                          pose=summary["pose"], stats=summary["stats"])


# ---------------------------------------------------------------------------------------------------------------
# Stages of a batch, and a two-stage batch split for workers of two images (SAM 3 sessions, SAM 3D Objects sessions)

GPU_STAGES = ("segment", "reconstruct")


def batch_stages(batch: GpuBatch) -> tuple[str, ...]:
    """The stages ``batch`` runs, in order: ``("segment",)``, ``("reconstruct",)`` or both (a catalog batch).
    Tracking a clip is the segment stage (the segmenter's model tracks)."""
    stages = []
    if batch.segment or batch.track:
        stages.append("segment")
    if batch.reconstruct or (batch.reconstruct_selected and (batch.segment or batch.track)):
        stages.append("reconstruct")
    return tuple(stages)


def segment_part(batch: GpuBatch) -> GpuBatch:
    """The segment half of a two-stage batch: the same photos, clips and selection, nothing reconstructed (what is
    to be reconstructed is still chosen, and a clip's best view written, for the other half)."""
    return batch.model_copy(update={"reconstruct": [], "reconstruct_selected": False,
                                    "choose_selected": batch.reconstruct_selected})


def reconstruct_part(batch: GpuBatch, segment_result: dict[str, Any]) -> GpuBatch | None:
    """The reconstruct half of a two-stage batch, built from what its segment half returned.

    The batch's own reconstruct jobs come first, then (``reconstruct_selected``) each photo's objects and each
    clip's best view, exactly as ``run_gpu_batch`` builds them in one task (``selected_jobs``). Photos and clips
    that failed or have no object are left out. None when nothing is left to reconstruct.
    """
    jobs = list(batch.reconstruct)
    if batch.reconstruct_selected:
        done = {r["prefix"]: r for r in segment_result.get("segment", [])}
        for job in [*batch.segment, *batch.track]:
            row = done.get(job.prefix)
            if row is not None:
                jobs.extend(selected_jobs(job, row))
    if not jobs:
        return None
    return GpuBatch(output_root=batch.output_root, segmenter=batch.segmenter, reconstructor=batch.reconstructor,
                    reconstruct=jobs, low_memory=batch.low_memory, reconstructor_version=batch.reconstructor_version)


def merge_results(segment_result: dict[str, Any], reconstruct_result: dict[str, Any] | None) -> dict[str, Any]:
    """One ``run_gpu_batch``-shaped result (``segment``, ``reconstruct``, ``timing`` per stage) from the results of a
    batch's two halves (``reconstruct_result`` None: nothing was left to reconstruct)."""
    rec = reconstruct_result or {}
    return {"segment": list(segment_result.get("segment", [])), "reconstruct": list(rec.get("reconstruct", [])),
            "timing": dict(segment_result.get("timing", {})) | dict(rec.get("timing", {}))}
