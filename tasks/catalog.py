"""Catalog tasks: thin wrappers (retries, GPU-slot limits, logging, artifacts) around ``sam3d_pipeline.catalog``."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.utilities.annotations import quote

from sam3d_pipeline import catalog
from sam3d_pipeline.catalog import CatalogEntry, CatalogItem, CatalogTally, ItemWork, ManifestRow, crashed_entry
from sam3d_pipeline.errors import PipelineError
from sam3d_pipeline.gallery import write_gallery
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import open_storage
from tasks import gpu_dispatch
from tasks.bounded import bounded
from tasks.retry import retry_if_transient, retry_options


@task(name="load-catalog-source", cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient)
def load_catalog_source(source: str, default_prompt: str | None, output_root: str,
                        settings: Settings) -> list[ManifestRow]:
    rows = catalog.load_source(source, default_prompt=default_prompt, output_root=output_root, settings=settings)
    logger = get_run_logger()
    bad = [r for r in rows if r.item is None]
    logger.info("%s: %d row(s), %d unusable", source, len(rows), len(bad))
    for warning in getattr(rows, "warnings", []):
        logger.warning(warning)
    for row in bad:
        logger.warning("skipping unusable row: %s", row.error)
    return rows


@task(name="ensure-gpu-limit", cache_policy=NO_CACHE)
def ensure_gpu_limit(name: str, slots: int | None) -> int:
    """Make sure the global concurrency limit ``name`` exists (a missing one would be silently ignored).

    ``slots`` None keeps an existing limit as operators set it (creating it with 1 slot when missing);
    a number creates or resizes it. Returns the limit in force.
    """
    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            existing = None
        if existing is not None and (slots is None or existing.limit == slots):
            logger.info("GPU slot limit %r: %d slot(s)", name, existing.limit)
            return existing.limit
        wanted = slots or 1
        client.upsert_global_concurrency_limit_by_name(name, wanted)
        logger.info("GPU slot limit %r %s with %d slot(s)", name, "resized" if existing else "created", wanted)
        return wanted


@task(name="plan-chunk", cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient)
def plan_catalog_chunk(items: list[CatalogItem], options: dict[str, Any], output_root: str, settings: Settings,
                       force: bool, flow_run_id: str | None) -> catalog.ChunkPlan:
    """Plan a chunk of items: skip the finished, record the unreadable, return the rest (one task run per chunk)."""
    planned = catalog.plan_chunk(items, options, open_storage(output_root, settings), settings, force, flow_run_id)
    logger = get_run_logger()
    statuses = Counter(e.status for e in planned.entries)
    logger.info("planned %d item(s) (lines %d-%d): %d to run, %s", len(items), items[0].line, items[-1].line,
                len(planned.pending), ", ".join(f"{n} {k}" for k, n in sorted(statuses.items())) or "none finished")
    for entry in planned.entries:
        if entry.status == "failed":
            logger.warning("%s (line %d) failed: %s", entry.id, entry.line, (entry.error or {}).get("message"))
    return planned


@task(name="process-gpu-batch", cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient)
def process_gpu_batch(works: list[ItemWork], batch_index: int, gpu_limit: str, output_root: str,
                      settings: Settings, flow_run_id: str | None) -> list[CatalogEntry]:
    """decode → segment and reconstruct (one GPU slot) → publish, for one group of items, in one task run.

    Just before taking the GPU slot, items another run finished meanwhile are marked and reported as skipped.
    Where the models run is ``gpu_dispatch``'s decision: in this process (each backend loaded once per
    process), or on the warm GPU workers as one task. One slot for both stages also pays Prefect's slot
    acquisition once per batch, not once per stage. On the workers the batch takes no slot: the sessions
    themselves bound GPU use (one task each, at most ``SAM3D_GPU_MAX_WORKERS``), and a slot held while the
    task waits in their queue would only add slot traffic (on a SQLite server, 503 answers and 2 s retries).
    A transient read failure raises before any GPU work, so the retry repeats nothing.
    """
    logger = get_run_logger()
    storage = open_storage(output_root, settings)
    works = catalog.decode_batch(works, settings)
    if done := catalog.recheck_finished(works, storage):
        logger.info("GPU batch %d: %d item(s) finished by another run meanwhile; skipped", batch_index, done)
    ready = [w for w in works if w.decoded]
    if ready and settings.gpu_stages == "workers":
        works = gpu_dispatch.catalog_batch(works, batch_index, output_root, settings)
    elif ready:
        waited = time.perf_counter()
        with concurrency(gpu_limit, occupy=1, strict=True):
            logger.info("GPU batch %d: holding one %r slot (waited %.2f s); segmenting %d item(s)", batch_index,
                        gpu_limit, time.perf_counter() - waited, len(ready))
            works = gpu_dispatch.catalog_batch(works, batch_index, output_root, settings)
    entries = [catalog.finish_item(work, storage, settings, flow_run_id) for work in works]
    for entry in entries:
        if entry.status == "failed":
            logger.warning("%s failed: %s", entry.id, (entry.error or {}).get("message"))
    logger.info("GPU batch %d: %s", batch_index, ", ".join(f"{n} {k}" for k, n in
                                                          sorted(Counter(e.status for e in entries).items())))
    return entries


@task(name="write-catalog", cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient)
def write_catalog(index: dict[str, Any], output_root: str, settings: Settings) -> dict[str, str]:
    """``index.html`` (and its viewer script) first, ``catalog.json`` last. Returns both URIs."""
    storage = open_storage(output_root, settings)
    gallery = write_gallery(storage, index)
    index_uri = catalog.write_index(storage, index)
    get_run_logger().info("catalog index %s, gallery %s", index_uri, gallery)
    return {"catalog": index_uri, "gallery": gallery}


@task(name="catalog-artifacts", cache_policy=NO_CACHE)
def catalog_artifacts(entries: list[CatalogEntry], uris: dict[str, str], summary: str) -> None:
    """For people: a table of failures with reasons, and a summary with counts and the index and gallery."""
    failures = catalog.failure_rows(entries)
    if failures:
        create_table_artifact(table=failures, key="catalog-failures",
                              description=f"{len(failures)} failed item(s) with reasons (retried on the next run)")
    lines = [f"## {summary}", "", f"- catalog index: `{uris.get('catalog')}`",
             f"- gallery: `{uris.get('gallery')}` (serve the output root over HTTP to view the 3D models)"]
    create_markdown_artifact(markdown="\n".join(lines), key="catalog-summary", description=summary)


def chunks(items: list[CatalogItem], size: int) -> list[list[CatalogItem]]:
    """``items`` in consecutive chunks of at most ``size``."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def plan_catalog_items(items: list[CatalogItem], options: dict[str, Any], output_root: str, settings: Settings,
                       force: bool, concurrency: int, chunk_size: int, tally: CatalogTally,
                       checkpoint: Callable[[], None]) -> list[ItemWork]:
    """Plan every item in chunks, ``concurrency`` chunks at a time; skipped and failed items go to the tally, and
    rows repeating an earlier row's prefix are entered as its duplicates. Returns the items to run."""
    plan = plan_catalog_chunk.with_options(**retry_options(settings))
    pending: list[ItemWork] = []
    for chunk, future in bounded(lambda c: plan.submit(quote(c), options, output_root, settings, force,
                                                       tally.flow_run_id),
                                 chunks(items, chunk_size), concurrency):
        if future.state.is_completed():
            planned = future.result()
            tally.add(*planned.entries)
            pending.extend(planned.pending)
        else:
            tally.add(*(crashed_entry(item, future.state.message or "planning failed") for item in chunk))
        checkpoint()
    pending, copies = catalog.split_duplicates(pending)
    tally.add(*copies)
    return pending


