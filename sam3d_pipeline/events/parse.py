"""Parse AWS S3 "object created" notifications into one record type, and build the Prefect event for it.

Three shapes arrive here (all as the SQS message body, or as the event a Lambda receives):

* S3 event notification sent to SQS (``{"Records": [{"eventSource": "aws:s3", ...}]}``, documented in
  https://docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure.html), possibly
  wrapped in an SNS envelope (``{"Type": "Notification", "Message": "<json>"}``);
* an EventBridge event from S3 (``{"source": "aws.s3", "detail-type": "Object Created", "detail": {...}}``,
  https://docs.aws.amazon.com/AmazonS3/latest/userguide/ev-events.html), delivered to SQS by a rule, or
  handed to a Lambda function by a rule;
* ``s3:TestEvent``, which S3 sends when a notification is configured: skipped.

A Lambda function fed by an SQS queue receives a batch of such bodies (``sqs_messages`` splits it).

Everything a message says is checked here, at the edge, and nowhere else: the JSON text is bounded in size
and nesting depth and may not hold ``NaN``, ``Infinity`` or integers longer than ``MAX_INT_DIGITS``; every
field the pipeline uses is validated with strict types (pydantic models below: a size is a non-negative
integer below 2**63, never a bool, a float or a string; names and tags are bounded strings of valid UTF-8).
Whatever fails becomes a ``MalformedMessageError`` with a short reason; nothing else escapes the parser.

Keys are URL-encoded in both AWS shapes (``+`` for a space, ``%XX`` for the rest; moto also encodes ``/``):
they are decoded once here; a bare ``%``, an escape that is not UTF-8, or a key longer than S3's 1024 bytes
is malformed. Nothing in this module talks to the network; Prefect is imported only when an event is built.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import unquote_plus

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from sam3d_pipeline import jsonsafe

if TYPE_CHECKING:
    from prefect.events import Event

EVENT_NAME = "aws.s3.object.created"
RESOURCE_PREFIX = "aws.s3.object."
# Fixed namespace for event ids: uuid5(EVENT_NAMESPACE, identity) is the same on every machine and run.
EVENT_NAMESPACE = uuid.UUID("6f3d1c52-8f0e-5b7a-9a53-3d5e2b8c4a10")
PROMPT_METADATA_KEY = "prompt"

# S3 notifications are at most 64 KB; an SNS envelope adds little. SQS's default message limit is 256 KiB.
MAX_BODY_BYTES = 256 * 1024
MAX_JSON_DEPTH = 32  # the AWS shapes nest about 6 deep; deeper is not an S3 event
MAX_INT_DIGITS = jsonsafe.MAX_INT_DIGITS
MAX_RECORDS = 100  # S3 puts one record in a notification
MAX_KEY_BYTES = 1024  # S3's limit on a key, UTF-8 encoded
MAX_SIZE_BYTES = 2**63 - 1
MAX_TEXT_CHARS = 1024  # ETags, version ids, sequencers, request and event ids, times
MAX_REASON_CHARS = 300


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


# -- the JSON text ------------------------------------------------------------------------------------------


def _short(value: Any) -> str:
    """A value for an error message: short strings and numbers as they are, anything else by its type."""
    if value is None or isinstance(value, bool | int | float | str):
        text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
        return text if len(text) <= 40 else text[:37] + "..."
    return f"a {type(value).__name__}"


def _loads(body: Any, what: str = "body") -> dict[str, Any]:
    """The JSON object in ``body`` (text, UTF-8 bytes or an already-decoded dict), checked as described above."""
    if isinstance(body, dict):
        return body
    if isinstance(body, bytes | bytearray):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedMessageError(f"{what} is not UTF-8") from None
    if not isinstance(body, str):
        raise MalformedMessageError(f"{what} is a {type(body).__name__}, not JSON text")
    if len(body) > MAX_BODY_BYTES or len(body.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
        raise MalformedMessageError(f"{what} longer than {MAX_BODY_BYTES} bytes")
    try:
        data = jsonsafe.loads(body, MAX_JSON_DEPTH)
    except jsonsafe.JSONLimitError as exc:
        raise MalformedMessageError(str(exc)) from None
    except (ValueError, RecursionError) as exc:
        raise MalformedMessageError(f"{what} is not JSON: {str(exc)[:80]}") from None
    if not isinstance(data, dict):
        raise MalformedMessageError(f"expected a JSON object, got {type(data).__name__}")
    return data


# -- the fields ---------------------------------------------------------------------------------------------
def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid UTF-8 (lone surrogate)") from None
    return text


_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _decode_key(encoded: str) -> str:
    """``unquote_plus`` that refuses what S3 never sends: a bare ``%``, non-UTF-8 escapes, over-long keys."""
    if _BAD_PERCENT.search(encoded):
        raise ValueError("invalid percent-encoding (a '%' not followed by two hex digits)")
    try:
        key = unquote_plus(encoded, errors="strict")
    except UnicodeDecodeError:
        raise ValueError("percent-encoded bytes are not UTF-8") from None
    size = len(_utf8(key).encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise ValueError(f"decoded key is {size} bytes, over S3's {MAX_KEY_BYTES}")
    if not key:
        raise ValueError("empty key")
    return key


def _timestamp(value: Any) -> datetime | None:
    """An ISO-8601 time (AWS), or seconds since the epoch (moto's EventBridge events), as a UTC datetime."""
    if value is None:
        return None
    try:
        if isinstance(value, str) and len(value) <= 64:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, UTC)
    except (ValueError, OverflowError, OSError):
        pass
    raise ValueError("not an ISO-8601 time")


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(_utf8)]
BucketName = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._-]+$")]
ObjectKey = Annotated[str, Field(min_length=1, max_length=3 * MAX_KEY_BYTES), AfterValidator(_decode_key)]
Size = Annotated[int, Field(ge=0, le=MAX_SIZE_BYTES)]
Timestamp = Annotated[Any, AfterValidator(_timestamp)]


