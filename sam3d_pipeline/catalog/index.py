"""The catalog index: one ``CatalogEntry`` per item, their counts, ``catalog.json``, and a run's tally.

Item outcomes (``CatalogEntry.status``):
- ``completed``: segmented, reconstructed and published in this run.
- ``skipped``: a finished ``result.json`` (``completed`` or ``no_object``) already sits at the item's prefix;
  found from the input's bytes alone, before decoding or touching any model.
- ``no_object``: the segmenter found nothing to reconstruct (published, with the overlay).
- ``failed``: a reason is recorded (and a ``failed`` ``result.json`` where the prefix is known); the next
  run retries it.
- ``duplicate``: the row maps to the same output prefix as an earlier row (the same photo and options), named
  by ``duplicate_of``; only that row does the work, and this one reports its outcome (``result_status``).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from sam3d_pipeline.catalog.manifest import CatalogItem, ManifestRow
from sam3d_pipeline.keys import CATALOG_FILE
from sam3d_pipeline.storage import Storage

if TYPE_CHECKING:
    from sam3d_pipeline.catalog.items import ItemWork

FINISHED_STATUSES = ("completed", "no_object")
EntryStatus = Literal["completed", "skipped", "no_object", "failed", "duplicate"]
STATUSES: tuple[str, ...] = ("completed", "skipped", "no_object", "failed", "duplicate")


class CatalogEntry(BaseModel):
    """One item's line in ``catalog.json``."""

    id: str
    line: int
    image: str
    prompt: str
    status: EntryStatus
    result_status: str | None = Field(None, description="status in result.json (for skipped: the earlier outcome)")
    output_prefix: str = Field("", description="full URI or path of the item's output prefix; '' when unknown")
    prefix: str = Field("", description="the prefix relative to the output root (links in the gallery)")
    files: list[str] = Field(default_factory=list, description="output file names under the prefix")
    score: float | None = Field(None, description="score of the selected instance")
    scores: list[float] = Field(default_factory=list, description="scores of every instance found")
    instances: int = 0
    objects: list[dict[str, Any]] = Field(
        default_factory=list, description="every reconstructed object, the selected one first: index, score, "
        "selected, files (its output file names under the prefix, objects/<index>/...)")
    video: dict[str, Any] | None = Field(
        None, description="a video item: chosen (index, time_s, view_score), frames_sampled, frames_tracked")
    timings_s: dict[str, float] = Field(default_factory=dict)
    segmenter: str | None = None
    reconstructor: str | None = None
    gpu_batch: int | None = Field(None, description="index of the reconstruction batch the item ran in")
    review_requested: bool = False
    duplicate_of: str | None = Field(None, description="for a duplicate: the id of the row that does the work")
    checks: dict[str, list[dict[str, Any]]] = Field(
        default_factory=dict, description="per object index: its export's per-rule checks (rule, limit, value, "
        "pass, by)")
    error: dict[str, str] | None = None

    @property
    def has_asset(self) -> bool:
        return self.status == "completed" or (self.status in ("skipped", "duplicate")
                                              and self.result_status == "completed")

    @property
    def no_object(self) -> bool:
        return self.status == "no_object" or (self.status in ("skipped", "duplicate")
                                              and self.result_status == "no_object")


def count_statuses(entries: Iterable[CatalogEntry]) -> dict[str, int]:
    """``{"completed": n, "skipped": n, "no_object": n, "failed": n, "duplicate": n}`` (every key present)."""
    counts = Counter(e.status for e in entries)
    return {k: counts.get(k, 0) for k in STATUSES}


def summary_line(entries: Sequence[CatalogEntry], wall_s: float | None = None) -> str:
    """One line for the terminal, e.g. ``catalog: 30 item(s): 25 completed, 0 skipped, 2 no_object, 3 failed``
    (``, 4 duplicate`` appended when rows repeated others)."""
    c = count_statuses(entries)
    line = (f"catalog: {len(entries)} item(s): {c['completed']} completed, {c['skipped']} skipped, "
            f"{c['no_object']} no_object, {c['failed']} failed")
    line += f", {c['duplicate']} duplicate" if c["duplicate"] else ""
    return line + (f" ({wall_s:.1f} s)" if wall_s is not None else "")


def duplicate_entry(item: CatalogItem, of: str, prefix: str = "", output_prefix: str = "") -> CatalogEntry:
    """The entry of a row that repeats the row ``of`` (same output prefix): reported, never run."""
    return CatalogEntry(id=item.id, line=item.line, image=item.image, prompt=item.prompt, status="duplicate",
                        duplicate_of=of, prefix=prefix, output_prefix=output_prefix, review_requested=item.review)


