"""A catalog item's stages: plan (skip when finished), decode, segment and reconstruct per GPU batch, publish.

The ``catalog-batch`` flow wraps each stage in a task; ``run_catalog_plain`` chains them in a plain loop. Each
item lands at the prefix ``image-to-3d`` would use for the same photo, prompt and options.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import finish, pipeline
from ..errors import InputError, PipelineError
from ..images import LoadedImage
from ..masks import select_instance
from ..pipeline import RunOptions, RunPlan
from ..report import RunResult
from ..settings import Settings, get_settings
from ..storage import Storage
from ..types import Reconstruction, Segmentation
from .index import FINISHED_STATUSES, CatalogEntry, EntryStatus
from .manifest import CatalogItem


@dataclass
class ItemWork:
    """An item on its way through the stages. ``error`` set means it stops there and is reported failed."""

    item: CatalogItem
    options: RunOptions
    run_plan: RunPlan | None = None
    input_id: str = ""
    image: LoadedImage | None = None
    seg: Segmentation | None = None
    selected: int | None = None
    recon: Reconstruction | None = None
    gpu_batch: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: BaseException | None = None


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


def decode_item(work: ItemWork, settings: Settings | None = None) -> ItemWork:
    """Re-read and decode the photo (bytes are not held between planning and its batch).

    A photo whose content changed since planning fails with a clear reason (its prefix would differ).
    """
    if work.error is not None or work.run_plan is None:
        return work
    s = settings or get_settings()
    t = time.perf_counter()
    try:
        data = pipeline.read_bytes(work.item.image, s)
        if pipeline.content_id(data) != work.input_id:
            raise InputError(f"{work.item.image}: the file changed while the batch ran; the next run picks it up")
        work.image = pipeline.decode(data, work.item.image, s)
    except PipelineError as exc:
        work.error = exc
    work.timings["intake"] = work.timings.get("plan", 0.0) + time.perf_counter() - t
    return work


def segment_batch(works: Sequence[ItemWork], settings: Settings | None = None) -> list[ItemWork]:
    """Segment and select an instance for every decodable item, one segmenter for the whole batch.

    Per-item failures (a box outside the image, an instance index out of range) are recorded on the item;
    the others go on.
    """
    s = settings or get_settings()
    for work in works:
        if work.error is not None or work.image is None:
            continue
        t = time.perf_counter()
        try:
            work.seg = pipeline.segment(work.image, work.options, work.run_plan, s)
            work.selected = select_instance(work.seg.instances, work.options.instance_index)
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
            mask = work.seg.instances[work.selected].mask
            work.recon = pipeline.reconstruct(work.image, mask, work.options, work.run_plan, s)
        except PipelineError as exc:
            work.error = exc
        work.timings["reconstruct"] = time.perf_counter() - t
    return list(works)


def finish_item(work: ItemWork, storage: Storage, settings: Settings | None = None,
                flow_run_id: str | None = None) -> CatalogEntry:
    """Render and publish an item's outputs (``result.json`` last), or record its failure.

    A failure with a known prefix is written as a ``failed`` ``result.json`` there (so the next run retries
    it); without a prefix (the input could not be read) it is reported in the catalog only.
    """
    s = settings or get_settings()
    total_keys = ("plan", "intake", "segment", "reconstruct")
    if work.error is None and work.seg is not None:
        t = time.perf_counter()
        try:
            files = pipeline.render_outputs(work.image, work.seg, work.selected, work.recon, work.run_plan, s)
            work.timings["render"] = time.perf_counter() - t
            work.timings["total"] = sum(work.timings.get(k, 0.0) for k in (*total_keys, "render"))
            status = "completed" if work.recon is not None else "no_object"
            result = pipeline.build_result(
                status=status, image=work.image, input_uri=work.item.image, options=work.options,
                run_plan=work.run_plan, seg=work.seg, selected=work.selected, recon=work.recon,
                timings=work.timings, flow_run_id=flow_run_id,
            )
            result.messages.append(f"catalog item {work.item.id!r} (line {work.item.line})")
            result = pipeline.publish(storage, work.run_plan.prefix, files, result)
            return entry_from_result(work.item, result, status=status, prefix=work.run_plan.prefix,
                                     gpu_batch=work.gpu_batch)
        except PipelineError as exc:
            work.error = exc
    if work.error is None:
        work.error = PipelineError(f"{work.item.image}: item did not reach segmentation")
    return fail_item(work, storage, flow_run_id=flow_run_id)


def fail_item(work: ItemWork, storage: Storage | None, flow_run_id: str | None = None) -> CatalogEntry:
    """Record ``work.error``: a ``failed`` ``result.json`` at the prefix when known, and the catalog entry."""
    exc = work.error or PipelineError("unknown failure")
    work.timings.setdefault("total", sum(work.timings.values()))
    result = pipeline.build_result(
        status="failed", image=work.image, input_uri=work.item.image, options=work.options,
        run_plan=work.run_plan, seg=work.seg, selected=work.selected, timings=work.timings, error=exc,
        flow_run_id=flow_run_id,
    )
    prefix = work.run_plan.prefix if work.run_plan else ""
    if storage is not None and prefix:
        try:
            result = pipeline.publish(storage, prefix, {}, result)
        except PipelineError as write_exc:
            result.messages.append(f"could not write the failed result.json: {write_exc}")
    return entry_from_result(work.item, result, status="failed", prefix=prefix, gpu_batch=work.gpu_batch)


def entry_from_result(item: CatalogItem, result: RunResult, *, status: EntryStatus, prefix: str,
                      gpu_batch: int | None = None) -> CatalogEntry:
    """A catalog entry from an item's ``result.json`` (this run's or an earlier one's)."""
    scores = [float(inst.get("score", 0.0)) for inst in result.instances]
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
        timings_s=dict(result.timings_s),
        segmenter=(result.segmenter or {}).get("name"),
        reconstructor=(result.reconstructor or {}).get("name"),
        gpu_batch=gpu_batch,
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