class _Strict(BaseModel):
    """No coercion (``"12"`` is not a size, ``true`` is not an integer); fields the pipeline ignores stay unread."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class _Bucket(_Strict):
    name: BucketName


class _NotificationObject(_Strict):
    key: ObjectKey
    size: Size | None = None
    eTag: Text | None = None
    versionId: Text | None = None
    sequencer: Text | None = None


class _NotificationS3(_Strict):
    bucket: _Bucket
    object: _NotificationObject


class _ResponseElements(_Strict):
    request_id: Text | None = Field(None, alias="x-amz-request-id")


class _RecordHead(_Strict):
    eventSource: Literal["aws:s3"]
    eventName: Text


class _NotificationRecord(_RecordHead):
    eventTime: Timestamp = None
    responseElements: _ResponseElements | None = None
    s3: _NotificationS3


class _EventBridgeObject(_Strict):
    key: ObjectKey
    size: Size | None = None
    etag: Text | None = None
    version_id: Text | None = Field(None, alias="version-id")
    sequencer: Text | None = None


class _EventBridgeDetail(_Strict):
    bucket: _Bucket
    object: _EventBridgeObject


class _EventBridgeHead(_Strict):
    source: Literal["aws.s3"]
    detail_type: Text = Field(alias="detail-type")


class _EventBridgeEvent(_EventBridgeHead):
    id: Text | None = None
    time: Timestamp = None
    detail: _EventBridgeDetail


def _path(where: str, loc: tuple[int | str, ...]) -> str:
    out = where
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "message"


def _validate(model: type[_Strict], data: Any, where: str) -> Any:
    """``model`` validated from ``data``; a failure names the first fields at fault, never their values."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False, include_context=False)[:3]:
            path = _path(where, error["loc"])
            problems.append(f"missing {path}" if error["type"] == "missing" else f"{path}: {error['msg']}")
        more = exc.error_count() - len(problems)
        reason = "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")
        raise MalformedMessageError(reason[:MAX_REASON_CHARS]) from None


def _unquote_etag(etag: str | None) -> str:
    return (etag or "").strip('"')


def _from_notification_record(record: Any, index: int) -> ObjectCreated | None:
    where = f"Records[{index}]"
    if not isinstance(record, dict):
        raise MalformedMessageError(f"{where} is not an object")
    if record.get("eventSource") != "aws:s3":
        raise MalformedMessageError(f"{where}.eventSource is {_short(record.get('eventSource'))}, not 'aws:s3'")
    head = _validate(_RecordHead, record, where)
    if not head.eventName.startswith("ObjectCreated:"):
        return None
    parsed = _validate(_NotificationRecord, record, where)
    obj = parsed.s3.object
    response = parsed.responseElements
    return ObjectCreated(
        bucket=parsed.s3.bucket.name,
        key=obj.key,
        size=obj.size,
        etag=_unquote_etag(obj.eTag),
        version_id=obj.versionId or None,
        sequencer=obj.sequencer or "",
        source="s3-notification",
        event_time=parsed.eventTime,
        aws_event_id=response.request_id if response else None,
    )


