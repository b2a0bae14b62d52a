"""Catalog sources: manifest rows (CSV or JSON Lines) parsed into items, or a prefix/folder listed into rows.

A bad row never raises: it becomes a ``ManifestRow`` with the reason, reported as a failed item.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from sam3d_pipeline import jsonsafe
from sam3d_pipeline.catalog.listing import INPUT_SUFFIXES, list_inputs, listing_id
from sam3d_pipeline.errors import InputError
from sam3d_pipeline.keys import image_stem
from sam3d_pipeline.run.pipeline import RunOptions
from sam3d_pipeline.settings import Settings, get_settings
from sam3d_pipeline.storage import is_s3_uri, read_input
from sam3d_pipeline.types import PROMPT_MAX_CHARS, BoxParam, PointList, clean_prompt

MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class CatalogItem(BaseModel):
    """One manifest row: a photo (or a video) and how to segment it.

    Attributes:
        id: unique within the manifest; default ``<image stem>`` (``-<line>`` appended when repeated).
        image: local path or ``s3://bucket/key`` of a photo, or of a video: an MP4 / MOV / WebM file, or a folder /
            ``s3://…/`` prefix of frames (relative paths resolve against the manifest's folder).
        prompt: what to segment.
        box: optional box prompt, xyxy in image pixels.
        points: optional clicks in image pixels (label 1 = object, 0 = background).
        review: the row asks for a person to review the mask (recorded; batch runs do not pause).
        instances: objects to reconstruct: ``best``, ``all`` or instance indices (CSV: ``0;2`` or ``0,2``).
        line: 1-based line of the manifest (data rows start at 2 in a CSV with its header).
    """

    id: str = Field(min_length=1, max_length=200)
    image: str = Field(min_length=1)
    prompt: str = Field(min_length=1, max_length=PROMPT_MAX_CHARS)
    box: BoxParam | None = None
    points: PointList = Field(default_factory=list)
    review: bool = False
    instances: Literal["best", "all"] | list[Annotated[int, Field(ge=0)]] = "best"
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
            instances=self.instances,
        )


@dataclass
class ManifestRow:
    """A parsed manifest row: an item, or the reason the row cannot be used (never both)."""

    line: int
    item: CatalogItem | None = None
    error: str | None = None
    raw_id: str = ""
    raw_image: str = ""


FIELDS = ("image", "prompt", "box", "points", "review", "id", "instances")


class ManifestRows(list[ManifestRow]):
    """A source's rows, in order, plus ``warnings`` about the source as a whole (e.g. ignored columns)."""

    def __init__(self, rows: Sequence[ManifestRow] = (), warnings: Sequence[str] = ()):
        super().__init__(rows)
        self.warnings = list(warnings)


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


