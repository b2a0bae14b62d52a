"""Catalog sources without a manifest: the photos and videos under an ``s3://bucket/prefix`` or a local folder."""

from __future__ import annotations

from pathlib import Path

from sam3d_pipeline.errors import InputError
from sam3d_pipeline.settings import Settings, get_settings
from sam3d_pipeline.storage import is_s3_uri, list_uris
from sam3d_pipeline.video import VIDEO_SUFFIXES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
INPUT_SUFFIXES = IMAGE_SUFFIXES + VIDEO_SUFFIXES  # what a listing takes: photos, and clips (MP4 / MOV / WebM)


def listing_id(uri: str, source: str) -> str:
    """The default item id of a listed file: its path below ``source`` without the suffix (``sub/two``)."""
    rel = uri[len(source.rstrip("/")) + 1:] if uri.startswith(source.rstrip("/") + "/") else uri
    return rel.rsplit(".", 1)[0]


def list_inputs(source: str, *, output_root: str = "", settings: Settings | None = None) -> list[str]:
    """Photos and video files (by suffix, ``INPUT_SUFFIXES``) under an ``s3://bucket/prefix`` or a local folder,
    sorted, minus ``output_root``.

    Raises:
        InputError: a local source that is not a folder.
        TransientStorageError, StorageAccessError: S3 listing failures.
    """
    s = settings or get_settings()
    out = output_root.rstrip("/")
    if is_s3_uri(source):
        uris = list_uris(source, s)
    else:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise InputError(f"{source}: not a manifest (.csv/.jsonl), an s3:// prefix or a folder")
        uris = [str(p) for p in sorted(folder.resolve().rglob("*")) if p.is_file()]
        out = str(Path(out).expanduser().resolve()) if out and not is_s3_uri(out) else out
    inputs = [u for u in sorted(uris) if u.lower().endswith(INPUT_SUFFIXES)]
    return [u for u in inputs if not (out and (u == out or u.startswith(out + "/")))]
