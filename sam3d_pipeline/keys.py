"""Deterministic output keys: ``<image stem>-<hash>`` where the hash covers everything that changes the result."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import PurePosixPath
from typing import Any

OUTPUT_FILES = ("mask.png", "overlay.png", "object.glb", "object.ply", "preview.png", "result.json")
KEY_VERSION = 1
_UNSAFE = re.compile(r"[^\w.-]+")  # keeps unicode letters and digits


def image_stem(uri: str) -> str:
    """A filesystem- and S3-safe stem of the input's file name (``photos/Red Chair.jpg`` → ``Red-Chair``)."""
    name = PurePosixPath(uri.replace("\\", "/").rstrip("/")).name or "image"
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    stem = _UNSAFE.sub("-", stem).strip("-.")
    return (stem or "image")[:64]


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


def output_prefix_name(uri: str, **hash_inputs: Any) -> str:
    """``<stem>-<hash>``: the folder under the output root that holds one run's files."""
    return f"{image_stem(uri)}-{run_hash(**hash_inputs)}"
