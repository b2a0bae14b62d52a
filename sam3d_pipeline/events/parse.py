"""Parse AWS S3 "object created" notifications into one record type, and build the Prefect event for it.

Three shapes arrive here (all as the SQS message body, or as the event a Lambda receives):

* S3 event notification sent to SQS (``{"Records": [{"eventSource": "aws:s3", ...}]}``), possibly wrapped
  in an SNS envelope (``{"Type": "Notification", "Message": "<json>"}``);
* an EventBridge event from S3 (``{"source": "aws.s3", "detail-type": "Object Created", "detail": {...}}``),
  delivered to SQS by a rule, or handed to a Lambda function by a rule;
* ``s3:TestEvent``, which S3 sends when a notification is configured: skipped.

Keys are URL-encoded in both AWS shapes (``+`` for a space, ``%XX`` for the rest; moto also encodes ``/``):
they are decoded once here with ``unquote_plus``. Nothing in this module talks to the network; Prefect is
imported only when an event is built.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

if TYPE_CHECKING:
    from prefect.events import Event

EVENT_NAME = "aws.s3.object.created"
RESOURCE_PREFIX = "aws.s3.object."
# Fixed namespace for event ids: uuid5(EVENT_NAMESPACE, identity) is the same on every machine and run.
EVENT_NAMESPACE = uuid.UUID("6f3d1c52-8f0e-5b7a-9a53-3d5e2b8c4a10")
PROMPT_METADATA_KEY = "prompt"


class MalformedMessageError(ValueError):
    """The message is not an S3 notification, an EventBridge S3 event or an S3 test event."""


@dataclass(frozen=True)
class ObjectCreated:
    """One object-created notification, with the key decoded.

    Attributes:
        bucket: bucket name.
        key: object key, decoded (``photos/red chair.jpg``).
        size: object size in bytes, or None when the notification omits it.
        etag: the object's ETag without quotes ("" when the notification omits it).
        version_id: version id when the bucket is versioned, else None.
        sequencer: S3's ordering token for events on the same key ("" when absent).
        source: ``s3-notification`` or ``eventbridge``.
        event_time: when S3 recorded the event (UTC), or None.
        aws_event_id: the AWS identity of the notification (EventBridge ``id``, or the S3 request id).
    """

    bucket: str
    key: str
    size: int | None
    etag: str
    version_id: str | None
    sequencer: str
    source: str
    event_time: datetime | None = None
    aws_event_id: str | None = field(default=None, compare=False)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class EventFilter:
    """Which uploads start a run.

    Attributes:
        prefix: only keys starting with this (``""`` = all keys).
        suffixes: only keys ending with one of these, case-insensitive (empty = all).
        ignored: (bucket, key prefix) pairs never acted on: the pipeline's output root and its own state.
    """

    prefix: str = ""
    suffixes: tuple[str, ...] = ()
    ignored: tuple[tuple[str, str], ...] = ()

    def reason_to_skip(self, obj: ObjectCreated) -> str | None:
        """None when ``obj`` should start a run, else a short reason for the log."""
        for bucket, prefix in self.ignored:
            if obj.bucket == bucket and obj.key.startswith(prefix):
                return f"under the pipeline's own prefix s3://{bucket}/{prefix}"
        if obj.key.endswith("/"):
            return "a folder marker"
        if self.prefix and not obj.key.startswith(self.prefix):
            return f"outside the upload prefix {self.prefix!r}"
        if self.suffixes and not obj.key.lower().endswith(tuple(s.lower() for s in self.suffixes)):
            return f"not one of {', '.join(self.suffixes)}"
        return None


def _loads(body: str | bytes | dict[str, Any]) -> dict[str, Any]:
    if isinstance(body, dict):
        return body
    try:
        data = json.loads(body)
    except (TypeError, ValueError) as exc:
        raise MalformedMessageError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedMessageError(f"expected a JSON object, got {type(data).__name__}")
    return data


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _size(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise MalformedMessageError(f"object size {value!r} is not an integer") from None


def _require(mapping: Any, name: str, where: str) -> Any:
    if not isinstance(mapping, dict) or name not in mapping:
        raise MalformedMessageError(f"missing {where}.{name}")
    return mapping[name]


def _from_notification_record(record: dict[str, Any], index: int) -> ObjectCreated | None:
    where = f"Records[{index}]"
    if not isinstance(record, dict):
        raise MalformedMessageError(f"{where} is not an object")
    if record.get("eventSource") != "aws:s3":
        raise MalformedMessageError(f"{where}.eventSource is {record.get('eventSource')!r}, not 'aws:s3'")
    name = str(_require(record, "eventName", where))
    if not name.startswith("ObjectCreated:"):
        return None
    s3 = _require(record, "s3", where)
    bucket = _require(_require(s3, "bucket", f"{where}.s3"), "name", f"{where}.s3.bucket")
    obj = _require(s3, "object", f"{where}.s3")
    key = _require(obj, "key", f"{where}.s3.object")
    if not isinstance(bucket, str) or not bucket or not isinstance(key, str) or not key:
        raise MalformedMessageError(f"{where}: empty bucket name or object key")
    response = record.get("responseElements") or {}
    return ObjectCreated(
        bucket=bucket,
        key=unquote_plus(key),
        size=_size(obj.get("size")),
        etag=str(obj.get("eTag") or "").strip('"'),
        version_id=obj.get("versionId") or None,
        sequencer=str(obj.get("sequencer") or ""),
        source="s3-notification",
        event_time=_parse_time(record.get("eventTime")),
        aws_event_id=response.get("x-amz-request-id") if isinstance(response, dict) else None,
    )


def _from_eventbridge(event: dict[str, Any]) -> list[ObjectCreated]:
    if event.get("detail-type") != "Object Created":
        return []
    detail = _require(event, "detail", "event")
    bucket = _require(_require(detail, "bucket", "detail"), "name", "detail.bucket")
    obj = _require(detail, "object", "detail")
    key = _require(obj, "key", "detail.object")
    if not isinstance(bucket, str) or not bucket or not isinstance(key, str) or not key:
        raise MalformedMessageError("detail: empty bucket name or object key")
    return [
        ObjectCreated(
            bucket=bucket,
            key=unquote_plus(key),
            size=_size(obj.get("size")),
            etag=str(obj.get("etag") or "").strip('"'),
            version_id=obj.get("version-id") or None,
            sequencer=str(obj.get("sequencer") or ""),
            source="eventbridge",
            event_time=_parse_time(event.get("time")),
            aws_event_id=event.get("id"),
        )
    ]


def parse_message(body: str | bytes | dict[str, Any]) -> list[ObjectCreated]:
    """Every object-created record in one SQS message body or Lambda event.

    Args:
        body: the SQS message body (JSON text) or an already-decoded event dict.

    Returns:
        The object-created records, keys decoded; ``[]`` for ``s3:TestEvent`` and for other S3 event
        types (removals, restores), which are valid but start nothing.

    Raises:
        MalformedMessageError: the body is not JSON, or not one of the shapes above, or misses a field
            a record needs (bucket name, object key); the message names the missing field.
    """
    data = _loads(body)
    if data.get("Type") == "Notification" and isinstance(data.get("Message"), str):  # SNS envelope
        data = _loads(data["Message"])
    if data.get("Event") == "s3:TestEvent":
        return []
    if "Records" in data:
        records = data["Records"]
        if not isinstance(records, list):
            raise MalformedMessageError("Records is not a list")
        parsed = (_from_notification_record(r, i) for i, r in enumerate(records))
        return [r for r in parsed if r is not None]
    if data.get("source") == "aws.s3" and "detail" in data:
        return _from_eventbridge(data)
    raise MalformedMessageError(
        "neither an S3 notification (Records), an EventBridge S3 event (source aws.s3) nor s3:TestEvent"
    )


def resolve_prompt(metadata: dict[str, str] | None, key: str, prompt_by_prefix: dict[str, str]) -> str | None:
    """The prompt for an uploaded photo.

    Args:
        metadata: the object's user metadata (``x-amz-meta-*`` without the prefix; keys lower-case).
        key: decoded object key.
        prompt_by_prefix: key prefix → prompt; the longest matching prefix wins.

    Returns:
        The ``prompt`` metadata entry when set and not blank, else the mapped prompt, else None (the
        deployment's default prompt applies).
    """
    value = (metadata or {}).get(PROMPT_METADATA_KEY)
    if value and value.strip():
        return value.strip()
    matches = [p for p in prompt_by_prefix if key.startswith(p)]
    if matches:
        return prompt_by_prefix[max(matches, key=len)]
    return None


def event_id(obj: ObjectCreated, prompt: str | None) -> uuid.UUID:
    """The Prefect event id: a UUID5 over (bucket, key, ETag, prompt).

    A redelivered SQS message, the same upload seen through both S3 notifications and EventBridge, and a
    re-upload of identical bytes under the same key all give the same id, so Prefect's event dedup and the
    bridge's markers treat them as one. When the ETag is missing (never for real S3) the sequencer and
    version id stand in, so distinct uploads stay distinct.
    """
    content = obj.etag or f"seq:{obj.sequencer}:{obj.version_id or ''}"
    identity = json.dumps([obj.bucket, obj.key, content, prompt or ""], ensure_ascii=False)
    return uuid.uuid5(EVENT_NAMESPACE, identity)


def prefect_event(obj: ObjectCreated, prompt: str | None = None, *, now: datetime | None = None) -> Event:
    """The Prefect event for one upload, ready for ``POST /api/events``.

    Args:
        obj: the parsed notification.
        prompt: resolved prompt (``resolve_prompt``) or None for the deployment default.
        now: occurred time when the notification has none (default: the current UTC time).

    Returns:
        A ``prefect.events.Event``: id ``event_id(obj, prompt)``, event ``aws.s3.object.created``, resource
        ``aws.s3.object.<bucket>/<key>`` (labels ``prefect.resource.name`` = key, ``aws.s3.bucket``), no related
        resources, payload ``{bucket, key, size, etag, version_id, sequencer, source, prompt, aws_event_id}``.
    """
    from prefect.events import Event, Resource

    return Event(
        id=event_id(obj, prompt),
        occurred=obj.event_time or now or datetime.now(UTC),
        event=EVENT_NAME,
        resource=Resource({
            "prefect.resource.id": f"{RESOURCE_PREFIX}{obj.bucket}/{obj.key}",
            "prefect.resource.name": obj.key,
            "aws.s3.bucket": obj.bucket,
        }),
        related=[],
        payload={
            "bucket": obj.bucket,
            "key": obj.key,
            "size": obj.size,
            "etag": obj.etag,
            "version_id": obj.version_id,
            "sequencer": obj.sequencer,
            "source": obj.source,
            "prompt": prompt,
            "aws_event_id": obj.aws_event_id,
        },
    )