def _parse_instances(value: Any) -> Any:
    """``best`` (empty), ``all``, ``0;2`` / ``0,2`` / ``[0, 2]`` → the ``instances`` option."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "best"
    if isinstance(value, list):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    from sam3d_pipeline.run.objects import parse_instances

    try:
        return parse_instances(str(value).replace(";", ","))
    except InputError as exc:
        raise ValueError(str(exc)) from None


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


def allowed_roots(base: str, settings: Settings) -> list[Path]:
    """The folders a local manifest (or folder listing) at ``base`` may read photos from, symlinks resolved."""
    extra = [r for r in settings.catalog_input_roots.split(os.pathsep) if r.strip()]
    return [Path(r).expanduser().resolve() for r in [base, *extra]]


def _resolve_image(image: str, base: str, roots: Sequence[Path] = ()) -> str:
    """Where a row's ``image`` is, confined to what the manifest may read.

    An ``s3://`` URI is used as written. Next to an S3 manifest a relative key joins the manifest's prefix
    (no ``..``), and a local path is refused: an S3 manifest never reads the worker's disk. Next to a local
    manifest a path resolves against its folder and, symlinks followed, must stay under ``roots``.

    Raises:
        ValueError: the path escapes (the row fails with that reason; the file is never opened).
    """
    image = image.strip()
    if not image or is_s3_uri(image) or not base:
        return image
    if is_s3_uri(base):
        key = PurePosixPath(image)
        if key.is_absolute() or image.startswith("~") or re.match(r"^[A-Za-z]:[\\/]", image):
            raise ValueError(f"image {image!r}: a manifest on S3 names s3:// URIs or keys relative to its "
                             "prefix, never a local path")
        if ".." in key.parts:
            raise ValueError(f"image {image!r}: '..' is not allowed in a key relative to the manifest")
        return f"{base.rstrip('/')}/{key}" + ("/" if image.endswith("/") else "")  # a prefix of frames stays one
    path = Path(image).expanduser()
    path = path if path.is_absolute() else Path(base) / path
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python 3.11's report of a symlink loop
        raise ValueError(f"image {image!r}: symbolic link loop") from None
    if not any(resolved == root or root in resolved.parents for root in roots):
        lexical = Path(os.path.normpath(path))
        how = ("is a symbolic link leading outside" if any(lexical == r or r in lexical.parents for r in roots)
               else "is outside")
        raise ValueError(f"image {image!r} {how} the manifest's folder {roots[0]}; a local manifest reads photos "
                         "only there (or under SAM3D_CATALOG_INPUT_ROOTS)")
    return str(path)


def _make_row(line: int, record: dict[str, Any], base: str, default_prompt: str | None,
              roots: Sequence[Path] = ()) -> ManifestRow:
    raw_image = str(record.get("image") or "").strip()
    raw_id = str(record.get("id") or "").strip()
    row = ManifestRow(line=line, raw_id=raw_id, raw_image=raw_image)
    roots = list(roots) or ([Path(base).expanduser().resolve()] if base and not is_s3_uri(base) else [])
    try:
        if not raw_image:
            raise ValueError("field 'image' is missing or empty")
        prompt = clean_prompt(str(record.get("prompt") or "")) or (default_prompt or "")
        if not prompt:
            raise ValueError("field 'prompt' is empty and no default prompt was given")
        row.item = CatalogItem(
            id=raw_id or image_stem(raw_image),
            image=_resolve_image(raw_image, base, roots),
            prompt=prompt,
            box=_parse_box(record.get("box")),
            points=_parse_points(record.get("points")),
            review=_parse_bool(record.get("review")),
            instances=_parse_instances(record.get("instances")),
            line=line,
        )
    except ValidationError as exc:
        row.error = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'row'}: {e['msg']}" for e in exc.errors())
    except (ValueError, TypeError) as exc:
        row.error = str(exc)
    return row


def parse_manifest(text: str, *, fmt: Literal["csv", "jsonl"], source: str, base: str = "",
                   default_prompt: str | None = None, roots: Sequence[Path] = ()) -> ManifestRows:
    """Parse a manifest into rows; a bad row becomes a row with an ``error``, never an exception.

    Args:
        text: the manifest's contents (UTF-8 text).
        fmt: ``csv`` (header row naming the fields) or ``jsonl`` (one JSON object per line).
        source: the manifest's path or URI, named in error messages.
        base: folder (local or ``s3://``) that relative image paths resolve against.
        default_prompt: the prompt for rows whose ``prompt`` is empty.

        roots: folders local images must stay under (symlinks followed); default: ``base`` alone.

    Returns:
        ``ManifestRows``: one ``ManifestRow`` per data row, in file order; blank lines are ignored. Repeated ids
        get ``-<line>`` appended when they were defaulted, and are an error when given explicitly. Columns or
        keys the pipeline does not know are ignored, with one warning naming them.

    Raises:
        InputError: the manifest as a whole is unusable (no header, no ``image`` column, no rows).
    """
    rows: list[ManifestRow] = []
    unknown: set[str] = set()
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
            rows.append(_make_row(line, _known(clean, unknown), base, default_prompt, roots))
    elif fmt == "jsonl":
        # Lines end at "\n" only: str.splitlines() would also split at U+2028 and other separators that are
        # valid inside a JSON string.
        for line, raw in enumerate(text.split("\n"), start=1):
            if not raw.strip():
                continue
            try:
                record = jsonsafe.loads(raw)
            except json.JSONDecodeError as exc:
                rows.append(ManifestRow(line=line, error=f"not valid JSON: {exc.msg} (column {exc.colno})"))
                continue
            except jsonsafe.JSONLimitError as exc:
                rows.append(ManifestRow(line=line, error=f"not valid JSON: {exc}"))
                continue
            if not isinstance(record, dict):
                rows.append(ManifestRow(line=line, error=f"expected a JSON object, got {type(record).__name__}"))
                continue
            rows.append(_make_row(line, _known(record, unknown), base, default_prompt, roots))
    else:
        raise InputError(f"{source}: unknown manifest format {fmt!r} (csv or jsonl)")
    if not rows:
        raise InputError(f"{source}: the manifest has no data rows")
    _dedupe_ids(rows)
    for row in rows:
        if row.error:
            row.error = f"{source} line {row.line}: {row.error}"
    warnings = [f"{source}: ignored unknown column(s) {', '.join(sorted(unknown))} (the pipeline reads "
                f"{', '.join(FIELDS)})"] if unknown else []
    return ManifestRows(rows, warnings)


def _known(record: dict[str, Any], unknown: set[str]) -> dict[str, Any]:
    """The fields the pipeline reads; the names of the others are added to ``unknown``."""
    unknown.update(str(k) for k in record if k not in FIELDS)
    return {k: v for k, v in record.items() if k in FIELDS}


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
            or a local folder (every photo and video file under it, ``listing.INPUT_SUFFIXES``, sorted by key).
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
            base, roots = source.rsplit("/", 1)[0], []
        else:
            base = str(Path(source).expanduser().resolve().parent)
            roots = allowed_roots(base, s)
        return parse_manifest(text, fmt=fmt, source=source, base=base, default_prompt=default_prompt,  # type: ignore[arg-type]
                              roots=roots)
    if not default_prompt or not clean_prompt(default_prompt):
        raise InputError(f"{source}: listing a prefix or folder needs a default prompt (--prompt)")
    uris = list_inputs(source, output_root=output_root, settings=s)
    if not uris:
        raise InputError(f"{source}: no photo or video files ({', '.join(INPUT_SUFFIXES)}) found")
    base = "" if is_s3_uri(source) else str(Path(source).expanduser().resolve())
    roots = allowed_roots(base, s) if base else []
    rows = [_make_row(i, {"image": uri, "prompt": default_prompt, "id": listing_id(uri, source)}, base, None, roots)
            for i, uri in enumerate(uris, start=1)]
    _dedupe_ids(rows)
    return ManifestRows(rows)
