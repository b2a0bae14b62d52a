"""The job API's decisions, without Prefect: what a submission may hold, its fingerprint (behind
``Idempotency-Key``), the labels a job keeps on its flow run, its status from the run's state and
``result.json``, and the job JSON the API answers and the webhooks send.

A job is a flow run of the ``image-to-3d`` deployment (the job id is the flow run id). :class:`RunView` is the
little of a Prefect flow run these functions read; ``prefect_jobs`` makes one from a real run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sam3d_pipeline import jsonsafe
from sam3d_pipeline.run.pipeline import RunOptions
from sam3d_pipeline.types import BoxList, PointList
from sam3d_pipeline.video import is_video_uri
from sam3d_pipeline.web.webhook_targets import InvalidTarget, TargetPolicy, TargetRefused, TargetUnresolved, parse_url

Status = Literal["queued", "running", "awaiting_review", "completed", "no_object", "rejected", "failed", "cancelled"]
STATUSES: tuple[str, ...] = ("queued", "running", "awaiting_review", "completed", "no_object", "rejected", "failed",
                             "cancelled")
FINAL_STATUSES = frozenset({"completed", "no_object", "rejected", "failed", "cancelled"})
# Prefect state types a run ends in; the webhook fires on each of them (Crashed and Cancelled included).
FINAL_STATE_TYPES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
RESULT_STATUSES = frozenset({"completed", "no_object", "rejected"})

# Which Prefect state types each status can come from (the list endpoint filters on the server with these).
STATE_TYPES_OF_STATUS: dict[str, tuple[str, ...]] = {
    "queued": ("SCHEDULED", "PENDING"),
    "running": ("RUNNING", "CANCELLING"),
    "awaiting_review": ("PAUSED",),
    "completed": ("COMPLETED",),
    "no_object": ("COMPLETED",),
    "rejected": ("COMPLETED",),
    "failed": ("FAILED", "CRASHED", "COMPLETED"),  # completed without a readable result.json
    "cancelled": ("CANCELLED",),
}

JOB_TAG = "sam3d-job"  # runs the job API created
WEBHOOK_PENDING_TAG = "sam3d-webhook-pending"  # removed once the webhook was delivered or given up
LABEL_FINGERPRINT = "sam3d.request_fingerprint"
LABEL_REQUEST_ID = "sam3d.request_id"  # new for every create call: tells a new run from an idempotent replay
LABEL_OUTPUT_PREFIX = "sam3d.output_prefix"
LABEL_WEBHOOK_URL = "sam3d.webhook_url"
LABEL_SEGMENTER = "sam3d.segmenter"
LABEL_RECONSTRUCTOR = "sam3d.reconstructor"
LABEL_INPUT = "sam3d.input."  # + a fact of the checked input: kind (photo, video), width, height, a clip's length...
INPUT_FACTS = ("kind", "container", "format", "codec", "width", "height", "fps", "duration_s", "frames_read",
               "frames_sampled", "stride")

IDEMPOTENCY_KEY_MAX_CHARS = 200
WEBHOOK_URL_MAX_CHARS = 2000
# Files the segmenter made; every other output but result.json is the reconstructor's.
_SEGMENTER_FILES = ("mask.png", "overlay.png", "frame.png", "track.webp")
_EXAMPLES = {"boxes": "[[10, 20, 200, 180]]", "points": '[{"x": 40, "y": 30, "label": 1}]'}


class JobRequestError(ValueError):
    """A submission that cannot become a job; ``str()`` says which field and why (the API answers 422)."""


class JobRequest(BaseModel):
    """What ``POST /v1/jobs`` accepts besides the image (multipart form fields, or the JSON body)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What to segment, e.g. 'red chair' (required).")
    boxes: BoxList = Field(default_factory=list, description="Box prompts, xyxy in image pixels (at most 16).")
    points: PointList = Field(default_factory=list, description="Clicks in image pixels: {x, y, label} "
                                "(label 1 = object, 0 = background).")
    review: Literal["none", "auto", "required"] = Field(
        "none", description="none; required (always wait for a person); auto (wait when the best score is low).")
    webhook_url: str | None = Field(
        None, max_length=WEBHOOK_URL_MAX_CHARS, description="http(s) URL that gets the job JSON, signed, when the "
        "job ends (any final status).")
    video_frames: int = Field(  # bounded by the flow's own RunOptions (options())
        1, description="A video only: reconstruct from the best tracked frame (1), or try the K best (at most "
        f"{next(m.le for m in RunOptions.model_fields['video_frames'].metadata if hasattr(m, 'le'))}) and keep the "
        "one the reconstructor scores highest.")

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        """Syntax only (no network): ``http(s)://``, a host, no control characters, spaces, backslashes or
        credentials, a valid port and IPv6 literal. Where it goes is :func:`check_webhook_target`'s."""
        if value is None or not value.strip():
            return None
        value = value.strip()
        parse_url(value)  # InvalidTarget is a ValueError: "webhook_url: <why>"
        return value

    def options(self) -> RunOptions:
        """The run's options, checked by the flow's own model (prompt length and blankness, finite coordinates)."""
        return RunOptions(prompt=self.prompt, boxes=self.boxes, points=self.points, video_frames=self.video_frames)


