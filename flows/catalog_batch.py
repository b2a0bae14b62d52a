"""The ``catalog-batch`` flow: a manifest or prefix of photos → 3D assets, idempotent and resumable.

Stages: load the source → plan every item (read bytes, compute the prefix ``image-to-3d`` would use, skip
items with a finished ``result.json``; no decoding, no model) → group the rest into GPU batches → per batch:
decode, segment and reconstruct while holding one GPU slot (each model loaded once per process),
publish each item (``result.json`` last) → ``catalog.json`` and ``index.html`` at the output root.

At most ``concurrency`` items are planned, and ``concurrency`` batches processed, at once; GPU stages also
hold a slot of the Prefect global concurrency limit ``gpu_limit`` (created when missing, because Prefect
skips a missing limit silently). A bad item never stops the batch: it is recorded with its reason and
retried by the next run. A SIGKILL half-way loses only the items in flight; a re-run completes the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run

from sam3d_pipeline import catalog
from sam3d_pipeline.catalog import CatalogEntry, ItemWork
from sam3d_pipeline.errors import PipelineError
from sam3d_pipeline.settings import Settings, get_settings
from sam3d_pipeline.storage import open_storage
from tasks.catalog import (
    catalog_artifacts,
    decode_catalog_item,
    ensure_gpu_limit,
    load_catalog_source,
    plan_catalog_item,
    publish_catalog_item,
    record_catalog_failure,
    run_gpu_batch,
    write_catalog,
)
from tasks.retry import retry_options

DEFAULT_GPU_LIMIT = "sam3d-gpu"


@task(name="process-gpu-batch", cache_policy=NO_CACHE)
def process_gpu_batch(works: list[ItemWork], batch_index: int, gpu_limit: str, output_root: str,
                      settings: Settings, flow_run_id: str | None) -> list[CatalogEntry]:
    """decode → segment and reconstruct (one GPU slot) → publish, for one group of items."""
    io_retries = retry_options(settings)
    decoded = []
    for work in works:
        try:
            decoded.append(decode_catalog_item.with_options(**io_retries)(work, settings))
        except PipelineError as exc:  # transient read failures that outlived their retries
            work.error = exc
            decoded.append(work)
    reconstructed = run_gpu_batch(decoded, batch_index, gpu_limit, settings)
    return [publish_catalog_item(work, output_root, settings, flow_run_id) for work in reconstructed]


def _bounded(submit: Callable[[Any], PrefectFuture], args: Iterable[Any], limit: int) -> Iterator[
        tuple[Any, PrefectFuture]]:
    """Submit ``submit(arg)`` for each arg with at most ``limit`` in flight; yield ``(arg, future)`` as each ends."""
    pending = iter(args)
    in_flight: dict[PrefectFuture, Any] = {}
    while True:
        while len(in_flight) < limit:
            arg = next(pending, _END)
            if arg is _END:
                break
            in_flight[submit(arg)] = arg
        if not in_flight:
            return
        done = next(as_completed(list(in_flight)))
        yield in_flight.pop(done), done


_END = object()


@flow(name="catalog-batch", log_prints=False, validate_parameters=True)
def catalog_batch(
    source: str,
    output_root: str | None = None,
    default_prompt: str | None = None,
    concurrency: int = 2,
    batch_size: int = 8,
    gpu_limit: str = DEFAULT_GPU_LIMIT,
    gpu_slots: int | None = None,
    segmenter: Literal["auto", "lite", "sam3"] = "auto",
    reconstructor: Literal["auto", "lite", "sam3d"] = "auto",
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Turn every photo of a manifest or prefix into 3D assets; skip what is done; index and gallery at the end.

    Args:
        source: manifest (``.csv`` with a header / ``.jsonl``; fields image, prompt, box, points, review, id;
            local or ``s3://``), an ``s3://bucket/prefix`` or a local folder of photos.
        output_root: local directory or ``s3://bucket/prefix``; default ``SAM3D_OUTPUT_ROOT``.
        default_prompt: prompt for rows without one (required for a prefix or folder).
        concurrency: items planned, and GPU batches processed, at the same time (>= 1).
        batch_size: items per GPU batch; each batch loads each model once (>= 1).
        gpu_limit: name of the Prefect global concurrency limit for GPU slots.
        gpu_slots: size of that limit; None keeps an existing limit as set (creating it with 1 slot).
        segmenter: ``auto``, ``lite`` or ``sam3``.
        reconstructor: ``auto``, ``lite`` or ``sam3d``.
        seed: seed for stochastic reconstructors.
        force: recompute items even when a finished result exists.

    Returns:
        ``{"counts", "catalog", "gallery", "all_succeeded", "summary", "items"}``; item statuses are
        ``completed``, ``skipped``, ``no_object`` or ``failed``.

    Raises:
        InputError: the source itself is unusable (missing manifest, no header, nothing listed).
        ValueError: ``concurrency`` or ``batch_size`` below 1.
    """
    if concurrency < 1 or batch_size < 1:
        raise ValueError(f"concurrency ({concurrency}) and batch_size ({batch_size}) must be >= 1")
    logger = get_run_logger()
    settings = get_settings()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    start = time.perf_counter()
    root = open_storage(output_root or settings.output_root, settings).root
    run_id = str(flow_run.get_id()) if flow_run.get_id() else None
    io_retries = retry_options(settings)

    rows = load_catalog_source.with_options(**io_retries)(source, default_prompt, root, settings)
    limit = ensure_gpu_limit(gpu_limit, gpu_slots)
    total = len(rows)
    progress_id = create_progress_artifact(progress=0.0, key="catalog-progress",
                                           description=f"catalog-batch: 0 of {total} item(s) done")
    entries: list[CatalogEntry] = []

    def progress() -> None:
        done = len(entries)
        update_progress_artifact(progress_id, progress=round(100.0 * done / max(total, 1), 1),
                                 description=f"catalog-batch: {done} of {total} item(s) done "
                                 f"({catalog.summary_line(entries)})")

    for row in rows:
        if row.item is None:
            logger.warning("skipping unusable row: %s", row.error)
            entries.append(catalog.failed_entry(row, row.error or "unusable row"))

    # Plan: prefixes from content ids only; finished items are skipped before any decode or model.
    pending: list[ItemWork] = []
    plan_task = plan_catalog_item.with_options(**io_retries)
    items = [row.item for row in rows if row.item is not None]
    for item, future in _bounded(
        lambda it: plan_task.submit(it, it.options(segmenter=segmenter, reconstructor=reconstructor, seed=seed),
                                    root, settings, force),
        items, concurrency,
    ):
        state = _final_state(future)
        if not state.is_completed():
            entries.append(_crashed_entry(item, state.message or "planning failed"))
            continue
        planned = future.result()
        if isinstance(planned, CatalogEntry):
            entries.append(planned)
        elif planned.error is not None:
            entries.append(record_catalog_failure(planned, root, settings, run_id))
        else:
            pending.append(planned)
    progress()
    batches = catalog.gpu_batches(pending, batch_size)
    logger.info("%d item(s): %d to run in %d GPU batch(es) of up to %d; %d skipped; %d GPU slot(s) on %r",
                total, len(pending), len(batches), batch_size, sum(e.status == "skipped" for e in entries), limit,
                gpu_limit)

    # Run: `concurrency` batches at a time; a batch that crashes as a whole fails its items, not the run.
    for (index, batch), future in _bounded(
        lambda ib: process_gpu_batch.submit(ib[1], ib[0], gpu_limit, root, settings, run_id),
        list(enumerate(batches)), concurrency,
    ):
        state = _final_state(future)
        if state.is_completed():
            entries.extend(future.result())
        else:
            logger.error("GPU batch %d failed as a whole: %s", index, state.message)
            entries.extend(_crashed_entry(w.item, state.message or "batch failed", w) for w in batch)
        progress()

    wall = time.perf_counter() - start
    summary = catalog.summary_line(entries, wall)
    index_doc = catalog.build_index(entries, source=source, output_root=root, flow_run_id=run_id,
                                    started_at=started_at)
    uris = write_catalog.with_options(**io_retries)(index_doc, root, settings)
    catalog_artifacts(entries, uris, summary)
    logger.info(summary)
    return {
        "counts": index_doc["counts"],
        "catalog": uris["catalog"],
        "gallery": uris["gallery"],
        "all_succeeded": catalog.all_succeeded(entries),
        "any_no_object": any(e.no_object for e in entries),
        "summary": summary,
        "items": index_doc["items"],
    }


def _final_state(future: PrefectFuture) -> Any:
    """The task run's final state (``future.state`` may still show the API's last write)."""
    future.wait()
    return future.state


def _crashed_entry(item: catalog.CatalogItem, reason: str, work: ItemWork | None = None) -> CatalogEntry:
    entry = CatalogEntry(id=item.id, line=item.line, image=item.image, prompt=item.prompt, status="failed",
                         error={"type": "TaskFailure", "code": "task_failed", "message": reason})
    if work is not None and work.run_plan is not None:
        entry.prefix = work.run_plan.prefix
        entry.output_prefix = f"{work.run_plan.output_root.rstrip('/')}/{work.run_plan.prefix}"
    return entry
