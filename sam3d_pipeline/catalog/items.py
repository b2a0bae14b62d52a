"""A catalog item's stages: plan (skip when finished), decode, segment and reconstruct per GPU batch, publish.

The ``catalog-batch`` flow wraps each stage in a task; ``run_catalog_plain`` chains them in a plain loop. Each
item lands at the prefix ``image-to-3d`` would use for the same photo (or clip), prompt and options. A clip is
tracked and reconstructed from its best view, as ``image-to-3d`` does; a row's ``instances`` choose the objects
of a photo, reconstructed together (one point map per photo), in this process or on the GPU workers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sam3d_pipeline import video
from sam3d_pipeline.catalog.index import FINISHED_STATUSES, CatalogEntry, EntryStatus, duplicate_entry
from sam3d_pipeline.catalog.manifest import CatalogItem
from sam3d_pipeline.errors import InputError, PipelineError, error_from_record, is_transient
from sam3d_pipeline.gpu import stages as gpu_stages
from sam3d_pipeline.gpu.stages import GpuBatch, SegmentJob, SegmentParams, TrackJob
from sam3d_pipeline.images import LoadedImage
from sam3d_pipeline.keys import object_file
from sam3d_pipeline.masks import select_instance
from sam3d_pipeline.run import finish, objects, pipeline
from sam3d_pipeline.run.pipeline import RunOptions, RunPlan
from sam3d_pipeline.run.report import RunResult
from sam3d_pipeline.settings import Settings, get_settings
from sam3d_pipeline.storage import Storage
from sam3d_pipeline.types import Reconstruction, Segmentation
from sam3d_pipeline.video.views import VideoRun


@dataclass
class ItemWork:
    """An item on its way through the stages. ``error`` set means it stops there and is reported failed."""

    item: CatalogItem
    options: RunOptions
    run_plan: RunPlan | None = None
    input_id: str = ""
    image: LoadedImage | None = None  # the photo; for a clip, its chosen frame once tracked
    clip: video.LoadedVideo | None = None  # a video item's decoded sample
    video: VideoRun | None = None  # a video item's track and chosen view
    seg: Segmentation | None = None
    selected: int | None = None
    recon: Reconstruction | None = None
    recons: dict[int, Reconstruction] = field(default_factory=dict)  # several objects (instances all / list)
    gpu_batch: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: BaseException | None = None
    finished: CatalogEntry | None = None  # another run finished it while this one waited: report, do not run
    messages: list[str] = field(default_factory=list)  # for result.json (e.g. the frame a clip was reconstructed from)

    @property
    def decoded(self) -> bool:
        """Ready for the model stages: decoded, not failed, not finished by another run."""
        return self.error is None and self.finished is None and (self.image is not None or self.clip is not None)


def finished_result(storage: Storage, prefix: str) -> RunResult | None:
    """The finished result at ``prefix``: ``completed`` or ``no_object`` (both final for these inputs).

    A ``failed`` result (or none, or an unreadable one) means the item still has to run.
    """
    return finish.existing_result(storage, prefix, statuses=tuple(FINISHED_STATUSES))


def plan_item(item: CatalogItem, options: RunOptions, storage: Storage, settings: Settings | None = None,
              force: bool = False) -> ItemWork | CatalogEntry:
    """Read the input's bytes, plan its prefix, and skip it when a finished result exists there.

    No decoding and no model call happen here (``pipeline.plan`` resolves backends by name and version).

    Returns:
        A ``skipped`` ``CatalogEntry``, or an ``ItemWork`` to run (``error`` set when reading or planning failed).
    """
    s = settings or get_settings()
    work = ItemWork(item=item, options=options)
    t = time.perf_counter()
    try:
        data = pipeline.read_bytes(item.image, s)
        work.input_id = pipeline.content_id(data)
        work.run_plan = pipeline.plan(item.image, work.input_id, options, storage.root, s)
    except PipelineError as exc:
        work.error = exc
        return work
    work.timings["plan"] = time.perf_counter() - t
    if not force and (done := finished_result(storage, work.run_plan.prefix)) is not None:
        return entry_from_result(item, done, status="skipped", prefix=work.run_plan.prefix)
    return work


@dataclass
class ChunkPlan:
    """A chunk of items planned together: what still has to run, and the entries of the rest (skipped, failed)."""

    pending: list[ItemWork] = field(default_factory=list)
    entries: list[CatalogEntry] = field(default_factory=list)


def plan_chunk(items: Sequence[CatalogItem], options: dict[str, Any], storage: Storage,
               settings: Settings | None = None, force: bool = False,
               flow_run_id: str | None = None) -> ChunkPlan:
    """Plan a chunk of items (``plan_item`` each): one call, so a catalog's task count grows per chunk, not per row.

    Items that cannot be read or planned are recorded as failed here (a ``failed`` ``result.json`` where the
    prefix is known).

    Raises:
        TransientError: reading some item failed in a way worth retrying; re-planning the chunk is harmless
            (planning only reads).
    """
    s = settings or get_settings()
    out = ChunkPlan()
    failed: list[ItemWork] = []
    for item in items:
        planned = plan_item(item, item.options(**options), storage, s, force=force)
        if isinstance(planned, CatalogEntry):
            out.entries.append(planned)
        elif planned.error is not None:
            if is_transient(planned.error):
                raise planned.error
            failed.append(planned)
        else:
            out.pending.append(planned)
    out.entries.extend(fail_item(work, storage, flow_run_id) for work in failed)
    return out


def decode_batch(works: Sequence[ItemWork], settings: Settings | None = None) -> list[ItemWork]:
    """Decode every item of a batch (``decode_item``), before any GPU work.

    Raises:
        TransientError: reading some item failed in a way worth retrying; nothing has been computed yet, so
            the batch can simply run again.
    """
    for work in works:
        decode_item(work, settings)
        if work.error is not None and is_transient(work.error):
            error, work.error = work.error, None
            raise error
    return list(works)


def split_duplicates(works: Sequence[ItemWork]) -> tuple[list[ItemWork], list[CatalogEntry]]:
    """Planned items that share an output prefix (the same photo bytes and options) run once.

    Returns:
        ``(the first item of each prefix, a duplicate entry for each other one)``, in input order.
    """
    first: dict[str, ItemWork] = {}
    unique, repeats = [], []
    for work in works:
        prefix = work.run_plan.prefix if work.run_plan is not None else None
        if prefix is not None and prefix in first:
            primary = first[prefix]
            repeats.append(duplicate_entry(work.item, primary.item.id, prefix=prefix,
                                           output_prefix=f"{work.run_plan.output_root.rstrip('/')}/{prefix}"))
            continue
        if prefix is not None:
            first[prefix] = work
        unique.append(work)
    return unique, repeats


def recheck_finished(works: Sequence[ItemWork], storage: Storage) -> int:
    """Just before a batch takes a GPU slot: mark items another run has finished since planning (``finished``),
    so they are reported as skipped and not run again. Returns how many were marked."""
    marked = 0
    for work in works:
        if work.error is not None or work.run_plan is None or work.finished is not None:
            continue
        if (done := finished_result(storage, work.run_plan.prefix)) is not None:
            work.finished = entry_from_result(work.item, done, status="skipped", prefix=work.run_plan.prefix)
            marked += 1
    return marked


def decode_item(work: ItemWork, settings: Settings | None = None) -> ItemWork:
    """Re-read and decode the photo, or the clip's sample of frames (bytes are not held between planning and its
    batch).

    An input whose content changed since planning fails with a clear reason (its prefix would differ); a clip is
    refused for the reasons ``image-to-3d`` refuses it (``video.load_video``).
    """
    if work.error is not None or work.run_plan is None or work.finished is not None:
        return work
    s = settings or get_settings()
    t = time.perf_counter()
    try:
        data = pipeline.read_bytes(work.item.image, s)
        if pipeline.content_id(data) != work.input_id:
            raise InputError(f"{work.item.image}: the file changed while the batch ran; the next run picks it up")
        if video.is_video_uri(work.item.image):
            work.clip = pipeline.decode_video(data, work.item.image, s)
        else:
            work.image = pipeline.decode(data, work.item.image, s)
    except PipelineError as exc:
        work.error = exc
    work.timings["intake"] = work.timings.get("plan", 0.0) + time.perf_counter() - t
    return work


def segment_batch(works: Sequence[ItemWork], settings: Settings | None = None) -> list[ItemWork]:
    """Segment (a clip: track, and choose its best view) and select an instance for every decodable item, one
    segmenter for the whole batch.

    Per-item failures (a box outside the image, an instance index out of range) are recorded on the item;
    the others go on.
    """
    s = settings or get_settings()
    for work in works:
        if not work.decoded:
            continue
        t = time.perf_counter()
        try:
            if work.clip is not None:
                pipeline.start_from_video(work, pipeline.track_video(work.clip, work.options, work.run_plan, s))
            else:
                work.seg = pipeline.segment(work.image, work.options, work.run_plan, s)
            work.selected = objects.primary_of(work.options.instances, select_instance(
                work.seg.instances, work.options.instance_index), work.options.instance_index)
        except PipelineError as exc:
            work.error = exc
        work.timings["segment"] = time.perf_counter() - t
    return list(works)


def reconstruct_batch(works: Sequence[ItemWork], batch_index: int, settings: Settings | None = None) -> list[ItemWork]:
    """Reconstruct every item that has a selected instance, one reconstructor (one model load) for the batch."""
    s = settings or get_settings()
    for work in works:
        if work.error is not None or work.seg is None or work.selected is None:
            continue
        t = time.perf_counter()
        work.gpu_batch = batch_index
        try:
            indices = objects.choose(work.seg.instances, work.options.instances, work.selected)
            if len(indices) > 1:
                work.recons = pipeline.reconstruct_objects(work.image, work.seg, indices, work.options,
                                                           work.run_plan, s)
                work.recon = work.recons[work.selected]
            else:
                mask = work.seg.instances[work.selected].mask
                work.recon = pipeline.reconstruct(work.image, mask, work.options, work.run_plan, s)
        except PipelineError as exc:
            work.error = exc
        work.timings["reconstruct"] = time.perf_counter() - t
    return list(works)


def run_record(work: ItemWork, flow_run_id: str | None = None) -> finish.RunRecord:
    """The item as a run that ends through ``finish`` (its total is the sum of its steps: batches are shared)."""
    return finish.RunRecord(
        input_uri=work.item.image, options=work.options, run_plan=work.run_plan, image=work.image, seg=work.seg,
        selected=work.selected, recon=work.recon, recons=work.recons, timings=work.timings, total_from_steps=True,
        flow_run_id=flow_run_id, messages=[f"catalog item {work.item.id!r} (line {work.item.line})", *work.messages],
        video=work.video,
    )


def finish_item(work: ItemWork, storage: Storage, settings: Settings | None = None,
                flow_run_id: str | None = None) -> CatalogEntry:
    """Render and publish an item's outputs (``result.json`` last), or record its failure.

    A failure with a known prefix is written as a ``failed`` ``result.json`` there (so the next run retries
    it); without a prefix (the input could not be read) it is reported in the catalog only.
    """
    if work.finished is not None:
        return work.finished
    if work.error is None and work.seg is not None:
        try:
            result = finish.finish_run(storage, run_record(work, flow_run_id), settings)
            return entry_from_result(work.item, result, status=result.status, prefix=work.run_plan.prefix,
                                     gpu_batch=work.gpu_batch)
        except PipelineError as exc:
            work.error = exc
    if work.error is None:
        work.error = PipelineError(f"{work.item.image}: item did not reach segmentation")
    return fail_item(work, storage, flow_run_id=flow_run_id)


def fail_item(work: ItemWork, storage: Storage | None, flow_run_id: str | None = None) -> CatalogEntry:
    """Record ``work.error``: a ``failed`` ``result.json`` at the prefix when known, and the catalog entry."""
    result = finish.fail_run(storage, run_record(work, flow_run_id), work.error or PipelineError("unknown failure"))
    return entry_from_result(work.item, result, status="failed", prefix=work.run_plan.prefix if work.run_plan else "",
                             gpu_batch=work.gpu_batch)


# ---------------------------------------------------------------------------------------------------------------
# A GPU batch on the GPU workers: the request, and its results carried back onto the items


def gpu_batch_request(works: Sequence[ItemWork], output_root: str, settings: Settings) -> GpuBatch | None:
    """One ``GpuBatch`` that segments (a clip: tracks), selects and reconstructs every decodable item of a catalog
    batch: each photo's objects (its row's ``instances``, together: one point map per photo), each clip's best view.

    Prompts that do not fit the photo or the clip's frames (a box outside them) fail their item here, before any
    GPU work. None when no item is left to send.
    """
    photos, clips, segmenter, reconstructor = [], [], None, None
    for work in works:
        if not work.decoded:
            continue
        width, height = (work.clip.width, work.clip.height) if work.clip is not None else (work.image.width,
                                                                                            work.image.height)
        try:
            pipeline.segment_request(work.options, width, height)
        except PipelineError as exc:
            work.error = exc
            continue
        segmenter, reconstructor = work.run_plan.segmenter.name, work.run_plan.reconstructor.name
        params = SegmentParams(prompt=work.options.prompt, boxes=work.options.boxes, points=work.options.points)
        if work.clip is not None:
            clips.append(TrackJob(video=work.item.image, sha256=work.clip.sha256, prefix=work.run_plan.prefix,
                                  params=params, sampling=video.sampling(settings), seed=work.options.seed))
        else:
            photos.append(SegmentJob(image=work.item.image, prefix=work.run_plan.prefix, seed=work.options.seed,
                                     instance_index=work.options.instance_index, instances=work.options.instances,
                                     score_threshold=settings.score_threshold, params=params))
    if not photos and not clips:
        return None
    return GpuBatch(output_root=output_root, segmenter=segmenter, reconstructor=reconstructor, segment=photos,
                    track=clips, reconstruct_selected=True)


def apply_gpu_result(works: Sequence[ItemWork], result: dict[str, Any], batch_index: int, output_root: str,
                     settings: Settings) -> list[ItemWork]:
    """Load what the workers wrote for each item (masks or a clip's track, meshes) back onto it, or record its
    error. A clip keeps the view the workers reconstructed as its chosen one."""
    segmented = {r["prefix"]: r for r in result["segment"]}
    reconstructed = {r["output"]: r for r in result["reconstruct"]}
    timing = result["timing"]
    for work in works:
        done = segmented.get(work.run_plan.prefix) if work.run_plan is not None and work.error is None else None
        if done is None:
            continue
        if "error" in done:
            work.error = error_from_record(done["error"])
            continue
        try:
            if work.clip is not None:
                track = gpu_stages.load_track(output_root, work.run_plan.prefix, [f.index for f in work.clip.frames],
                                              settings)
                view = done.get("view")
                pipeline.start_from_video(work, pipeline.choose_views(
                    work.clip, track, work.options.video_frames, timing.get("segment", {}),
                    chosen_position=view["position"] if view else None))
            else:
                work.seg = gpu_stages.load_segmentation(output_root, work.run_plan.prefix, settings)
                work.seg.stage = timing.get("segment", {})
        except PipelineError as exc:
            work.error = exc
            continue
        work.selected = done["selected"]
        work.timings["segment"] = timing["segment"]["run_s"] / max(1, len(segmented))
        outputs = gpu_stages.object_outputs(work.run_plan.prefix, done)
        rows = [reconstructed.get(output) for output in outputs.values()]
        if not outputs or any(row is None for row in rows):
            continue
        work.gpu_batch = batch_index
        failed = next((row for row in rows if "error" in row), None)
        if failed is not None:
            work.error = error_from_record(failed["error"])
            continue
        recons = {}
        for i, output in outputs.items():
            recons[i] = gpu_stages.load_reconstruction(output_root, output, settings)
            recons[i].stage = timing.get("reconstruct", {}) | ({"objects": len(outputs)} if len(outputs) > 1 else {})
        work.recon = recons[work.selected]
        work.recons = recons if len(recons) > 1 else {}
        work.timings["reconstruct"] = timing["reconstruct"]["run_s"] * len(outputs) / max(1, len(reconstructed))
    return list(works)


def entry_from_result(item: CatalogItem, result: RunResult, *, status: EntryStatus, prefix: str,
                      gpu_batch: int | None = None) -> CatalogEntry:
    """A catalog entry from an item's ``result.json`` (this run's or an earlier one's)."""
    scores = [float(inst.get("score", 0.0)) for inst in result.instances]
    objects = [{"index": obj["index"], "score": obj.get("score"), "selected": bool(obj.get("selected")),
                "files": sorted(name for name in result.outputs if name.startswith(object_file(obj["index"], "")))}
               for obj in result.objects]
    clip = result.video
    return CatalogEntry(
        id=item.id,
        line=item.line,
        image=item.image,
        prompt=item.prompt,
        status=status,
        result_status=result.status,
        output_prefix=result.output_prefix if prefix else "",
        prefix=prefix,
        files=sorted(result.outputs),
        score=scores[result.selected] if result.selected is not None and result.selected < len(scores) else None,
        scores=scores,
        instances=len(result.instances),
        objects=objects,
        video={"chosen": clip.get("chosen"), "frames_sampled": clip.get("frames_sampled"),
               "frames_tracked": clip.get("frames_tracked")} if clip else None,
        timings_s=dict(result.timings_s),
        segmenter=(result.segmenter or {}).get("name"),
        reconstructor=(result.reconstructor or {}).get("name"),
        gpu_batch=gpu_batch,
        checks={str(obj["index"]): list(obj.get("export", {}).get("checks", [])) for obj in result.objects
                if "index" in obj},
        review_requested=item.review,
        error=result.error,
    )


def gpu_batches(works: Sequence[ItemWork], batch_size: int) -> list[list[ItemWork]]:
    """Group pending items into GPU batches of at most ``batch_size`` (each batch: one model load per stage).

    Raises:
        ValueError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(works[i:i + batch_size]) for i in range(0, len(works), batch_size)]