def run_gpu_batches(batches: list[list[ItemWork]], gpu_limit: str, output_root: str, settings: Settings,
                    concurrency: int, tally: CatalogTally, checkpoint: Callable[[], None]) -> None:
    """Process GPU batches, ``concurrency`` at a time; a batch that crashes as a whole fails its items only."""
    logger = get_run_logger()
    process = process_gpu_batch.with_options(**retry_options(settings))
    for (index, batch), future in bounded(
            lambda ib: process.submit(quote(ib[1]), ib[0], gpu_limit, output_root, settings, tally.flow_run_id),
            list(enumerate(batches)), concurrency):
        if future.state.is_completed():
            tally.add(*future.result())
        else:
            logger.error("GPU batch %d failed as a whole: %s", index, future.state.message)
            tally.add(*(crashed_entry(w.item, future.state.message or "batch failed", w) for w in batch))
        checkpoint()


def catalog_checkpoint(tally: CatalogTally, output_root: str, settings: Settings) -> Callable[[], None]:
    """Create the ``catalog-progress`` artifact at 0 %; the returned callable updates it from ``tally`` and, at most
    every ``tally.checkpoint_every_s``, writes ``catalog.json`` and the gallery as they stand (``complete``
    false), so a killed run leaves an index of what is done."""
    artifact_id = create_progress_artifact(progress=0.0, key="catalog-progress",
                                           description=f"catalog-batch: 0 of {tally.total} item(s) done")
    storage = open_storage(output_root, settings)

    def update() -> None:
        update_progress_artifact(artifact_id, progress=tally.percent_done, description=tally.progress_line())
        if tally.checkpoint_due():
            try:
                index = tally.index(complete=False)
                write_gallery(storage, index)
                catalog.write_index(storage, index)
            except PipelineError as exc:  # a checkpoint is a convenience; the final write is retried as a task
                get_run_logger().warning("could not write the catalog checkpoint: %s", exc)

    return update
