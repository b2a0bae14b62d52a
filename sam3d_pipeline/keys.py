"""Deterministic output keys: ``<image stem>-<hash>`` where the hash covers everything that changes the result."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import PurePosixPath
from typing import Any

# Written besides the photo outputs when the input is a video: the chosen frame, and the mask over the sampled frames.
VIDEO_OUTPUT_FILES = ("frame.png", "track.webp")
KEY_VERSION = 1
_UNSAFE = re.compile(r"[^\w.-]+")  # keeps unicode letters and digits


STEM_MAX_BYTES = 64  # UTF-8 bytes: a folder name holds 255 bytes, and the stem shares it with the hash


def image_stem(uri: str) -> str:
    """A filesystem- and S3-safe stem of the input's file name (``photos/Red Chair.jpg`` → ``Red-Chair``), at most
    ``STEM_MAX_BYTES`` UTF-8 bytes (cut between characters, never inside one)."""
    name = PurePosixPath(uri.replace("\\", "/").rstrip("/")).name or "image"
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    stem = _UNSAFE.sub("-", stem).strip("-.")
    stem = stem.encode("utf-8", "surrogatepass")[:STEM_MAX_BYTES].decode("utf-8", "ignore").strip("-.")
    return stem or "image"


def run_hash(
    *,
    content_id: str,
    prompt: str,
    options: dict[str, Any],
    backends: dict[str, str],
) -> str:
    """12 hex digits over the input's content identity, prompt, selection options and backend versions.

    Args:
        content_id: e.g. ``sha256:<hex>`` of the input bytes (or an S3 ETag).
        prompt: the text prompt exactly as given (after stripping surrounding whitespace).
        options: selection options (boxes, points, instance index, thresholds); JSON-serialisable.
        backends: role → ``name@version`` of the backends that will run (``auto`` already resolved).
    """
    payload = {
        "v": KEY_VERSION,
        "content": content_id,
        "prompt": prompt.strip(),
        "options": options,
        "backends": backends,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def content_id(data: bytes) -> str:
    """An input's identity in output keys: ``sha256:<hex>`` of its bytes (of the manifest, for a folder of frames)."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def output_prefix_name(uri: str, **hash_inputs: Any) -> str:
    """``<stem>-<hash>``: the folder under the output root that holds one run's files."""
    return f"{image_stem(uri)}-{run_hash(**hash_inputs)}"


# ---------------------------------------------------------------------------------------------------------------
# Every storage key under a run's prefix (and the few at the output root), in one place.

RESULT_FILE = "result.json"
FRAME_FILE, TRACK_FILE = VIDEO_OUTPUT_FILES
CATALOG_FILE = "catalog.json"
GALLERY_FILE = "index.html"
EMBEDDINGS_NAME = "embeddings.bin"
DECODER_NAME = "click-decoder.onnx"
REVIEW_DIR = "review"
OBJECTS_DIR = "objects"
SCENE_FILE = "scene.glb"
SEGMENT_STAGE_DIR = "stages/segment"
TRACK_STAGE_DIR = "stages/track"
RECONSTRUCT_STAGE_DIR = "stages/reconstruct"
DECODERS_DIR = "_decoders"
WORKERS_DIR = "_workers"
UPLOADS_DIR = "_uploads"
# Masks the review page uploads, relative to the run's prefix (the pause form validates this pattern).
REVIEW_UPLOAD_PATTERN = r"^review/[A-Za-z0-9._-]{1,100}\.png$"
CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".webp": "image/webp",
    ".mp4": "video/mp4",
    ".m4v": "video/x-m4v",
    ".mov": "video/quicktime",
    ".webm": "video/webm",
    ".glb": "model/gltf-binary",
    ".usdz": "model/vnd.usdz+zip",
    ".obj": "model/obj",
    ".mtl": "model/mtl",
    ".ply": "application/octet-stream",
    ".json": "application/json",
    ".bin": "application/octet-stream",
    ".onnx": "application/octet-stream",
    ".html": "text/html; charset=utf-8",
}


def content_type(key: str) -> str | None:
    """The Content-Type written with ``key`` (by its suffix), or None when unknown."""
    return CONTENT_TYPES.get(PurePosixPath(key).suffix.lower())


