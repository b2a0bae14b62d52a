"""What the SAM 3 segmenter is (name, version, weights, device, limits), known without importing torch or sam3.

The orchestrating flow names a run's output prefix from these facts before any model exists, and it may
run where torch is not installed at all (the CPU pool): nothing here imports a heavy package.
"""

from __future__ import annotations

import hashlib
import sys

from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import BackendInfo

VERSION = "sam3-0.1.4"
LIMITS_CPU = ("running on the CPU: about a minute per image; use a CUDA GPU for real work",)
LIMITS_RANDOM = ("random weights: masks and scores are meaningless (tests and smoke checks only)",)


def version(settings: Settings) -> str:
    """``sam3-0.1.4+<weights>``: outputs from other weights get other output keys (never reused).

    The weights part is the declared ``SAM3D_SAM3_CHECKPOINT_SHA256``'s first 12 hex digits (what a deployment
    sets on every pool, so an orchestrator without the checkpoint names the prefix the workers will fill), or a
    hash of the configured checkpoint location, or ``random-init``.
    """
    if settings.sam3_checkpoint_sha256:
        return f"{VERSION}+{settings.sam3_checkpoint_sha256.lower()[:12]}"
    if settings.sam3_checkpoint:
        return f"{VERSION}+src-{hashlib.sha256(settings.sam3_checkpoint.encode()).hexdigest()[:8]}"
    return f"{VERSION}+random-init"


def planned_device(settings: Settings) -> str:
    """``SAM3D_SAM3_DEVICE``; for ``auto``, what torch says when it is already imported, else ``auto``.

    ``auto`` is decided where the model runs; the stage reports the device it used.
    """
    device = settings.sam3_device
    torch = sys.modules.get("torch")
    if device == "auto" and torch is not None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def describe(settings: Settings, device: str | None = None, *, checkpoint_sha256: str | None = None,
             dtype: str | None = None) -> BackendInfo:
    """The segmenter's ``BackendInfo``: as planned from the settings, or (with ``device``, ``checkpoint_sha256``
    and ``dtype``) as the process that loaded the model reports it."""
    declared = bool(settings.sam3_checkpoint or settings.sam3_checkpoint_sha256)
    weights = "checkpoint" if declared or checkpoint_sha256 else "random-init"
    device = device or planned_device(settings)
    limits: tuple[str, ...] = ()
    if weights == "random-init":
        limits += LIMITS_RANDOM
    if device == "cpu":
        limits += LIMITS_CPU
    return BackendInfo(name="sam3", version=version(settings), device=device, limits=limits, weights=weights,
                       checkpoint_sha256=checkpoint_sha256[:12] if checkpoint_sha256 else None, dtype=dtype)
