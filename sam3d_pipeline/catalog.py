"""Catalog batches: manifest parsing, per-item planning and stages, GPU-batch grouping, and ``catalog.json``.

A catalog run turns many photos into 3D assets. Each item goes through the same steps as ``image-to-3d``
(``pipeline.py``) and lands at exactly the same deterministic output prefix, so a photo processed by either
is found by both. The stages here are plain functions; the ``catalog-batch`` flow wraps them in tasks and
``run_catalog_plain`` chains them in a plain loop (the baseline for orchestration overhead).

Item outcomes (``CatalogEntry.status``):
- ``completed``: segmented, reconstructed and published in this run.
- ``skipped``: a finished ``result.json`` (``completed`` or ``no_object``) already sits at the item's prefix;
  found from the input's bytes alone, before decoding or touching any model.
- ``no_object``: the segmenter found nothing to reconstruct (published, with the overlay).
- ``failed``: a reason is recorded (and a ``failed`` ``result.json`` where the prefix is known); the next
  run retries it.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from . import pipeline
from .errors import InputError, PipelineError
from .images import LoadedImage
from .keys import image_stem
from .masks import select_instance
from .pipeline import RunOptions, RunPlan
from .report import RunResult
from .settings import Settings, get_settings
from .storage import (
    Storage,
    _botocore_errors,
    classify_s3_error,
    is_s3_uri,
    read_input,
    s3_client,
    split_s3_uri,
)
from .types import Point, Reconstruction, Segmentation

CATALOG_FILE = "catalog.json"
MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
FINISHED_STATUSES = ("completed", "no_object")
EntryStatus = Literal["completed", "skipped", "no_object", "failed"]


class CatalogItem(BaseModel):
    """One manifest row: a photo and how to segment it.

    Attributes:
        id: unique within the manifest; default ``<image stem>`` (``-<line>`` appended when repeated).
        image: local path or ``s3://bucket/key`` (relative paths resolve against the manifest's folder).
        prompt: what to segment.
        box: optional box prompt, xyxy in image pixels.
        points: optional clicks in image pixels (label 1 = object, 0 = background).
        review: the row asks for a person to review the mask (recorded; batch runs do not pause).
        line: 1-based line of the manifest (data rows start at 2 in a CSV with its header).
    """

    id: str = Field(min_length=1, max_length=200)
    image: str = Field(min_length=1)
    prompt: str = Field(min_length=1, max_length=500)
    box: tuple[float, float, float, float] | None = None
    points: list[Point] = Field(default_factory=list)
    review: bool = False
    line: int = 0

    @field_validator("prompt", "image", "id")
    @classmethod
    def _strip(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("is blank")
        return value

    def options(self, *, segmenter: str = "auto", reconstructor: str = "auto", seed: int = 0) -> RunOptions:
        """The ``image-to-3d`` options this item runs with (same options → same output prefix)."""
        return RunOptions(
            prompt=self.prompt,
            boxes=[self.box] if self.box else [],
            points=self.points,
            segmenter=segmenter,
            reconstructor=reconstructor,
            seed=seed,
        )


@dataclass
class ManifestRow:
    """A parsed manifest row: an item, or the reason the row cannot be used (never both)."""

    line: int
    item: CatalogItem | None = None
    error: str | None = None
    raw_id: str = ""
    raw_image: str = ""


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
    timings_s: dict[str, float] = Field(default_factory=dict)
    segmenter: str | None = None
    reconstructor: str | None = None
    gpu_batch: int | None = Field(None, description="index of the reconstruction batch the item ran in")
    review_requested: bool = False
    error: dict[str, str] | None = None

    @property
    def has_asset(self) -> bool:
        return self.status == "completed" or (self.status == "skipped" and self.result_status == "completed")

    @property
    def no_object(self) -> bool:
        return self.status == "no_object" or (self.status == "skipped" and self.result_status == "no_object")


# ---------------------------------------------------------------------------------------------------------------
# Manifests and sources


def _parse_box(value: Any) -> tuple[float, float, float, float] | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip()
        parts = json.loads(text) if text.startswith("[") else text.split(",")
    else:
        parts = value
    try:
        numbers = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise ValueError(f"box {value!r}: expected four numbers x0,y0,x1,y1") from None
    if len(numbers) != 4:
        raise ValueError(f"box {value!r}: expected four numbers x0,y0,x1,y1, got {len(numbers)}")
    return tuple(numbers)  # type: ignore[return-value]


def _parse_points(value: Any) -> list[dict[str, Any]]:
    """JSON (``[{"x":..,"y":..,"label":..}]`` or ``[[x, y, label]]``) or ``x,y[,label];x,y``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            value = [chunk.split(",") for chunk in text.split(";") if chunk.strip()]
    points = []
    for p in value:
        if isinstance(p, dict):
            points.append(p)
            continue
        try:
            numbers = [float(v) for v in p]
        except (TypeError, ValueError):
            raise ValueError(f"point {p!r}: expected x,y or x,y,label") from None
        if len(numbers) not in (2, 3):
            raise ValueError(f"point {p!r}: expected x,y or x,y,label")
        points.append({"x": numbers[0], "y": numbers[1], "label": int(numbers[2]) if len(numbers) == 3 else 1})
    return points


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value or "").strip().lower()
    if text in ("", "0", "false", "no", "n", "off"):
        return False
    if text in ("1", "true", "yes", "y", "on"):
        return True
    raise ValueError(f"review {value!r}: expected true/false")


