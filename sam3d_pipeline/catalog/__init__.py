"""Catalog batches: many photos → 3D assets, each item the way ``image-to-3d`` (``pipeline.py``) does it.

Every item lands at exactly the same deterministic output prefix as ``image-to-3d``, so a photo processed by
either is found by both. The stages are plain functions; the ``catalog-batch`` flow wraps them in tasks and
``run_catalog_plain`` chains them in a plain loop (the baseline for orchestration overhead). One idea per
module: ``manifest`` (sources and rows), ``listing`` (a prefix or folder of photos), ``items`` (per-item
stages and GPU batches), ``index`` (entries, counts, ``catalog.json``, a run's tally), ``plain`` (the loop).
"""

from sam3d_pipeline.catalog.index import (
    FINISHED_STATUSES,
    CatalogEntry,
    CatalogTally,
    EntryStatus,
    all_succeeded,
    build_index,
    count_statuses,
    crashed_entry,
    duplicate_entry,
    failed_entry,
    failure_message,
    failure_rows,
    split_repeated_rows,
    summary_line,
    write_index,
)
from sam3d_pipeline.catalog.items import (
    ChunkPlan,
    ItemWork,
    apply_gpu_result,
    decode_batch,
    decode_item,
    entry_from_result,
    fail_item,
    finish_item,
    finished_result,
    gpu_batch_request,
    gpu_batches,
    plan_chunk,
    plan_item,
    recheck_finished,
    reconstruct_batch,
    run_record,
    segment_batch,
    split_duplicates,
)
from sam3d_pipeline.catalog.listing import IMAGE_SUFFIXES, INPUT_SUFFIXES, list_inputs, listing_id
from sam3d_pipeline.catalog.manifest import (
    MANIFEST_SUFFIXES,
    CatalogItem,
    ManifestRow,
    load_source,
    manifest_format,
    parse_manifest,
)
from sam3d_pipeline.catalog.plain import run_catalog_plain
from sam3d_pipeline.keys import CATALOG_FILE

__all__ = [
    "CATALOG_FILE",
    "apply_gpu_result",
    "gpu_batch_request",
    "run_record",
    "FINISHED_STATUSES",
    "IMAGE_SUFFIXES",
    "INPUT_SUFFIXES",
    "MANIFEST_SUFFIXES",
    "CatalogEntry",
    "CatalogItem",
    "CatalogTally",
    "ChunkPlan",
    "EntryStatus",
    "ItemWork",
    "ManifestRow",
    "all_succeeded",
    "build_index",
    "count_statuses",
    "crashed_entry",
    "decode_batch",
    "decode_item",
    "duplicate_entry",
    "entry_from_result",
    "fail_item",
    "failed_entry",
    "failure_message",
    "failure_rows",
    "finish_item",
    "finished_result",
    "gpu_batches",
    "list_inputs",
    "listing_id",
    "load_source",
    "manifest_format",
    "parse_manifest",
    "plan_chunk",
    "plan_item",
    "recheck_finished",
    "reconstruct_batch",
    "run_catalog_plain",
    "segment_batch",
    "split_duplicates",
    "split_repeated_rows",
    "summary_line",
    "write_index",
]
