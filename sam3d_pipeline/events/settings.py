"""Settings of the event path (env prefix ``SAM3D_``), kept beside the parser they configure."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from sam3d_pipeline.events.parse import EventFilter
from sam3d_pipeline.storage import is_s3_uri, split_s3_uri

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
    bridge_keep_s: float = Field(
        15.0, ge=0, description="How often the run keeper checks that accepted uploads have one run, posting lost "
        "events again and scheduling crashed runs again (seconds; 0 = off)."
    )
    bridge_repost_after_s: float = Field(
        60.0, gt=0, description="An accepted upload with no flow run this long after its event was posted has its "
        "event posted again (the same id: a server that still has the first copy drops it) (seconds)."
    )
    bridge_run_attempts: int = Field(
        3, ge=1, le=10, description="Most runs of an upload's flow run: a run that crashed is scheduled again until "
        "then (and a lost event posted again as often)."
    )
    bridge_pending_timeout_s: float = Field(
        300.0, gt=0, description="A flow run Pending this long counts as lost (its worker died while starting it) "
        "and is scheduled again (seconds)."
    )
    bridge_keep_window_s: float = Field(
        3600.0, gt=0, description="How long the run keeper follows an accepted upload (seconds)."
    )
    bridge_deployment: str = Field(
        "image-to-3d/image-to-3d", description="flow/deployment whose event trigger turns uploads into runs."
    )

    def event_filter(self) -> EventFilter:
        """The filter these settings describe; the output root and the marker root are always ignored."""
        ignored = []
        for root in (self.output_root, self.event_marker_root):
            if root and is_s3_uri(root):
                bucket, prefix = split_s3_uri(root)
                ignored.append((bucket, prefix.rstrip("/") + "/" if prefix else ""))
        return EventFilter(prefix=self.upload_prefix, suffixes=tuple(self.upload_suffixes), ignored=tuple(ignored))
