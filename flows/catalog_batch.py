"""The ``catalog-batch`` flow: a manifest or prefix of photos and videos → 3D assets, idempotent and resumable.

Stages: load the source → plan the items in chunks (read bytes, compute the prefix ``image-to-3d`` would use,
skip items with a finished ``result.json``; no decoding, no model) → group the rest into GPU batches → per
batch: decode, segment (a clip: track and choose its best view) and reconstruct every object a row asks for
(``instances``) while holding one GPU slot, or on the GPU workers (each model loaded once per process),
publish each item (``result.json`` last) → ``catalog.json`` and ``index.html`` at the output root.

The flow's Prefect footprint grows per chunk and per batch, not per row: one task run plans ``chunk_size``
items, one processes a GPU batch; outcomes are still per item in ``catalog.json`` and the artifacts. Lists of
items and entries go to tasks ``quote``d, so Prefect does not walk every item of them for futures. At most
``concurrency`` chunks are planned, and ``concurrency`` batches processed, at once; GPU stages also hold a
slot of the Prefect global concurrency limit ``gpu_limit`` (created when missing, because Prefect skips a
missing limit silently). A bad item never stops the batch: it is recorded with its reason and retried by the
next run. ``catalog.json`` is checkpointed as chunks and batches finish, so a SIGKILL half-way leaves an
index of what is done and loses only the items in flight; a re-run skips the finished and completes the rest.
"""

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.utilities.annotations import quote

from sam3d_pipeline.catalog import CatalogTally, failure_message, gpu_batches
from sam3d_pipeline.settings import get_settings
from sam3d_pipeline.storage import open_storage
from tasks.catalog import (
    catalog_artifacts,
    catalog_checkpoint,
    ensure_gpu_limit,
    load_catalog_source,
    plan_catalog_items,
    run_gpu_batches,
    write_catalog,
)
from tasks.retry import retry_options

DEFAULT_GPU_LIMIT = "sam3d-gpu"


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
    chunk_size: int = 500,
) -> dict[str, Any]:
    """Turn every photo and video of a manifest or prefix into 3D assets; skip what is done; index and gallery at
    the end.

    Args:
        source: manifest (``.csv`` with a header / ``.jsonl``; fields image, prompt, box, points, review, id,
            instances; local or ``s3://``), an ``s3://bucket/prefix`` or a local folder of photos and videos
            (MP4 / MOV / WebM).
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
        chunk_size: items planned by one task run (>= 1).

    Returns:
        ``{"counts", "catalog", "gallery", "all_succeeded", "any_no_object", "summary", "items"}``; item statuses are
        ``completed``, ``skipped``, ``no_object``, ``failed`` or ``duplicate``.

    Raises:
        InputError: the source itself is unusable (missing manifest, no header, nothing listed).
        ValueError: ``concurrency``, ``batch_size`` or ``chunk_size`` below 1.
    """
    if min(concurrency, batch_size, chunk_size) < 1:
        raise ValueError(f"concurrency ({concurrency}), batch_size ({batch_size}) and chunk_size ({chunk_size}) "
                         "must be >= 1")
    logger, settings = get_run_logger(), get_settings()
    root = open_storage(output_root or settings.output_root, settings).root
    run_id = str(flow_run.get_id()) if flow_run.get_id() else None
    tally = CatalogTally(source=source, output_root=root, flow_run_id=run_id)
    io_retries = retry_options(settings)
    rows = load_catalog_source.with_options(**io_retries)(source, default_prompt, root, settings)
    limit = ensure_gpu_limit(gpu_limit, gpu_slots)
    items = tally.begin(rows)
    checkpoint = catalog_checkpoint(tally, root, settings)

    # Plan: prefixes from content ids only; finished items are skipped before any decode or model.
    options = {"segmenter": segmenter, "reconstructor": reconstructor, "seed": seed}
    pending = plan_catalog_items(items, options, root, settings, force, concurrency, chunk_size, tally, checkpoint)
    batches = gpu_batches(pending, batch_size)
    logger.info("%d item(s): %d to run in %d GPU batch(es) of up to %d; %d skipped; %d GPU slot(s) on %r", tally.total,
                len(pending), len(batches), batch_size, tally.counts()["skipped"], limit, gpu_limit)

    # Run: `concurrency` batches at a time; a batch that crashes as a whole fails its items, not the run.
    run_gpu_batches(batches, gpu_limit, root, settings, concurrency, tally, checkpoint)

    summary, index_doc = tally.summary(), tally.index()
    uris = write_catalog.with_options(**io_retries)(quote(index_doc), root, settings)
    catalog_artifacts(quote(tally.entries), uris, summary)
    logger.info(summary)
    outcome = tally.outcome(index_doc, uris, summary)
    failure = failure_message(outcome)  # failed items fail the run (its state is what schedules show)
    return Failed(message=failure, data=outcome) if failure else outcome