class RunKeys:
    """The keys of one run's files, relative to the output root.

    Layout under ``<prefix>/``::

        result.json, mask.png, overlay.png, object.glb, object.ply, preview.png    published outputs
        scene.glb                                                                   every object, placed
        objects/<i>/{mask.png, object.glb, object.usdz, object.obj, object.mtl, texture.png, object.ply}
                                                                                    one asset per object
        stages/segment/segmentation.json, stages/segment/mask-<i>.png               segment stage (GPU side)
        stages/track/track.json, stages/track/masks.npz                             a video's track (GPU side)
        stages/track/frame-<n>.png, stages/track/mask-<n>.png                       a frame sent to reconstruct
        stages/reconstruct/{input-mask.png, input-image.png, object.glb, object.ply, reconstruction.json}
                                                                                    reconstruct stage
        review/image.jpg, review/overlay-r<n>.png, review/r<n>-<name>              review rounds
        review/embeddings.bin, review/final-<id>.png                               review page files
        review/frame-<n>.png                                                        a video's best frames
    """

    def __init__(self, prefix: str):
        if not prefix or prefix.startswith("/") or ".." in prefix.split("/"):
            raise ValueError(f"bad run prefix {prefix!r}")
        self.prefix = prefix.rstrip("/")

    def __repr__(self) -> str:
        return f"RunKeys({self.prefix!r})"

    def file(self, name: str) -> str:
        """A published output (``mask.png``, ``object.glb``, ...) or any key relative to the prefix."""
        return f"{self.prefix}/{name}"

    @property
    def result(self) -> str:
        return self.file(RESULT_FILE)

    # video input
    @property
    def frame(self) -> str:
        """The frame of a video the object was reconstructed from (``frame.png``)."""
        return self.file(FRAME_FILE)

    @property
    def track(self) -> str:
        """The tracked mask over the video's sampled frames (``track.webp``, animated)."""
        return self.file(TRACK_FILE)

    # segment stage
    @property
    def segment_dir(self) -> str:
        return self.file(SEGMENT_STAGE_DIR)

    @property
    def segmentation(self) -> str:
        return f"{self.segment_dir}/segmentation.json"

    def stage_mask(self, index: int) -> str:
        return f"{self.segment_dir}/mask-{index}.png"

    # a video's track (the segment stage of a clip)
    @property
    def track_dir(self) -> str:
        return self.file(TRACK_STAGE_DIR)

    @property
    def track_summary(self) -> str:
        """Frame indices, scores, backend and messages of the track (written last)."""
        return f"{self.track_dir}/track.json"

    @property
    def track_masks(self) -> str:
        """Every sampled frame's mask, bit-packed in one compressed NumPy archive."""
        return f"{self.track_dir}/masks.npz"

    def track_frame(self, index: int) -> str:
        """Source frame ``index`` as a PNG (the photo a reconstruct job reads)."""
        return f"{self.track_dir}/frame-{int(index)}.png"

    def track_mask(self, index: int) -> str:
        return f"{self.track_dir}/mask-{int(index)}.png"

    # reconstruct stage
    @property
    def reconstruct_dir(self) -> str:
        return self.file(RECONSTRUCT_STAGE_DIR)

    @property
    def reconstruct_input_image(self) -> str:
        """The photo sent to the GPU workers to reconstruct when the run's input is not one (a video's frame)."""
        return f"{self.reconstruct_dir}/input-image.png"

    @property
    def reconstruct_input_mask(self) -> str:
        """The mask sent to the GPU workers to reconstruct (the selected or the reviewer's edited one)."""
        return f"{self.reconstruct_dir}/input-mask.png"

    def object_reconstruct_dir(self, index: int) -> str:
        """Where the reconstruct stage writes instance ``index`` when a run reconstructs several objects."""
        return f"{self.reconstruct_dir}/{OBJECTS_DIR}/{int(index)}"

    def object_reconstruct_input_mask(self, index: int) -> str:
        return f"{self.object_reconstruct_dir(index)}/input-mask.png"

    # review
    def review(self, name: str) -> str:
        return self.file(f"{REVIEW_DIR}/{name}")

    @property
    def review_image(self) -> str:
        return self.review("image.jpg")

    def review_overlay(self, round_number: int) -> str:
        return self.review(f"overlay-r{round_number}.png")

    def review_round(self, round_number: int, name: str) -> str:
        return self.review(f"r{round_number}-{name}")

    def review_frame(self, index: int) -> str:
        """A video's tracked frame ``index`` (its index in the source) with its mask, small: one of the frames the
        reviewer may pick to reconstruct from."""
        return self.review(f"frame-{int(index)}.png")

    @property
    def embeddings(self) -> str:
        return self.review(EMBEDDINGS_NAME)

    @staticmethod
    def review_upload_name(token: str) -> str:
        """Name (relative to the prefix) of a mask the review page uploads."""
        return f"{REVIEW_DIR}/final-{token}.png"


def object_file(index: int, name: str) -> str:
    """A published file of one object, relative to the run's prefix: ``objects/<index>/<name>``."""
    return f"{OBJECTS_DIR}/{int(index)}/{name}"


def reconstruction_json(output: str) -> str:
    """The ``reconstruction.json`` written last under a reconstruct job's ``output`` key prefix."""
    return f"{output}/reconstruction.json"


def decoder_key(segmenter_version: str, weights: str = "uint8") -> str:
    """Where the click decoder of one model version lives (immutable: a new checkpoint has a new version)."""
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", segmenter_version)
    if weights not in ("uint8", "float32"):
        raise ValueError(f"decoder weights {weights!r}: choose uint8 or float32")
    name = DECODER_NAME if weights == "uint8" else DECODER_NAME.replace(".onnx", f"-{weights}.onnx")
    return f"{DECODERS_DIR}/{safe}/{name}"


def upload_key(sha256_hex: str, filename: str, extension: str) -> str:
    """Where the job API keeps an upload (photo or clip) under the output root: ``_uploads/<sha256>/<stem><ext>``.

    Content-addressed, so a re-sent upload lands on the same key; under the output root, which no S3 trigger acts
    on, so an upload starts exactly the one run the job API creates. The stem keeps the file's name in the run's
    output prefix.
    """
    if not re.fullmatch(r"[0-9a-f]{64}", sha256_hex):
        raise ValueError(f"not a sha256 hex digest: {sha256_hex!r}")
    return f"{UPLOADS_DIR}/{sha256_hex}/{image_stem(filename)}{extension}"


def worker_key(session_id: str, name: str) -> str:
    """Files a GPU worker session keeps at the output root (leases of the tasks it runs)."""
    return f"{WORKERS_DIR}/{session_id}/{name}"