def resolve_duplicates(entries: Sequence[CatalogEntry]) -> None:
    """Give each ``duplicate`` entry its primary's outcome: ``result_status`` (``completed`` when the primary has
    an asset, ``no_object``, else ``failed``), prefix and files. Entries whose primary has no entry yet stay as
    they are (``result_status`` None)."""
    by_id = {e.id: e for e in entries if e.status != "duplicate"}
    for entry in entries:
        primary = by_id.get(entry.duplicate_of or "") if entry.status == "duplicate" else None
        if primary is None:
            continue
        entry.result_status = ("completed" if primary.has_asset else "no_object" if primary.no_object
                               else primary.result_status or "failed")
        entry.prefix, entry.output_prefix = primary.prefix, primary.output_prefix
        entry.files, entry.score, entry.scores = list(primary.files), primary.score, list(primary.scores)
        entry.checks = dict(primary.checks)
        entry.instances, entry.segmenter, entry.reconstructor = (primary.instances, primary.segmenter,
                                                                 primary.reconstructor)
        entry.objects, entry.video = [dict(o) for o in primary.objects], primary.video


def all_succeeded(entries: Iterable[CatalogEntry]) -> bool:
    """True when every item has a 3D asset (completed now or earlier)."""
    return all(e.has_asset for e in entries)


def failure_message(outcome: dict[str, Any]) -> str | None:
    """Why a catalog run ends Failed: some items failed (a corrupt photo, a missing object, a model error). The
    run's state tells schedules and automations what its items did; ``catalog.json`` and the gallery are written
    either way and list every item. None: no item failed (``no_object`` is an outcome, not a failure).
    """
    failed = outcome["counts"].get("failed", 0)
    if not failed:
        return None
    total = len(outcome["items"])
    return (f"catalog: {failed} of {total} item(s) failed; {outcome['counts'].get('completed', 0)} completed, "
            f"{outcome['counts'].get('skipped', 0)} skipped (the failures are listed in {outcome['catalog']})")


def build_index(entries: Sequence[CatalogEntry], *, source: str, output_root: str,
                flow_run_id: str | None = None, started_at: str | None = None,
                warnings: Sequence[str] = (), total: int | None = None, complete: bool = True) -> dict[str, Any]:
    """The ``catalog.json`` document: ``{"items": [...], "counts": {...}, "warnings": [...], ...}``, items in
    manifest order, duplicates resolved to their primary's outcome.

    ``complete`` False marks a checkpoint written while the run goes on (``finished_at`` null, ``total`` the
    rows of the source): a run killed after it leaves an index of what was done; the next run skips those
    items by their results and completes the rest.
    """
    ordered = sorted(entries, key=lambda e: (e.line, e.id))
    resolve_duplicates(ordered)
    return {
        "complete": complete,
        "total": len(ordered) if total is None else total,
        "warnings": list(warnings),
        "items": [e.model_dump(mode="json") for e in ordered],
        "counts": count_statuses(ordered),
        "source": source,
        "output_root": output_root,
        "flow_run_id": flow_run_id,
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds") if complete else None,
        "catalog_version": 1,
    }


def write_index(storage: Storage, index: dict[str, Any]) -> str:
    """Write ``catalog.json`` at the output root. Returns its URI."""
    return storage.write_bytes(CATALOG_FILE, json.dumps(index, indent=2).encode(), content_type="application/json")


def failure_rows(entries: Iterable[CatalogEntry]) -> list[dict[str, Any]]:
    """Rows for the failures table: id, line, image, code, reason, output prefix."""
    return [
        {"id": e.id, "line": e.line, "image": e.image, "code": (e.error or {}).get("code", ""),
         "reason": (e.error or {}).get("message", ""), "output_prefix": e.output_prefix}
        for e in sorted(entries, key=lambda e: e.line) if e.status == "failed"
    ]


def failed_entry(row: ManifestRow, reason: str, code: str = "invalid_manifest_row") -> CatalogEntry:
    """The entry for a row that could not become an item (bad manifest row, unreadable input)."""
    item = row.item
    return CatalogEntry(
        id=item.id if item else (row.raw_id or f"line-{row.line}"),
        line=row.line,
        image=item.image if item else row.raw_image,
        prompt=item.prompt if item else "",
        status="failed",
        error={"type": "InputError", "code": code, "message": reason},
    )


def crashed_entry(item: CatalogItem, reason: str, work: ItemWork | None = None) -> CatalogEntry:
    """The entry for an item whose task ended without an entry (crashed, or failed past its retries).

    The output prefix is filled in when ``work`` was planned; nothing is written there.
    """
    entry = CatalogEntry(id=item.id, line=item.line, image=item.image, prompt=item.prompt, status="failed",
                         error={"type": "TaskFailure", "code": "task_failed", "message": reason})
    if work is not None and work.run_plan is not None:
        entry.prefix = work.run_plan.prefix
        entry.output_prefix = f"{work.run_plan.output_root.rstrip('/')}/{work.run_plan.prefix}"
    return entry


