"""Video intake: an MP4 / MOV / WebM file, or a folder / S3 prefix of frames, decoded into a bounded sample.

Limits are checked from the header before decoding where the container states them (frame size, duration), and
again while decoding (a clip whose header says nothing, or lies): every decoded frame's size is checked before it
is converted or kept, and a stream that changes frame size mid-clip is refused. Frames are sampled by a stride
that grows until the sample fits ``SAM3D_VIDEO_MAX_FRAMES`` and a fixed memory budget computed from the frames
actually decoded, so memory stays bounded whatever the clip or its header says.
A file that is truncated, has no frames, or holds only audio is refused with the reason in words.

A folder or prefix of frames is read in two steps: ``read_frame_folder`` lists it and returns a small manifest
(each frame's URI and content identity) that stands in for the file's bytes, so the run's output key covers
every frame; ``load_video`` then reads only the sampled frames.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from sam3d_pipeline.errors import InputError, InvalidImageError, InvalidVideoError, PipelineError, VideoTooLargeError
from sam3d_pipeline.images import LoadedImage, load_image
from sam3d_pipeline.settings import Settings, get_settings
from sam3d_pipeline.storage import classify_s3_error, is_s3_uri, read_input, s3_client, split_s3_uri

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".webm")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# The frames kept from one clip never take more than this (the stride grows instead): 1 GiB of RGB pixels.
FRAME_MEMORY_BUDGET_BYTES = 1 << 30
FRAME_MANIFEST_MAGIC = b"sam3d-frame-folder/1\n"
# The settings that decide which frames of a clip are kept: a GPU worker decodes a clip with the submitter's.
SAMPLING_SETTINGS = ("video_stride", "video_max_frames", "video_max_seconds", "video_max_pixels", "video_folder_fps")
_MP4_BRANDS = (b"ftyp",)
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"  # Matroska / WebM


@dataclass
class VideoFrame:
    """One sampled frame.

    Attributes:
        index: the frame's position in the source (0-based, decode order; a folder's sorted file order).
        time_s: presentation time in seconds from the clip's start.
        rgb: ``(H, W, 3)`` uint8, rotation metadata applied.
    """

    index: int
    time_s: float
    rgb: np.ndarray


@dataclass
class LoadedVideo:
    """A decoded, validated, sampled clip.

    Attributes:
        frames: the sampled frames, in time order (every ``stride``-th frame read).
        source: the input's URI, named in messages.
        sha256: hex digest of the file bytes (of the manifest, for a folder of frames).
        format: container format (``mp4``, ``webm``, ...) or ``frames`` for a folder.
        codec: the video codec (``h264``, ``vp9``, ...) or the frames' image format.
        fps: frames per second (average, as the container states it; a folder's assumed rate).
        frames_read: frames decoded (or files in the folder).
        duration_s: the clip's length: the container's, else the last frame's time plus one frame.
        stride: every ``stride``-th frame was kept.
        notes: what intake did that a person should know; they go into the result's ``messages``.
    """

    frames: list[VideoFrame]
    source: str
    sha256: str
    format: str
    codec: str
    fps: float
    frames_read: int
    duration_s: float
    stride: int
    notes: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return int(self.frames[0].rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.frames[0].rgb.shape[0])

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "codec": self.codec, "width": self.width, "height": self.height,
                "fps": round(self.fps, 3), "duration_s": round(self.duration_s, 3), "frames_read": self.frames_read,
                "frames_sampled": len(self.frames), "stride": self.stride}

    def frame_image(self, position: int) -> LoadedImage:
        """The sampled frame at ``position`` (in ``frames``) as a photo the rest of the pipeline reads."""
        frame = self.frames[position]
        return LoadedImage(rgb=frame.rgb, source=self.source, sha256=self.sha256, format=f"{self.format} frame",
                           original_mode="RGB", notes=list(self.notes))


def is_video_uri(uri: str) -> bool:
    """True for a video file (by suffix) or a folder / S3 prefix of frames (a local folder, or ``s3://…/``)."""
    return uri.lower().endswith(VIDEO_SUFFIXES) or is_frame_folder(uri)


def is_frame_folder(uri: str) -> bool:
    """A local folder, or an ``s3://bucket/prefix/`` URI ending in ``/`` (a prefix, not an object)."""
    if is_s3_uri(uri):
        return uri.endswith("/") and bool(split_s3_uri(uri)[1])
    return Path(uri).expanduser().is_dir()


def is_frame_manifest(data: bytes) -> bool:
    return data.startswith(FRAME_MANIFEST_MAGIC)


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def read_frame_folder(uri: str, settings: Settings | None = None) -> bytes:
    """List the frames (image files, by suffix, in natural order) of a folder or S3 prefix.

    Returns:
        A manifest (JSON after ``FRAME_MANIFEST_MAGIC``): the folder's URI and each frame's URI and identity
        (sha256 of a local file, the ETag of an S3 object). Its hash is the input's identity.

    Raises:
        InvalidVideoError: no frames. VideoTooLargeError: more frames than ``SAM3D_VIDEO_MAX_SECONDS`` at
        ``SAM3D_VIDEO_FOLDER_FPS`` allow (refused before any frame is read).
        InputNotFoundError, StorageAccessError, TransientStorageError: listing failures.
    """
    s = settings or get_settings()
    frames: list[dict[str, str]] = []
    if is_s3_uri(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = split_s3_uri(uri)
        try:
            for page in s3_client(s).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                frames.extend({"uri": f"s3://{bucket}/{obj['Key']}", "id": str(obj.get("ETag", "")).strip('"')}
                              for obj in page.get("Contents", []) if obj["Key"].lower().endswith(FRAME_SUFFIXES)
                              and "/" not in obj["Key"][len(prefix):])
        except (BotoCoreError, ClientError) as exc:
            raise classify_s3_error(exc, f"listing {uri}") from exc
    else:
        folder = Path(uri).expanduser()
        for path in folder.iterdir():
            if path.is_file() and path.name.lower().endswith(FRAME_SUFFIXES) and not path.name.startswith("."):
                frames.append({"uri": str(path), "id": f"sha256:{_file_sha256(path)}"})
    frames.sort(key=lambda f: _natural_key(PurePosixPath(f["uri"]).name))
    if not frames:
        raise InvalidVideoError(f"{uri}: a folder of frames, but it holds no image files "
                                f"({', '.join(FRAME_SUFFIXES)})")
    seconds = len(frames) / s.video_folder_fps
    if seconds > s.video_max_seconds:
        raise VideoTooLargeError(
            f"{uri}: {len(frames):,} frames = {seconds:,.1f} s at {s.video_folder_fps:g} fps (SAM3D_VIDEO_FOLDER_FPS) "
            f"exceeds the limit of {s.video_max_seconds:g} s (SAM3D_VIDEO_MAX_SECONDS); refused before decoding")
    return FRAME_MANIFEST_MAGIC + json.dumps({"folder": uri, "frames": frames}, separators=(",", ":")).encode()


def read_clip(uri: str, settings: Settings | None = None) -> bytes:
    """A clip's bytes, or for a folder / S3 prefix of frames the manifest that names them (``read_frame_folder``);
    any other input's bytes as they are."""
    return read_frame_folder(uri, settings) if is_frame_folder(uri) else read_input(uri, settings)


def sampling(settings: Settings) -> dict[str, float]:
    """The ``SAMPLING_SETTINGS`` of ``settings`` (what a worker needs to keep the same frames)."""
    return {name: getattr(settings, name) for name in SAMPLING_SETTINGS}


def with_sampling(settings: Settings, values: dict[str, float]) -> Settings:
    """``settings`` with a submitter's ``sampling`` values.

    Raises:
        InputError: a name that is not one of ``SAMPLING_SETTINGS``.
    """
    unknown = sorted(set(values) - set(SAMPLING_SETTINGS))
    if unknown:
        raise InputError(f"video sampling: unknown setting(s) {', '.join(unknown)} (known: "
                         f"{', '.join(SAMPLING_SETTINGS)})")
    return settings.model_copy(update=values) if any(getattr(settings, k) != v for k, v in values.items()) else settings


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_stride(frame_count: int, width: int, height: int, settings: Settings) -> tuple[int, int]:
    """``(stride, most frames kept)`` for a clip of ``frame_count`` frames (0: unknown) of ``width`` x ``height``.

    The most kept is ``SAM3D_VIDEO_MAX_FRAMES``, fewer when that many frames would not fit the memory budget.
    """
    budget = max(1, FRAME_MEMORY_BUDGET_BYTES // max(1, width * height * 3))
    most = max(1, min(settings.video_max_frames, budget))
    stride = settings.video_stride
    if frame_count > 0:
        stride = max(stride, math.ceil(frame_count / most))
    return stride, most


def load_video(data: bytes, *, source: str, settings: Settings | None = None, keep_pixels: bool = True) -> LoadedVideo:
    """Decode and validate a clip (or the frames a folder manifest names), keeping a bounded sample.

    Args:
        data: the file's bytes, or a manifest from ``read_frame_folder``.
        source: path or URI, named in every error message.
        settings: the ``video_*`` limits.
        keep_pixels: False to check only: every frame is decoded and checked exactly as for a run (the same
            sample, the same refusals), but each sampled frame's pixels are dropped once checked; its ``rgb`` is
            then a read-only zero-stride placeholder of the same shape, so memory stays at about one frame.

    Returns:
        A ``LoadedVideo`` with at least one frame.

    Raises:
        InvalidVideoError: empty, truncated, zero frames, audio only, not a video, frames of more than one size,
            or anything the decoder raises (named with the frame it stopped at).
        VideoTooLargeError: longer than ``SAM3D_VIDEO_MAX_SECONDS`` or any frame (the header's or a decoded one)
            over ``SAM3D_VIDEO_MAX_PIXELS``.
    """
    s = settings or get_settings()
    if not data:
        raise InvalidVideoError(f"{source}: the file is empty (0 bytes)")
    if is_frame_manifest(data):
        return _load_frames(data, source, s, keep_pixels)
    return _decode_container(data, source, s, keep_pixels)


def _no_pixels(rgb: np.ndarray) -> np.ndarray:
    """A placeholder with ``rgb``'s shape that holds no pixels (a zero-stride view of one zero byte)."""
    return np.broadcast_to(np.zeros(1, np.uint8), rgb.shape)


def _decode_container(data: bytes, source: str, s: Settings, keep_pixels: bool = True) -> LoadedVideo:
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, EOFError, OSError, ValueError) as exc:
        raise InvalidVideoError(f"{source}: {_unopenable_reason(data, exc)}") from None
    with container:
        if not container.streams.video:
            audio = len(container.streams.audio)
            if audio:
                raise InvalidVideoError(f"{source}: audio only ({audio} audio stream(s), no video stream); "
                                        "nothing to segment")
            raise InvalidVideoError(f"{source}: the {container.format.name} container holds no frames "
                                    "(no video stream): a zero-frame video")
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if width <= 0 or height <= 0:
            raise InvalidVideoError(f"{source}: the video stream states no frame size ({width}x{height})")
        if width * height > s.video_max_pixels:
            raise VideoTooLargeError(
                f"{source}: frames of {width}x{height} = {width * height:,} pixels exceed the limit of "
                f"{s.video_max_pixels:,} (SAM3D_VIDEO_MAX_PIXELS); refused before decoding")
        declared_s = _declared_duration(container, stream)
        if declared_s is not None and declared_s > s.video_max_seconds:
            raise VideoTooLargeError(
                f"{source}: {declared_s:,.1f} s exceeds the limit of {s.video_max_seconds:g} s "
                "(SAM3D_VIDEO_MAX_SECONDS); refused before decoding (trim the clip or raise the limit)")
        fps = float(stream.average_rate or stream.guessed_rate or 0.0) or 30.0
        declared_frames = int(stream.frames or 0) or (round(declared_s * fps) if declared_s else 0)
        stride, most = sample_stride(declared_frames, width, height, s)
        stream.thread_type = "AUTO"
        # The header states only the first SPS's size: a stream may switch to larger frames later. Every decoded
        # frame's size is checked below before it is converted or kept, and the decoder itself refuses to allocate
        # a frame far over the limit (FFmpeg's max_pixels counts the width padded to 64: hence the headroom).
        stream.codec_context.options = {**stream.codec_context.options,
                                        "max_pixels": str(min(2 * s.video_max_pixels, (1 << 31) - 1))}
        kept: list[VideoFrame] = []
        read = 0
        last_time = 0.0
        rotations: set[int] = set()
        size: tuple[int, int] | None = None  # the first decoded frame's: every frame must have it
        shape: tuple[int, ...] | None = None  # the first kept frame's RGB shape (rotation applied)
        try:
            for frame in container.decode(stream):
                frame_size = (int(frame.width), int(frame.height))
                _check_frame_size(source, read, frame_size, size, (width, height), s)
                if size is None:  # the budget follows the frames decoded, not the header
                    size = frame_size
                    stride, most = sample_stride(declared_frames, *size, s)
                time_s = float(frame.time) if frame.time is not None else read / fps
                if time_s > s.video_max_seconds:
                    raise VideoTooLargeError(
                        f"{source}: longer than the limit of {s.video_max_seconds:g} s (SAM3D_VIDEO_MAX_SECONDS; "
                        "the container states no duration, so this was found while decoding)")
                if read % stride == 0:
                    if len(kept) >= most:  # the header under-stated the frame count: thin the sample
                        kept, stride = kept[::2], stride * 2
                    if read % stride == 0:
                        rgb, rotation = _frame_rgb(frame)
                        if shape is None:
                            shape = rgb.shape
                        elif rgb.shape != shape:
                            raise InvalidVideoError(
                                f"{source}: frame {read} is {rgb.shape[1]}x{rgb.shape[0]} after its rotation "
                                f"metadata ({rotation}°), the first frame {shape[1]}x{shape[0]}; every frame needs "
                                "one size")
                        rotations.add(rotation)
                        kept.append(VideoFrame(read, time_s, rgb if keep_pixels else _no_pixels(rgb)))
                read += 1
                last_time = time_s
        except (av.FFmpegError, EOFError) as exc:
            # A frame the decoder refused to allocate (over max_pixels): the codec context holds its stated size.
            context = stream.codec_context
            stated = (int(context.width or 0), int(context.height or 0))
            if min(stated) > 0 and stated != (size or (width, height)):
                _check_frame_size(source, read, stated, size, (width, height), s)
            raise InvalidVideoError(f"{source}: the video data is truncated or corrupt after frame {read} "
                                    f"({last_time:.2f} s): {_plain(exc)}") from None
        except RuntimeError as exc:  # anything else the decoder or the pixel conversion raises
            raise InvalidVideoError(f"{source}: the video could not be decoded at frame {read} ({last_time:.2f} s): "
                                    f"{_plain(exc)}") from None
        if read == 0:
            raise InvalidVideoError(f"{source}: the video stream has no frames (a zero-frame video)")
        duration_s = declared_s if declared_s else last_time + 1.0 / fps
        # A file cut short keeps its header: the decoder stops early without an error.
        if declared_s and declared_s > 1.0 and last_time + 2.0 / fps < 0.9 * declared_s:
            raise InvalidVideoError(
                f"{source}: truncated: the frames end at {last_time:.2f} s of the {declared_s:.2f} s the header "
                f"states ({read} frames decoded)")
        width, height = size or (width, height)
        notes = [f"{source}: video {container.format.name.split(',')[0]} {stream.codec_context.name} "
                 f"{width}x{height} {fps:g} fps, {read} frames ({duration_s:.2f} s); kept every {stride} "
                 f"frame(s): {len(kept)} sampled"]
        if rotations - {0}:
            notes.append(f"{source}: rotation metadata ({', '.join(f'{r}°' for r in sorted(rotations))}) applied")
        return LoadedVideo(frames=kept, source=source, sha256=hashlib.sha256(data).hexdigest(),
                           format=container.format.name.split(",")[0], codec=stream.codec_context.name, fps=fps,
                           frames_read=read, duration_s=duration_s, stride=stride, notes=notes)


def _check_frame_size(source: str, index: int, frame_size: tuple[int, int], first: tuple[int, int] | None,
                      header: tuple[int, int], s: Settings) -> None:
    """Refuse frame ``index`` when it is over ``SAM3D_VIDEO_MAX_PIXELS`` or not the first frame's size.

    Checked on every decoded frame, before it is converted to RGB or kept, so the sample's memory follows the
    frames actually in the file rather than the size its header states.
    """
    w, h = frame_size
    if w * h > s.video_max_pixels:
        stated = f"; the header states {header[0]}x{header[1]}" if header != frame_size else ""
        raise VideoTooLargeError(
            f"{source}: frame {index} is {w}x{h} = {w * h:,} pixels, over the limit of {s.video_max_pixels:,} "
            f"(SAM3D_VIDEO_MAX_PIXELS{stated}); refused while decoding")
    if first is not None and frame_size != first:
        raise InvalidVideoError(
            f"{source}: frame {index} is {w}x{h}, the first frame is {first[0]}x{first[1]}: the stream changes "
            "frame size mid-clip; every frame needs one size (refused while decoding)")


def _declared_duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000
    return None


def _frame_rgb(frame: Any) -> tuple[np.ndarray, int]:
    """``(H, W, 3)`` uint8 RGB with the stream's display rotation applied, and that rotation in degrees."""
    rgb = frame.to_ndarray(format="rgb24")
    rotation = int(round(getattr(frame, "rotation", 0) or 0)) % 360
    if rotation in (90, 180, 270):  # counter-clockwise degrees, as the display matrix states them
        rgb = np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))
    return rgb, rotation


def _load_frames(data: bytes, source: str, s: Settings, keep_pixels: bool = True) -> LoadedVideo:
    manifest = json.loads(data[len(FRAME_MANIFEST_MAGIC):])
    frames = manifest["frames"]
    first = _read_frame(frames[0], s)
    stride, most = sample_stride(len(frames), first.width, first.height, s)
    kept = []
    for index in range(0, len(frames), stride):
        image = first if index == 0 else _read_frame(frames[index], s)
        if (image.width, image.height) != (first.width, first.height):
            raise InvalidVideoError(f"{source}: frame {frames[index]['uri']} is {image.width}x{image.height}, the "
                                    f"first frame is {first.width}x{first.height}; every frame needs one size")
        kept.append(VideoFrame(index, index / s.video_folder_fps, image.rgb if keep_pixels else _no_pixels(image.rgb)))
        if len(kept) >= most:
            break
    notes = [f"{source}: folder of {len(frames)} {first.format} frames at an assumed {s.video_folder_fps:g} fps; kept "
             f"every {stride} frame(s): {len(kept)} sampled"]
    return LoadedVideo(frames=kept, source=source, sha256=hashlib.sha256(data).hexdigest(), format="frames",
                       codec=first.format.lower(), fps=s.video_folder_fps, frames_read=len(frames),
                       duration_s=len(frames) / s.video_folder_fps, stride=stride, notes=notes)


def _read_frame(entry: dict[str, str], s: Settings) -> LoadedImage:
    uri = entry["uri"]
    try:
        data = read_input(uri, s)
        image = load_image(data, source=uri, max_pixels=s.video_max_pixels)
    except InvalidImageError as exc:
        raise InvalidVideoError(f"frame {exc}") from None
    if entry["id"].startswith("sha256:") and entry["id"] != f"sha256:{image.sha256}":
        raise InputError(f"{uri}: the frame changed while the run read the folder; run it again")
    return image


def _unopenable_reason(data: bytes, exc: BaseException) -> str:
    """Why FFmpeg cannot open the file, in words: truncated, unfinished, or not a video at all."""
    if len(data) >= 8 and data[4:8] in _MP4_BRANDS:
        offset, boxes = 0, []
        while offset + 8 <= len(data):
            size, kind = struct.unpack(">I4s", data[offset:offset + 8])
            if size == 1 and offset + 16 <= len(data):
                size = struct.unpack(">Q", data[offset + 8:offset + 16])[0]
            elif size == 0:
                size = len(data) - offset
            name = kind.decode("latin-1")
            if size < 8:
                return f"the MP4/MOV box structure is corrupt at byte {offset:,} ({_plain(exc)})"
            if offset + size > len(data):
                return (f"truncated: the file ends inside its '{name}' box ({len(data) - offset:,} of {size:,} "
                        f"bytes present, file {len(data):,} bytes)")
            boxes.append(name)
            offset += size
        if "moov" not in boxes:
            return "an MP4/MOV without its 'moov' index (an unfinished recording, or a zero-frame video)"
        return f"the MP4/MOV data is corrupt ({_plain(exc)})"
    if data.startswith(_EBML_MAGIC):
        return f"the WebM/Matroska data ends before its first frame (truncated, or a zero-frame video): {_plain(exc)}"
    return (f"not a recognised video format ({len(data):,} bytes; this pipeline reads "
            f"{', '.join(s.lstrip('.').upper() for s in VIDEO_SUFFIXES)} and folders of frames)")


def _plain(exc: BaseException) -> str:
    text = re.sub(r":\s*'<none>'", "", str(exc))
    return re.sub(r"\[Errno -?\d+\]\s*", "", text).strip() or type(exc).__name__


__all__ = ["FRAME_SUFFIXES", "VIDEO_SUFFIXES", "LoadedVideo", "PipelineError", "VideoFrame", "is_frame_folder",
           "is_video_uri", "load_video", "read_frame_folder"]
