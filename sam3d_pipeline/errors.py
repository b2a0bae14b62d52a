"""Error classes: every failure is either permanent (fail fast) or transient (retry with backoff)."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class. Permanent unless the subclass says otherwise.

    Attributes:
        transient: True when retrying the same call may succeed.
        code: short machine-readable reason, recorded in ``result.json``.
    """

    transient: bool = False
    code: str = "pipeline_error"


class InputError(PipelineError):
    """The input (image, prompt, options) cannot be processed as given."""

    code = "invalid_input"


class InvalidImageError(InputError):
    """The file is empty, truncated, or not an image."""

    code = "invalid_image"


class ImageTooLargeError(InputError):
    """The image exceeds the configured pixel or byte limit."""

    code = "image_too_large"


class InvalidVideoError(InputError):
    """The file is a truncated, empty or audio-only video, or a folder without frames."""

    code = "invalid_video"


class VideoTooLargeError(InputError):
    """The clip is longer than ``SAM3D_VIDEO_MAX_SECONDS`` or its frames exceed ``SAM3D_VIDEO_MAX_PIXELS``."""

    code = "video_too_large"


class InputNotFoundError(InputError):
    """The input object or file does not exist."""

    code = "input_not_found"


class StorageAccessError(PipelineError):
    """Storage refused the request for a reason retrying will not fix (403, missing bucket, ...)."""

    code = "storage_access"


class BackendUnavailableError(PipelineError):
    """A backend was requested that cannot run here (package or checkpoint missing)."""

    code = "backend_unavailable"


class ReviewTimeoutError(PipelineError):
    """Nobody reviewed the mask in time and the timeout policy did not approve it."""

    code = "review_timeout"


class TransientError(PipelineError):
    """A failure that may go away on retry (S3 5xx/throttling, connection reset, timeout)."""

    transient = True
    code = "transient"


class TransientStorageError(TransientError):
    """Storage answered 5xx/throttling or the connection failed."""

    code = "storage_transient"


def is_transient(exc: BaseException) -> bool:
    """Return True when ``exc`` is worth retrying."""
    return isinstance(exc, PipelineError) and exc.transient


def error_record(exc: BaseException) -> dict[str, str]:
    """``{"type", "code", "message"}``: how ``result.json``, the catalog and GPU stage results record a failure."""
    return {"type": type(exc).__name__, "code": getattr(exc, "code", "error"), "message": str(exc)}


def error_from_record(record: dict[str, str]) -> PipelineError:
    """The error an ``error_record`` describes (its class when it is one of ours, else ``PipelineError``)."""
    cls = globals().get(record.get("type", ""))
    if not (isinstance(cls, type) and issubclass(cls, PipelineError)):
        cls = PipelineError
    return cls(record.get("message", "unknown failure"))