def parse_request(fields: dict[str, Any], targets: TargetPolicy | None = None) -> tuple[JobRequest, RunOptions]:
    """Validate a submission's fields; ``boxes`` and ``points`` may come as JSON text (multipart form fields).

    Args:
        fields: the form fields or JSON body.
        targets: where webhooks may go; default: the settings' (``SAM3D_WEBHOOK_ALLOW_*``). A ``webhook_url``
            is checked against it (its host resolved) by :func:`check_webhook_target`.

    Raises:
        JobRequestError: naming the field and the reason, e.g. ``prompt: required``.
    """
    values = {k: v for k, v in fields.items() if v is not None and not (isinstance(v, str) and k != "prompt"
                                                                          and not v.strip())}
    for name in ("boxes", "points"):
        if isinstance(values.get(name), str):
            try:
                values[name] = jsonsafe.loads(values[name])
            except jsonsafe.JSONLimitError as exc:
                raise JobRequestError(f"{name}: {exc}") from None
            except ValueError:
                raise JobRequestError(f"{name}: not valid JSON (send e.g. {_EXAMPLES[name]})") from None
    if "prompt" not in values:
        raise JobRequestError("prompt: required (what to segment, e.g. 'red chair')")
    try:
        request = JobRequest.model_validate(values)
        options = request.options()
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "request"
        raise JobRequestError(f"{where}: {error['msg'].removeprefix('Value error, ')}") from None
    if request.webhook_url:
        check_webhook_target(request.webhook_url, targets)
    return request, options


def check_webhook_target(url: str, targets: TargetPolicy | None = None, timeout_s: float = 5.0) -> None:
    """Refuse a webhook URL whose host is, or resolves to, an address webhooks may not reach (``webhook_targets``:
    public addresses unless allow-listed; never the server's own services). Delivery checks again, on every
    attempt, against the address it connects to.

    Raises:
        JobRequestError: ``webhook_url: <why>`` (not a valid URL, a refused address, a name that does not resolve).
    """
    if targets is None:
        from sam3d_pipeline.settings import get_settings

        targets = TargetPolicy.from_settings(get_settings())
    try:
        targets.check_url(url, timeout_s)
    except (InvalidTarget, TargetRefused, TargetUnresolved) as exc:
        raise JobRequestError(f"webhook_url: {exc}") from None


def check_idempotency_key(key: str | None) -> str | None:
    """The ``Idempotency-Key`` header as given, or None when absent.

    Raises:
        JobRequestError: longer than 200 characters, or not printable ASCII.
    """
    if key is None:
        return None
    if not key or len(key) > IDEMPOTENCY_KEY_MAX_CHARS or not all(33 <= ord(c) < 127 for c in key):
        raise JobRequestError(f"Idempotency-Key: 1 to {IDEMPOTENCY_KEY_MAX_CHARS} printable ASCII characters "
                              "without spaces")
    return key


def prefect_idempotency_key(key: str) -> str:
    """The flow run's idempotency key for a client's ``Idempotency-Key`` (namespaced: keys of other callers of
    the deployment never collide with the API's)."""
    return f"sam3d-job-api:{key}"


