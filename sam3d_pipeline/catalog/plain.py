"""The plain loop: a catalog run's stages in one thread without Prefect (the baseline for orchestration overhead)."""

from __future__ import annotations

from collections.abc import Sequence

from sam3d_pipeline.catalog.index import CatalogEntry, failed_entry, split_repeated_rows
from sam3d_pipeline.catalog.items import (
    ItemWork,
    decode_item,
    fail_item,
    finish_item,
    gpu_batches,
    plan_item,
    recheck_finished,
    reconstruct_batch,
    segment_batch,
    split_duplicates,
)
from sam3d_pipeline.catalog.manifest import ManifestRow
from sam3d_pipeline.settings import Settings, get_settings
from sam3d_pipeline.storage import Storage


def run_catalog_plain(rows: Sequence[ManifestRow], storage: Storage, *, batch_size: int = 8,
                      segmenter: str = "auto", reconstructor: str = "auto", seed: int = 0,
                      settings: Settings | None = None, force: bool = False) -> list[CatalogEntry]:
    """Every stage of a catalog run in one thread, without Prefect. Returns entries in row order."""
    s = settings or get_settings()
    entries: list[CatalogEntry] = [failed_entry(row, row.error or "unusable row") for row in rows if row.item is None]
    pending: list[ItemWork] = []
    items, repeats = split_repeated_rows([row.item for row in rows if row.item is not None])
    entries.extend(repeats)
    for item in items:
        planned = plan_item(item, item.options(segmenter=segmenter, reconstructor=reconstructor, seed=seed),
                            storage, s, force=force)
        if isinstance(planned, CatalogEntry):
            entries.append(planned)
        elif planned.error is not None:
            entries.append(fail_item(planned, storage))
        else:
            pending.append(planned)
    pending, copies = split_duplicates(pending)
    entries.extend(copies)
    for index, batch in enumerate(gpu_batches(pending, batch_size)):
        recheck_finished(batch, storage)
        for work in batch:
            decode_item(work, s)
        segment_batch(batch, s)
        reconstruct_batch(batch, index, s)
        entries.extend(finish_item(work, storage, s) for work in batch)
    return sorted(entries, key=lambda e: e.line)
