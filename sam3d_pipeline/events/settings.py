"""Settings of the event path (env prefix ``SAM3D_``), kept beside the parser they configure."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..storage import is_s3_uri, split_s3_uri
from .parse import EventFilter

DEFAULT_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".mp4", ".mov", ".m4v", ".webm")


class EventSettings(BaseSettings):
    """Which uploads start a run, how prompts are chosen, and how the SQS bridge polls."""

    model_config = SettingsConfigDict(env_prefix="SAM3D_", extra="ignore")

    output_root: str = Field(
        "outputs", description="Same as the pipeline's SAM3D_OUTPUT_ROOT: uploads under it never start a run."
    )
    upload_prefix: str = Field("", description="Only keys under this prefix start a run ('' = every key).")
    upload_suffixes: tuple[str, ...] = Field(
        DEFAULT_SUFFIXES, description="Only keys ending in one of these (case-insensitive) start a run."
    )
    prompt_by_prefix: dict[str, str] = Field(
        default_factory=dict,
        description="Key prefix → prompt (JSON), used when the object has no 'prompt' metadata; longest wins.",
    )
    event_marker_root: str | None = Field(
        None,
        description="s3://bucket/prefix where the bridge records each event it handed to Prefect, so the same"
        " upload (bucket, key, ETag, prompt) never starts a second run; None keeps no markers.",
    )
    bridge_wait_s: int = Field(20, ge=0, le=20, description="SQS long-poll wait per receive call (seconds).")
    bridge_batch: int = Field(10, ge=1, le=10, description="SQS messages per receive call.")
    bridge_backoff_max_s: float = Field(
        30.0, gt=0, description="Longest pause between attempts after SQS or Prefect errors (seconds)."
    )
    bridge_http_timeout_s: float = Field(10.0, gt=0, description="Timeout of each POST to the Prefect API (s).")

    def event_filter(self) -> EventFilter:
        """The filter these settings describe; the output root and the marker root are always ignored."""
        ignored = []
        for root in (self.output_root, self.event_marker_root):
            if root and is_s3_uri(root):
                bucket, prefix = split_s3_uri(root)
                ignored.append((bucket, prefix.rstrip("/") + "/" if prefix else ""))
        return EventFilter(prefix=self.upload_prefix, suffixes=tuple(self.upload_suffixes), ignored=tuple(ignored))
