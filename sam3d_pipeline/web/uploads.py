"""The job API's intake: an uploaded file or a URI checked with the pipeline's own checks before any run exists,
and an upload stored content-addressed under the output root (``_uploads/<sha256>/<name>``), where no S3 trigger
acts on it: one upload starts exactly one run.

A photo gets the image checks (bytes, format, pixels). A video (MP4 / MOV / M4V / WebM; by URI also a folder or S3
prefix of frames) gets the run's own intake, ``video.load_video`` with the same settings, in its check-only mode:
every frame is decoded and checked as the run will (length, frame size, truncation, audio only, a size change
mid-clip), with one frame's pixels in memory at a time. What is left to the run is what needs the models: whether
the prompted object is found and tracked (``no_object``). Decoding costs about what the run's intake costs (the
clip is bounded by ``SAM3D_VIDEO_MAX_SECONDS`` and ``SAM3D_MAX_INPUT_BYTES``); the route runs it off the event loop.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam3d_pipeline.errors import ImageTooLargeError, InputError, InvalidVideoError
from sam3d_pipeline.images import load_image
from sam3d_pipeline.keys import content_type, upload_key
from sam3d_pipeline.run.pipeline import RunOptions, content_id, plan, segment_request
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import Storage, is_s3_uri, read_input
from sam3d_pipeline.video import VIDEO_SUFFIXES, is_video_uri, load_video, read_clip

# Pillow's format name → the extension an upload is stored with (whatever its file name said).
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".gif",
              "MPO": ".jpg"}
# ISO BMFF major brands of still images (HEIF, AVIF): an ``ftyp`` box that is not a video.
_IMAGE_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"})
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"  # Matroska / WebM
VIDEO_FORMATS = "MP4, MOV, M4V or WebM"


@dataclass(frozen=True)
class Intake:
    """A checked image, before any run exists.

    Attributes:
        uri: where the run reads it (the stored upload's URI, or the URI given).
        content_id: ``sha256:<hex>`` of its bytes (its identity in the output prefix).
        width, height: pixels, EXIF orientation applied (a video's frame size, rotation applied).
        upload_key: the key under the output root to store an upload at; None for a given URI.
        video: for a clip, its ``container`` (``mp4``, ``mov``, ``m4v``, ``webm``, or ``frames`` for a folder) and
            what its check found (``LoadedVideo.describe()``: format as FFmpeg names it, codec, width, height, fps,
            duration_s, frames_read, frames_sampled, stride); None for a photo.
    """

    uri: str
    content_id: str
    width: int
    height: int
    upload_key: str | None = None
    video: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """What the job JSON says of its input: ``kind`` (``photo`` or ``video``) and the check's figures."""
        if self.video is None:
            return {"kind": "photo", "width": self.width, "height": self.height}
        return {"kind": "video", **self.video}


def video_extension(data: bytes, filename: str) -> str | None:
    """The extension a video upload is stored with, from its bytes (never its name); None when it is not a video.

    An ISO BMFF file (``ftyp``) is ``.mov`` (QuickTime brand), ``.m4v`` (M4V brands) or ``.mp4``, unless its brand
    is a still image (HEIF, AVIF); an EBML file is ``.webm`` (``webm`` doctype) or Matroska. Anything else whose
    name ends in a video suffix returns ``""``: a video of an unknown container (its check says why).

    Raises:
        InvalidVideoError: a Matroska file that is not WebM (the pipeline reads MP4, MOV, M4V and WebM).
    """
    name = Path(filename or "upload").name or "upload"
    if len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] not in _IMAGE_BRANDS:
        brand = data[8:12]
        return ".mov" if brand == b"qt  " else ".m4v" if brand.startswith(b"M4V") else ".mp4"
    if data.startswith(_EBML_MAGIC):
        if b"webm" in data[:4096]:  # the EBML header's DocType
            return ".webm"
        raise InvalidVideoError(f"{name}: a Matroska (MKV) file; the pipeline reads {VIDEO_FORMATS} clips "
                                "(remux it as WebM or MP4)")
    return "" if name.lower().endswith(VIDEO_SUFFIXES) else None


def check_video(data: bytes, source: str, settings: Settings) -> dict[str, Any]:
    """Decode and check a clip as the run's intake will (``load_video``, check-only); its ``describe()``.

    Raises:
        InvalidVideoError: empty, truncated, audio only, zero frames, corrupt, frames of more than one size.
        VideoTooLargeError: over ``SAM3D_VIDEO_MAX_SECONDS`` or ``SAM3D_VIDEO_MAX_PIXELS``.
    """
    return load_video(data, source=source, settings=settings, keep_pixels=False).describe()


def check_upload(data: bytes, filename: str, storage: Storage, settings: Settings) -> Intake:
    """Check an uploaded photo or clip; nothing is stored yet (:func:`store_upload` does).

    A clip is told from a photo by its bytes (an MP4 / MOV / M4V / WebM container), or by a video suffix in its
    name when its bytes are no known container (its check then says why it is refused).

    Raises:
        ImageTooLargeError: over ``SAM3D_MAX_INPUT_BYTES`` (a photo or a clip: the run reads both with that
            limit), or a photo over ``SAM3D_MAX_PIXELS`` (the API answers 413).
        InvalidImageError: empty, truncated, or not an image (422).
        InvalidVideoError, VideoTooLargeError: a clip the run would refuse (422, the reason in words).
    """
    name = Path(filename or "upload").name or "upload"
    if len(data) > settings.max_input_bytes:
        raise ImageTooLargeError(f"{name}: {len(data):,} bytes exceeds SAM3D_MAX_INPUT_BYTES="
                                 f"{settings.max_input_bytes:,}")
    digest = hashlib.sha256(data).hexdigest()
    extension = video_extension(data, name)
    if extension is not None:
        video = check_video(data, name, settings)
        if not extension:  # FFmpeg read it, but the pipeline reads these containers only
            raise InvalidVideoError(f"{name}: FFmpeg reads it as {video['format']!r}, not an {VIDEO_FORMATS} "
                                    "container; remux it as MP4 or WebM")
        key = upload_key(digest, name, extension)
        return Intake(uri=storage.uri(key), content_id=content_id(data), width=video["width"],
                      height=video["height"], upload_key=key, video={"container": extension[1:], **video})
    image = load_image(data, source=name, max_pixels=settings.max_pixels)
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
    """Check a photo or clip named by URI (``s3://bucket/key``, or a local path under ``SAM3D_API_INPUT_ROOTS``):
    read it once (size checked before the download) and run the checks the run will. It is a video when the run
    will take it for one (``is_video_uri``: a video suffix, or a folder / ``s3://…/`` prefix of frames).

    Raises:
        InputError: a local path outside the allowed folders, a missing object, or not an image.
        InvalidVideoError, VideoTooLargeError: a clip (or folder of frames) the run would refuse.
        ImageTooLargeError: over the byte limit, or a photo over the pixel limit.
        StorageAccessError, TransientStorageError: storage refused or failed.
    """
    if not is_s3_uri(uri):
        roots = _allowed_roots(settings)
        path = Path(uri).expanduser().resolve()
        if not any(root == path or root in path.parents for root in roots):
            where = ", ".join(map(str, roots)) if roots else "none are configured"
            raise InputError(f"{uri}: the server reads local files only under SAM3D_API_INPUT_ROOTS ({where}); "
                             "upload the file instead, or give an s3:// URI")
        uri = str(path)
    if is_video_uri(uri):
        data = read_clip(uri, settings)
        video = check_video(data, uri, settings)
        container = "frames" if video["format"] == "frames" else Path(uri).suffix.lower()[1:]
        return Intake(uri=uri, content_id=content_id(data), width=video["width"], height=video["height"],
                      video={"container": container, **video})
    data = read_input(uri, settings)
    image = load_image(data, source=uri, max_pixels=settings.max_pixels)
    return Intake(uri=uri, content_id=content_id(data), width=image.width, height=image.height)


def check_prompts(options: RunOptions, intake: Intake) -> None:
    """Boxes and clicks must lie inside the image, or a video's frames (the flow would refuse them later, after
    queueing); ``video_frames`` is for a video only.

    Raises:
        InputError: naming the box or click and the image size, or ``video_frames`` given with a photo.
    """
    if intake.video is None and options.video_frames != 1:
        raise InputError(f"video_frames: {options.video_frames} frames to try, but the input is a photo "
                         "(video_frames is for a video)")
    segment_request(options, intake.width, intake.height)


def planned_run(intake: Intake, options: RunOptions, review: str, output_root: str,
                settings: Settings) -> tuple[str, str, str]:
    """(output prefix, segmenter, reconstructor) of the run, planned exactly as the flow plans it (``auto``
    resolved with this server's settings; no model is loaded, torch is not imported)."""
    run_plan = plan(intake.uri, intake.content_id, options, output_root, settings, review_mode=review)
    return f"{output_root.rstrip('/')}/{run_plan.prefix}", run_plan.segmenter.name, run_plan.reconstructor.name