def split_repeated_rows(items: Sequence[CatalogItem]) -> tuple[list[CatalogItem], list[CatalogEntry]]:
    """Rows naming the same image with the same prompts run once: ``(first of each, duplicate entries)``.

    Found before any file is read; rows that reach the same prefix by other paths (a copy of the same photo)
    are found after planning (``items.split_duplicates``).
    """
    first: dict[str, CatalogItem] = {}
    unique, repeats = [], []
    for item in items:
        key = item.model_dump_json(include={"image", "prompt", "box", "points"})
        if key in first:
            repeats.append(duplicate_entry(item, first[key].id))
        else:
            first[key] = item
            unique.append(item)
    return unique, repeats


@dataclass
class CatalogTally:
    """The entries of one catalog run as they arrive: progress, the summary line, ``catalog.json`` and the outcome.

    Attributes:
        source: the manifest, prefix or folder the run reads.
        output_root: the run's output root (URI or absolute path).
        flow_run_id: recorded in ``catalog.json``; None outside a flow run.
        total: rows of the source, set by ``begin``.
        entries: one per item finished so far (any status), in arrival order.
        warnings: about the source as a whole (ignored columns), from ``begin``.
        checkpoint_every_s: least time between two checkpoints of ``catalog.json`` (``checkpoint_due``).
        started_at: UTC start time, ISO 8601 to the second.
    """

    source: str
    output_root: str
    flow_run_id: str | None = None
    total: int = 0
    entries: list[CatalogEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checkpoint_every_s: float = 10.0
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    _started: float = field(default_factory=time.perf_counter, init=False, repr=False)
    _checkpointed: float = field(default=0.0, init=False, repr=False)

    def begin(self, rows: Sequence[ManifestRow]) -> list[CatalogItem]:
        """Count ``rows`` as the run's items; each unusable row is entered as failed now, and each row that
        repeats an earlier one (same image and prompts) as its duplicate. Returns the items to plan."""
        self.total = len(rows)
        self.warnings = list(getattr(rows, "warnings", []))
        self.add(*(failed_entry(row, row.error or "unusable row") for row in rows if row.item is None))
        unique, repeats = split_repeated_rows([row.item for row in rows if row.item is not None])
        self.add(*repeats)
        return unique

    def add(self, *entries: CatalogEntry) -> None:
        self.entries.extend(entries)

    def counts(self) -> dict[str, int]:
        return count_statuses(self.entries)

    @property
    def percent_done(self) -> float:
        """Items with an entry, in percent of ``total`` (one decimal)."""
        return round(100.0 * len(self.entries) / max(self.total, 1), 1)

    def progress_line(self) -> str:
        """``catalog-batch: 12 of 30 item(s) done (catalog: 12 item(s): ...)`` for the progress artifact."""
        return f"catalog-batch: {len(self.entries)} of {self.total} item(s) done ({summary_line(self.entries)})"

    def summary(self) -> str:
        """``summary_line`` of every entry, with the wall time since the tally started."""
        return summary_line(self.entries, time.perf_counter() - self._started)

    def index(self, complete: bool = True) -> dict[str, Any]:
        """The ``catalog.json`` document of the entries so far (``build_index``); ``complete`` False for a
        checkpoint."""
        return build_index(self.entries, source=self.source, output_root=self.output_root,
                           flow_run_id=self.flow_run_id, started_at=self.started_at, warnings=self.warnings,
                           total=self.total, complete=complete)

    def checkpoint_due(self, now: float | None = None) -> bool:
        """True (and the clock restarted) when ``checkpoint_every_s`` has passed since the last checkpoint."""
        now = time.perf_counter() if now is None else now
        if now - self._checkpointed < self.checkpoint_every_s:
            return False
        self._checkpointed = now
        return True

    def outcome(self, index: dict[str, Any], uris: dict[str, str], summary: str) -> dict[str, Any]:
        """What a catalog run returns.

        Args:
            index: the ``catalog.json`` document written (``index()``).
            uris: ``{"catalog": ..., "gallery": ...}`` where it and the gallery page were written.
            summary: the summary line (``summary()``).

        Returns:
            ``{"counts", "catalog", "gallery", "all_succeeded", "any_no_object", "summary", "items"}``.
        """
        return {
            "counts": index["counts"],
            "catalog": uris["catalog"],
            "gallery": uris["gallery"],
            "all_succeeded": all_succeeded(self.entries),
            "any_no_object": any(e.no_object for e in self.entries),
            "summary": summary,
            "items": index["items"],
        }