def fingerprint(request: JobRequest, image: str, content_id: str) -> str:
    """sha256 hex over everything that makes two submissions the same request: the image (its location and the
    sha256 of its bytes), prompt, boxes, points, review mode, webhook URL, and a video's ``video_frames`` (when not
    1, so that a photo's fingerprint stays what it was)."""
    options = request.options()
    payload = {
        "image": image,
        "content": content_id,
        "prompt": options.prompt,
        "selection": options.selection(),
        "review": request.review,
        "webhook_url": request.webhook_url,
    }
    if options.video_frames != 1:
        payload["video_frames"] = options.video_frames
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def flow_parameters(request: JobRequest, image: str, output_root: str) -> dict[str, Any]:
    """The ``image-to-3d`` parameters of a job (JSON-ready)."""
    options = request.options()
    params: dict[str, Any] = {"image": image, "prompt": options.prompt, "output_root": output_root,
                              "review": request.review}
    if options.boxes:
        params["boxes"] = [list(b) for b in options.boxes]
    if options.points:
        params["points"] = [p.as_dict() for p in options.points]
    if options.video_frames != 1:
        params["video_frames"] = options.video_frames
    return params


def input_labels(facts: dict[str, Any]) -> dict[str, Any]:
    """The run's labels of its checked input (``uploads.Intake.describe()``): one per fact of ``INPUT_FACTS``."""
    return {f"{LABEL_INPUT}{k}": facts[k] for k in INPUT_FACTS if isinstance(facts.get(k), (str, int, float))}


def input_summary(run: RunView) -> dict[str, Any]:
    """What the job says of its input: the facts the submission's check labelled the run with; for a run started
    otherwise, only its ``kind`` (``video`` when the run takes its input for one: ``is_video_uri``)."""
    facts = {k[len(LABEL_INPUT):]: v for k, v in run.labels.items() if k.startswith(LABEL_INPUT)}
    if "kind" not in facts:
        facts["kind"] = "video" if is_video_uri(str(run.parameters.get("image") or "")) else "photo"
    return {k: facts[k] for k in INPUT_FACTS if k in facts}


def run_options_of(parameters: dict[str, Any]) -> RunOptions:
    """The options a run of ``image-to-3d`` works with, from its parameters (as the flow builds them)."""
    known = {k: v for k, v in parameters.items() if k in RunOptions.model_fields and v is not None}
    return RunOptions(**known)


@dataclass(frozen=True)
class RunView:
    """What the job API reads of a flow run.

    Attributes:
        id: flow run id (= job id).
        state_type: Prefect's state type (``SCHEDULED``, ``PENDING``, ``RUNNING``, ``PAUSED``, ``CANCELLING``,
            ``COMPLETED``, ``FAILED``, ``CRASHED``, ``CANCELLED``).
        state_name: the state's name (``Late``, ``Suspended``, ``Crashed``, ...).
        state_message: the state's message (why it failed or crashed), or None.
        created_at, updated_at: ISO 8601 UTC.
        parameters: the run's parameters.
        labels: the run's labels (the job's fingerprint, output prefix, webhook URL).
        tags: the run's tags.
    """

    id: str
    state_type: str
    state_name: str
    state_message: str | None
    created_at: str
    updated_at: str
    parameters: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    @property
    def webhook_url(self) -> str | None:
        return self.labels.get(LABEL_WEBHOOK_URL) or None


def job_status(state_type: str, result: dict[str, Any] | None) -> str:
    """The job's status.

    Args:
        state_type: the run's Prefect state type.
        result: the run's ``result.json`` (only read when the run completed), or None when there is none.

    Returns:
        One of :data:`STATUSES`. A completed run is ``completed``, ``no_object`` or ``rejected`` as its
        ``result.json`` says, and ``failed`` without one; a crashed run is ``failed``.
    """
    if state_type in ("SCHEDULED", "PENDING"):
        return "queued"
    if state_type in ("RUNNING", "CANCELLING"):
        return "running"
    if state_type == "PAUSED":
        return "awaiting_review"
    if state_type == "COMPLETED":
        status = (result or {}).get("status")
        return status if status in RESULT_STATUSES else "failed"
    if state_type == "CANCELLED":
        return "cancelled"
    return "failed"  # FAILED, CRASHED, and any state type Prefect may add