def _resolve_image(image: str, base: str) -> str:
    image = image.strip()
    if not image or is_s3_uri(image) or not base:
        return image
    if is_s3_uri(base):
        return image if image.startswith("/") else f"{base.rstrip('/')}/{image}"
    path = Path(image).expanduser()
    return str(path if path.is_absolute() else Path(base) / path)


def _make_row(line: int, record: dict[str, Any], base: str, default_prompt: str | None) -> ManifestRow:
    raw_image = str(record.get("image") or "").strip()
    raw_id = str(record.get("id") or "").strip()
    row = ManifestRow(line=line, raw_id=raw_id, raw_image=raw_image)
    unknown = sorted(set(record) - {"image", "prompt", "box", "points", "review", "id"})
    try:
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")
        if not raw_image:
            raise ValueError("field 'image' is missing or empty")
        prompt = str(record.get("prompt") or "").strip() or (default_prompt or "")
        if not prompt:
            raise ValueError("field 'prompt' is empty and no default prompt was given")
        row.item = CatalogItem(
            id=raw_id or image_stem(raw_image),
            image=_resolve_image(raw_image, base),
            prompt=prompt,
            box=_parse_box(record.get("box")),
            points=_parse_points(record.get("points")),
            review=_parse_bool(record.get("review")),
            line=line,
        )
    except ValidationError as exc:
        row.error = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'row'}: {e['msg']}" for e in exc.errors())
    except (ValueError, TypeError) as exc:
        row.error = str(exc)
    return row


def parse_manifest(text: str, *, fmt: Literal["csv", "jsonl"], source: str, base: str = "",
                   default_prompt: str | None = None) -> list[ManifestRow]:
    """Parse a manifest into rows; a bad row becomes a row with an ``error``, never an exception.

    Args:
        text: the manifest's contents (UTF-8 text).
        fmt: ``csv`` (header row naming the fields) or ``jsonl`` (one JSON object per line).
        source: the manifest's path or URI, named in error messages.
        base: folder (local or ``s3://``) that relative image paths resolve against.
        default_prompt: the prompt for rows whose ``prompt`` is empty.

    Returns:
        One ``ManifestRow`` per data row, in file order; blank lines are ignored. Repeated ids get
        ``-<line>`` appended when they were defaulted, and are an error when given explicitly.

    Raises:
        InputError: the manifest as a whole is unusable (no header, no ``image`` column, no rows).
    """
    rows: list[ManifestRow] = []
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
        if not reader.fieldnames or "image" not in [f.strip() for f in reader.fieldnames]:
            raise InputError(f"{source}: CSV manifest needs a header row with an 'image' column "
                             f"(got {reader.fieldnames or 'no header'})")
        for record in reader:
            line = reader.line_num
            if None in record:
                rows.append(ManifestRow(line=line, error=f"{len(record[None])} value(s) more than header columns"))
                continue
            clean = {k.strip(): v for k, v in record.items() if k is not None and v not in (None, "")}
            if not clean:
                continue
            rows.append(_make_row(line, clean, base, default_prompt))
    elif fmt == "jsonl":
        for line, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                rows.append(ManifestRow(line=line, error=f"not valid JSON: {exc.msg} (column {exc.colno})"))
                continue
            if not isinstance(record, dict):
                rows.append(ManifestRow(line=line, error=f"expected a JSON object, got {type(record).__name__}"))
                continue
            rows.append(_make_row(line, record, base, default_prompt))
    else:
        raise InputError(f"{source}: unknown manifest format {fmt!r} (csv or jsonl)")
    if not rows:
        raise InputError(f"{source}: the manifest has no data rows")
    _dedupe_ids(rows)
    for row in rows:
        if row.error:
            row.error = f"{source} line {row.line}: {row.error}"
    return rows