def _from_eventbridge(event: dict[str, Any]) -> list[ObjectCreated]:
    head = _validate(_EventBridgeHead, event, "")
    if head.detail_type != "Object Created":
        return []
    parsed = _validate(_EventBridgeEvent, event, "")
    obj = parsed.detail.object
    return [
        ObjectCreated(
            bucket=parsed.detail.bucket.name,
            key=obj.key,
            size=obj.size,
            etag=_unquote_etag(obj.etag),
            version_id=obj.version_id or None,
            sequencer=obj.sequencer or "",
            source="eventbridge",
            event_time=parsed.time,
            aws_event_id=parsed.id,
        )
    ]


def _parse(body: Any) -> list[ObjectCreated]:
    data = _loads(body)
    if data.get("Type") == "Notification":  # SNS envelope
        message = data.get("Message")
        if not isinstance(message, str):
            raise MalformedMessageError("SNS envelope without a Message string")
        try:
            return _parse_event(_loads(message, "SNS Message"))
        except MalformedMessageError as exc:
            raise MalformedMessageError(f"in the SNS Message: {exc}"[:MAX_REASON_CHARS]) from None
    return _parse_event(data)


def _parse_event(data: dict[str, Any]) -> list[ObjectCreated]:
    if data.get("Event") == "s3:TestEvent":
        return []
    if "Records" in data:
        records = data["Records"]
        if not isinstance(records, list):
            raise MalformedMessageError("Records is not a list")
        if len(records) > MAX_RECORDS:
            raise MalformedMessageError(f"{len(records)} records, more than {MAX_RECORDS}")
        parsed = (_from_notification_record(r, i) for i, r in enumerate(records))
        return [r for r in parsed if r is not None]
    if data.get("source") == "aws.s3":
        return _from_eventbridge(data)
    raise MalformedMessageError(
        "neither an S3 notification (Records), an EventBridge S3 event (source aws.s3) nor s3:TestEvent"
    )


def parse_message(body: str | bytes | dict[str, Any]) -> list[ObjectCreated]:
    """Every object-created record in one SQS message body or Lambda event.

    Args:
        body: the SQS message body (JSON text, or UTF-8 bytes) or an already-decoded event dict.

    Returns:
        The object-created records, keys decoded; ``[]`` for ``s3:TestEvent`` and for other S3 event
        types (removals, restores), which are valid but start nothing.

    Raises:
        MalformedMessageError: for anything else, with a short reason naming the field at fault: not UTF-8,
            not JSON, over ``MAX_BODY_BYTES`` or ``MAX_JSON_DEPTH``, non-finite or over-long numbers, not an
            object, none of the shapes above, a missing field, a field of the wrong type or out of bounds,
            a key that does not decode (see the module docstring). It is the only exception this raises.
    """
    try:
        return _parse(body)
    except MalformedMessageError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # a check above that missed a case
        raise MalformedMessageError(f"unreadable message ({type(exc).__name__}: {str(exc)[:80]})") from None


@dataclass(frozen=True)
class SqsMessage:
    """One message of a Lambda SQS batch.

    Attributes:
        message_id: the SQS ``messageId``: what a partial batch response names to keep it on the queue.
        body: the message body as SQS holds it (normally JSON text; ``parse_message`` judges it).
        receive_count: ``attributes.ApproximateReceiveCount`` ("?" when absent).
    """

    message_id: str
    body: Any
    receive_count: str = "?"


class _SqsRecord(_Strict):
    eventSource: Literal["aws:sqs"]
    messageId: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS), AfterValidator(_utf8)]


def sqs_messages(event: Any) -> list[SqsMessage] | None:
    """The messages of a Lambda event from an SQS queue, or None when ``event`` is not one.

    The shape (``{"Records": [{"messageId", "receiptHandle", "body", "attributes", "eventSource": "aws:sqs",
    ...}]}``) is documented in https://docs.aws.amazon.com/lambda/latest/dg/with-sqs.html; Powertools for AWS
    Lambda's parser models the case whose bodies are S3 notifications as ``S3SqsEventNotificationModel``.
    The bodies are returned as they are, for ``parse_message`` to judge one by one.

    Raises:
        MalformedMessageError: the event is an SQS batch but a record has no usable ``messageId`` (so no
            partial batch response can name it), or mixes in records from another source.
    """
    if not isinstance(event, dict):
        return None
    records = event.get("Records")
    if not isinstance(records, list) or not any(
        isinstance(r, dict) and r.get("eventSource") == "aws:sqs" for r in records
    ):
        return None
    messages = []
    for index, record in enumerate(records):
        head = _validate(_SqsRecord, record, f"Records[{index}]")
        attributes = record.get("attributes")
        count = attributes.get("ApproximateReceiveCount") if isinstance(attributes, dict) else None
        messages.append(SqsMessage(head.messageId, record.get("body"), count if isinstance(count, str) else "?"))
    return messages


# -- prompts and events -------------------------------------------------------------------------------------
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