def job_error(run: RunView, status: str, result: dict[str, Any] | None) -> dict[str, str] | None:
    """``{"code", "message"}`` of a failed job: the pipeline's own reason from this run's ``result.json`` when
    it wrote one, else what Prefect says (a crashed run: ``crashed`` and the state's message)."""
    if status != "failed":
        return None
    mine = result is not None and result.get("flow_run_id") == run.id
    if mine and result.get("status") == "failed" and result.get("error"):
        return {"code": result["error"].get("code", "error"), "message": result["error"].get("message", "")}
    if run.state_type == "CRASHED":
        return {"code": "crashed", "message": run.state_message or "the run's process ended unexpectedly"}
    if run.state_type == "COMPLETED":
        return {"code": "result_missing", "message": "the run completed but its result.json could not be found "
                f"under {run.labels.get(LABEL_OUTPUT_PREFIX) or 'its output prefix'}"}
    return {"code": "run_failed", "message": run.state_message or f"the run ended {run.state_name}"}


def produced_by(name: str) -> str | None:
    """Which backend made output ``name`` (``segmenter`` or ``reconstructor``); None for ``result.json``."""
    if name == "result.json":
        return None
    return "segmenter" if name.rsplit("/", 1)[-1] in _SEGMENTER_FILES else "reconstructor"


def backends_summary(result: dict[str, Any] | None, labels: dict[str, Any]) -> dict[str, Any]:
    """Which segmenter and reconstructor produced what: from ``result.json`` when there is one, else the backends
    planned when the job was submitted (``produced`` then empty)."""
    summary: dict[str, Any] = {}
    for role, label in (("segmenter", LABEL_SEGMENTER), ("reconstructor", LABEL_RECONSTRUCTOR)):
        info = (result or {}).get(role)
        if info:
            summary[role] = {k: info.get(k) for k in ("name", "version", "device", "weights", "chosen_because")}
            summary[role]["produced"] = sorted(n for n in (result or {}).get("outputs", {}) if produced_by(n) == role)
        elif labels.get(label):
            summary[role] = {"name": labels[label], "planned": True, "produced": []}
    if result is not None and "segmenter" in summary:
        summary["segmenter"]["used_text_prompt"] = bool(result.get("prompt_used_by_segmenter"))
    return summary


def result_summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """``result.json`` for the job JSON: everything but the storage URIs of the outputs (the job's ``outputs``
    has links) and the per-frame scores of a video."""
    if result is None:
        return None
    summary = {k: v for k, v in result.items() if k != "outputs"}
    if isinstance(summary.get("video"), dict):
        summary["video"] = {k: v for k, v in summary["video"].items() if k != "frames"}
    return summary


def job_json(run: RunView, *, result: dict[str, Any] | None, output_prefix: str | None, outputs: dict[str, str],
             status_url: str, review_url: str | None, attempts: list[dict[str, Any]],
             early_outputs: dict[str, str] | None = None) -> dict[str, Any]:
    """The job as ``GET /v1/jobs/{id}`` answers it and the webhook sends it.

    Args:
        run: the job's flow run.
        result: its ``result.json`` (None while it runs, or when there is none).
        output_prefix: where its files go (``s3://bucket/outputs/<stem>-<hash>``), or None when unknown.
        outputs: file name → URL a browser can fetch (presigned S3 URL, or the server's route).
        status_url: this job's ``GET`` URL.
        review_url: the review page of this run; shown only while the job awaits review.
        attempts: the webhook's delivery attempts so far.
        early_outputs: while the run publishes, the files a viewer waits for (``object.glb``), already written
            before the rest and ``result.json``.
    """
    status = job_status(run.state_type, result)
    return {
        "id": run.id,
        "status": status,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
        "prompt": run.parameters.get("prompt"),
        "image": run.parameters.get("image"),
        "input": input_summary(run),
        "review": run.parameters.get("review", "none"),
        "output_prefix": output_prefix,
        "outputs": outputs if status in RESULT_STATUSES | {"failed"} else {},
        "early_outputs": (early_outputs or {}) if status == "running" else {},
        "review_url": review_url if status == "awaiting_review" else None,
        "error": job_error(run, status, result),
        "state": {"type": run.state_type, "name": run.state_name, "message": run.state_message},
        "backends": backends_summary(result, run.labels),
        "result": result_summary(result),
        "status_url": status_url,
        "webhook": {"url": run.webhook_url, "attempts": attempts} if run.webhook_url else None,
    }


def accepted_json(job: dict[str, Any]) -> dict[str, Any]:
    """The answer to a submission (202 for a new job, 200 for an idempotent replay): its id, status, links, and
    what the check found of its input (``kind`` photo or video; a clip's size, length and frames)."""
    return {k: job[k] for k in ("id", "status", "status_url", "output_prefix", "input")}