def _dedupe_ids(rows: list[ManifestRow]) -> None:
    seen: dict[str, int] = {}
    for row in rows:
        if row.item is None:
            continue
        item_id = row.item.id
        if item_id in seen:
            if row.raw_id:
                row.error = f"id {item_id!r} repeats line {seen[item_id]}"
                row.item = None
                continue
            item_id = f"{item_id}-{row.line}"
            row.item = row.item.model_copy(update={"id": item_id})
        seen[item_id] = row.line


def manifest_format(source: str) -> str | None:
    """``csv`` / ``jsonl`` when ``source`` names a manifest file by its suffix, else None."""
    return MANIFEST_SUFFIXES.get(PurePosixPath(source.rstrip("/")).suffix.lower())


def load_source(source: str, *, default_prompt: str | None = None, output_root: str = "",
                settings: Settings | None = None) -> list[ManifestRow]:
    """The rows of a catalog source.

    Args:
        source: a manifest (``.csv`` / ``.jsonl`` / ``.ndjson``, local or ``s3://``), an ``s3://bucket/prefix``
            or a local folder (every image file under it, sorted by key).
        default_prompt: prompt for manifest rows without one; required for a prefix or folder.
        output_root: skipped when listing a prefix or folder (the pipeline never reads its own outputs).
        settings: storage settings.

    Returns:
        Rows in source order.

    Raises:
        InputError: unknown source, an unreadable manifest, a prefix without a default prompt, nothing listed.
        TransientStorageError: S3 failures worth retrying.
    """
    s = settings or get_settings()
    fmt = manifest_format(source)
    if fmt is not None:
        data = read_input(source, s)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{source}: manifest is not UTF-8 text: {exc}") from None
        if is_s3_uri(source):
            base = source.rsplit("/", 1)[0]
        else:
            base = str(Path(source).expanduser().resolve().parent)
        return parse_manifest(text, fmt=fmt, source=source, base=base, default_prompt=default_prompt)  # type: ignore[arg-type]
    if not default_prompt or not default_prompt.strip():
        raise InputError(f"{source}: listing a prefix or folder needs a default prompt (--prompt)")
    uris = list_images(source, output_root=output_root, settings=s)
    if not uris:
        raise InputError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    rows = [_make_row(i, {"image": uri, "prompt": default_prompt, "id": _listing_id(uri, source)}, "", None)
            for i, uri in enumerate(uris, start=1)]
    _dedupe_ids(rows)
    return rows


def _listing_id(uri: str, source: str) -> str:
    rel = uri[len(source.rstrip("/")) + 1:] if uri.startswith(source.rstrip("/") + "/") else uri
    return rel.rsplit(".", 1)[0]


