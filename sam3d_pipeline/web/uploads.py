"""The job API's image intake: an uploaded file or a URI checked with the pipeline's own image checks (size,
format, pixels) before any run exists, and an upload stored content-addressed under the output root
(``_uploads/<sha256>/<name>``), where no S3 trigger acts on it: one upload starts exactly one run.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from sam3d_pipeline.errors import ImageTooLargeError, InputError
from sam3d_pipeline.images import load_image
from sam3d_pipeline.keys import content_type, upload_key
from sam3d_pipeline.run.pipeline import RunOptions, content_id, plan, segment_request
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import Storage, is_s3_uri, read_input
from sam3d_pipeline.video import is_video_uri

# Pillow's format name → the extension an upload is stored with (whatever its file name said).
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".gif",
              "MPO": ".jpg"}


@dataclass(frozen=True)
class Intake:
    """A checked image, before any run exists.

    Attributes:
        uri: where the run reads it (the stored upload's URI, or the URI given).
        content_id: ``sha256:<hex>`` of its bytes (its identity in the output prefix).
        width, height: pixels, EXIF orientation applied.
        upload_key: the key under the output root to store an upload at; None for a given URI.
    """

    uri: str
    content_id: str
    width: int
    height: int
    upload_key: str | None = None


def check_upload(data: bytes, filename: str, storage: Storage, settings: Settings) -> Intake:
    """Check an uploaded file; nothing is stored yet (:func:`store_upload` does).

    Raises:
        ImageTooLargeError: over ``SAM3D_MAX_INPUT_BYTES`` or ``SAM3D_MAX_PIXELS`` (the API answers 413).
        InvalidImageError: empty, truncated, or not an image (422).
    """
    name = Path(filename or "upload").name or "upload"
    if len(data) > settings.max_input_bytes:
        raise ImageTooLargeError(f"{name}: {len(data):,} bytes exceeds SAM3D_MAX_INPUT_BYTES="
                                 f"{settings.max_input_bytes:,}")
    image = load_image(data, source=name, max_pixels=settings.max_pixels)
    digest = hashlib.sha256(data).hexdigest()
    key = upload_key(digest, name, EXTENSIONS.get(image.format, ".img"))
    return Intake(uri=storage.uri(key), content_id=content_id(data), width=image.width, height=image.height,
                  upload_key=key)


def store_upload(intake: Intake, data: bytes, storage: Storage) -> None:
    """Store the checked upload at its content-addressed key (once: the same bytes are already there)."""
    if intake.upload_key is not None and not storage.exists(intake.upload_key):
        storage.write_bytes(intake.upload_key, data, content_type=content_type(intake.upload_key))


def _allowed_roots(settings: Settings) -> list[Path]:
    return [Path(p).expanduser().resolve() for p in settings.api_input_roots.split(os.pathsep) if p.strip()]


def check_uri(uri: str, settings: Settings) -> Intake:
    """Check an image named by URI (``s3://bucket/key``, or a local path under ``SAM3D_API_INPUT_ROOTS``): read
    it once (size checked before the download) and run the image checks.

    Raises:
        InputError: a video, a local path outside the allowed folders, a missing object, or not an image.
        ImageTooLargeError: over the byte or pixel limit.
        StorageAccessError, TransientStorageError: storage refused or failed.
    """
    if is_video_uri(uri):
        raise InputError(f"{uri}: the job API takes photos (JPEG, PNG, WebP, TIFF, BMP, GIF); run videos with "
                         "`sam3d-pipeline run`")
    if not is_s3_uri(uri):
        roots = _allowed_roots(settings)
        path = Path(uri).expanduser().resolve()
        if not any(root == path or root in path.parents for root in roots):
            where = ", ".join(map(str, roots)) if roots else "none are configured"
            raise InputError(f"{uri}: the server reads local files only under SAM3D_API_INPUT_ROOTS ({where}); "
                             "upload the file instead, or give an s3:// URI")
        uri = str(path)
    data = read_input(uri, settings)
    image = load_image(data, source=uri, max_pixels=settings.max_pixels)
    return Intake(uri=uri, content_id=content_id(data), width=image.width, height=image.height)


def check_prompts(options: RunOptions, intake: Intake) -> None:
    """Boxes and clicks must lie inside the image (the flow would refuse them later, after queueing).

    Raises:
        InputError: naming the box or click and the image size.
    """
    segment_request(options, intake.width, intake.height)


def planned_run(intake: Intake, options: RunOptions, review: str, output_root: str,
                settings: Settings) -> tuple[str, str, str]:
    """(output prefix, segmenter, reconstructor) of the run, planned exactly as the flow plans it (``auto``
    resolved with this server's settings; no model is loaded, torch is not imported)."""
    run_plan = plan(intake.uri, intake.content_id, options, output_root, settings, review_mode=review)
    return f"{output_root.rstrip('/')}/{run_plan.prefix}", run_plan.segmenter.name, run_plan.reconstructor.name