def list_images(source: str, *, output_root: str = "", settings: Settings | None = None) -> list[str]:
    """Image files (by suffix) under an ``s3://bucket/prefix`` or a local folder, sorted, minus ``output_root``.

    Raises:
        InputError: a local source that is not a folder.
        TransientStorageError, StorageAccessError: S3 listing failures.
    """
    s = settings or get_settings()
    out = output_root.rstrip("/")
    if is_s3_uri(source):
        bucket, prefix = split_s3_uri(source)
        client = s3_client(s)
        uris = []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    uris.append(f"s3://{bucket}/{obj['Key']}")
        except _botocore_errors() as exc:
            raise classify_s3_error(exc, f"listing {source}") from exc
    else:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise InputError(f"{source}: not a manifest (.csv/.jsonl), an s3:// prefix or a folder")
        uris = [str(p) for p in sorted(folder.resolve().rglob("*")) if p.is_file()]
        out = str(Path(out).expanduser().resolve()) if out and not is_s3_uri(out) else out
    images = [u for u in sorted(uris) if u.lower().endswith(IMAGE_SUFFIXES)]
    return [u for u in images if not (out and (u == out or u.startswith(out + "/")))]


# ---------------------------------------------------------------------------------------------------------------
# Per-item stages (the flow wraps each in a task; run_catalog_plain chains them)


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
    return pipeline.existing_result(storage, prefix, statuses=tuple(FINISHED_STATUSES))


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


# ---------------------------------------------------------------------------------------------------------------
# The catalog index


def count_statuses(entries: Iterable[CatalogEntry]) -> dict[str, int]:
    """``{"completed": n, "skipped": n, "no_object": n, "failed": n}`` (every key present)."""
    counts = Counter(e.status for e in entries)
    return {k: counts.get(k, 0) for k in ("completed", "skipped", "no_object", "failed")}


def summary_line(entries: Sequence[CatalogEntry], wall_s: float | None = None) -> str:
    """One line for the terminal, e.g. ``catalog: 30 item(s): 25 completed, 0 skipped, 2 no_object, 3 failed``."""
    c = count_statuses(entries)
    line = (f"catalog: {len(entries)} item(s): {c['completed']} completed, {c['skipped']} skipped, "
            f"{c['no_object']} no_object, {c['failed']} failed")
    return line + (f" ({wall_s:.1f} s)" if wall_s is not None else "")


def all_succeeded(entries: Iterable[CatalogEntry]) -> bool:
    """True when every item has a 3D asset (completed now or earlier)."""
    return all(e.has_asset for e in entries)


def build_index(entries: Sequence[CatalogEntry], *, source: str, output_root: str,
                flow_run_id: str | None = None, started_at: str | None = None) -> dict[str, Any]:
    """The ``catalog.json`` document: ``{"items": [...], "counts": {...}, ...}``, items in manifest order."""
    ordered = sorted(entries, key=lambda e: (e.line, e.id))
    return {
        "items": [e.model_dump(mode="json") for e in ordered],
        "counts": count_statuses(ordered),
        "source": source,
        "output_root": output_root,
        "flow_run_id": flow_run_id,
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
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


# ---------------------------------------------------------------------------------------------------------------
# The plain loop (no Prefect): the baseline the orchestration overhead is measured against


def run_catalog_plain(rows: Sequence[ManifestRow], storage: Storage, *, batch_size: int = 8,
                      segmenter: str = "auto", reconstructor: str = "auto", seed: int = 0,
                      settings: Settings | None = None, force: bool = False) -> list[CatalogEntry]:
    """Every stage of a catalog run in one thread, without Prefect. Returns entries in row order."""
    s = settings or get_settings()
    entries: list[CatalogEntry] = []
    pending: list[ItemWork] = []
    for row in rows:
        if row.item is None:
            entries.append(failed_entry(row, row.error or "unusable row"))
            continue
        planned = plan_item(row.item, row.item.options(segmenter=segmenter, reconstructor=reconstructor, seed=seed),
                            storage, s, force=force)
        if isinstance(planned, CatalogEntry):
            entries.append(planned)
        elif planned.error is not None:
            entries.append(fail_item(planned, storage))
        else:
            pending.append(planned)
    for index, batch in enumerate(gpu_batches(pending, batch_size)):
        for work in batch:
            decode_item(work, s)
        segment_batch(batch, s)
        reconstruct_batch(batch, index, s)
        entries.extend(finish_item(work, storage, s) for work in batch)
    return sorted(entries, key=lambda e: e.line)


__all__ = [
    "CatalogEntry", "CatalogItem", "ItemWork", "ManifestRow", "build_index", "load_source", "parse_manifest",
    "run_catalog_plain", "summary_line",
]
