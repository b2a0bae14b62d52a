"""The events bridge: SQS long poll → Prefect events (``POST <PREFECT_API_URL>/events``).

For each SQS message: parse it, drop what the filter rejects, HEAD each object for its ``prompt``
metadata, skip uploads already handed to Prefect (marker objects keyed by the event id, which covers
bucket, key, ETag and prompt), post the rest in one request, write their markers, and only then delete
the message. Anything that fails leaves the message on the queue: transient failures (SQS, S3 or
Prefect unreachable, 5xx, throttling) are retried after an exponential backoff; malformed messages
(anything ``parse.parse_message`` refuses) are logged with the reason and left for the queue's redrive
policy to move to a dead-letter queue, and so is a message whose handling raises anything unexpected
(logged with its traceback). One message never stops the loop.

Redelivery is harmless by construction: the event id is deterministic (``parse.event_id``), Prefect
drops event ids it has seen recently, and the markers remember them for good. Between polls, the run keeper
(``keeper.py``, every ``SAM3D_BRIDGE_KEEP_S``) follows each accepted upload until it has one final run: it
posts again an event a killed Prefect server lost, and schedules again a run that crashed with its worker or
its server; after a restart the bridge picks up the uploads of the last hour from the markers.

The events are typed ``prefect.events.Event`` objects, sent with one HTTP ``POST`` rather than through
Prefect's websocket events client: the POST's 2xx answer is the API accepting them, which is what the
message's deletion waits for (a websocket send confirms nothing per event).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sam3d_pipeline.backoff import backoff_s, jittered
from sam3d_pipeline.events.parse import (
    MalformedMessageError,
    ObjectCreated,
    parse_message,
    prefect_event,
    resolve_prompt,
)
from sam3d_pipeline.events.settings import EventSettings
from sam3d_pipeline.storage import is_transient_aws_error, split_s3_uri

if TYPE_CHECKING:
    from prefect.events import Event

log = logging.getLogger("sam3d_pipeline.events.bridge")


class TransientBridgeError(RuntimeError):
    """SQS, S3 or the Prefect API failed in a way worth retrying (unreachable, 5xx, throttled)."""


class PermanentBridgeError(RuntimeError):
    """A request was refused for good (e.g. the Prefect API answered 4xx): the message stays for redrive."""


def post_events(api_url: str, events: list[Event], *, api_key: str | None = None, timeout_s: float = 10.0) -> None:
    """POST events to a Prefect API (``<api_url>/events``, self-hosted or Cloud).

    Args:
        api_url: the ``PREFECT_API_URL`` (``http://host:4200/api`` or a Cloud workspace URL).
        events: Prefect events (``parse.prefect_event``), sent as one JSON array.
        api_key: bearer token for Prefect Cloud; None for a self-hosted server without auth.
        timeout_s: request timeout in seconds.

    Raises:
        TransientBridgeError: connection failure, timeout, 429 or 5xx.
        PermanentBridgeError: any other non-2xx answer (the body is quoted in the message).
    """
    if events:
        prefect_request(api_url, "POST", "/events", [event.model_dump(mode="json") for event in events],
                        api_key=api_key, timeout_s=timeout_s)


def prefect_request(api_url: str, method: str, path: str, body: Any = None, *, api_key: str | None = None,
                    timeout_s: float = 10.0) -> Any:
    """One JSON request to a Prefect API (``<api_url><path>``); returns the decoded answer (None when empty).

    Raises:
        TransientBridgeError: connection failure, timeout, 429 or 5xx.
        PermanentBridgeError: any other non-2xx answer (the body is quoted in the message).
    """
    request = urllib.request.Request(
        api_url.rstrip("/") + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode(errors="replace")
        if exc.code == 429 or exc.code >= 500:
            raise TransientBridgeError(f"Prefect API {api_url} answered {exc.code}: {detail}") from None
        raise PermanentBridgeError(f"Prefect API {api_url} refused {method} {path} ({exc.code}): {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise TransientBridgeError(f"Prefect API {api_url} unreachable: {exc}") from None
    try:
        return json.loads(answer) if answer.strip() else None
    except ValueError:
        raise TransientBridgeError(f"Prefect API {api_url}: {method} {path} answered no JSON") from None


# SQS's answers for a queue that is not there: the bridge waits for it instead of exiting (botocore's JSON and query
# protocols name it differently).
MISSING_QUEUE_CODES = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")


def _client_error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


@dataclass
class BridgeStats:
    """Counters since the bridge started (logged periodically and on exit)."""

    messages: int = 0
    posted: int = 0
    duplicates: int = 0
    skipped: int = 0
    malformed: int = 0
    errors: int = 0
    deleted: int = 0

    def line(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.__dict__.items())


@dataclass
class Prepared:
    """The events one message yields, and the marker keys to write once Prefect has them."""

    events: list[Event] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)


class UploadPublisher:
    """Turns parsed uploads into Prefect events: filter, prompt lookup, dedup markers, one POST.

    Shared by the SQS bridge and the Lambda handler.

    Args:
        api_url: ``PREFECT_API_URL``.
        settings: filter, prompt mapping, marker root.
        api_key: Prefect Cloud API key, if any.
        s3: boto3 S3 client (default: a new one honouring ``AWS_ENDPOINT_URL``).
    """

    def __init__(self, api_url: str, settings: EventSettings | None = None, *, api_key: str | None = None,
                 s3: Any = None) -> None:
        import boto3

        self.api_url = api_url
        self.settings = settings or EventSettings()
        self.api_key = api_key
        self.s3 = s3 or boto3.client("s3")
        self.filter = self.settings.event_filter()
        self.stats = BridgeStats()

    # -- one upload --------------------------------------------------------------------------------
    def _marker_key(self, event_id: str) -> tuple[str, str] | None:
        if not self.settings.event_marker_root:
            return None
        bucket, prefix = split_s3_uri(self.settings.event_marker_root)
        return bucket, f"{prefix.rstrip('/')}/{event_id}.json" if prefix else f"{event_id}.json"

    def _exists(self, bucket: str, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if _client_error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def _metadata(self, obj: ObjectCreated) -> dict[str, str] | None:
        """The object's user metadata, or None when the object is gone (deleted since the upload)."""
        from botocore.exceptions import ClientError

        try:
            head = self.s3.head_object(Bucket=obj.bucket, Key=obj.key)
        except ClientError as exc:
            if _client_error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}

    def prepare(self, records: list[ObjectCreated]) -> Prepared:
        """Filter, resolve prompts and drop uploads already handed to Prefect.

        Raises:
            botocore errors from HEAD requests other than "not found" (classified by the caller).
        """
        prepared = Prepared()
        for obj in records:
            reason = self.filter.reason_to_skip(obj)
            if reason:
                log.info("skip %s: %s", obj.uri, reason)
                self.stats.skipped += 1
                continue
            metadata = self._metadata(obj)
            if metadata is None:
                log.warning("skip %s: the object no longer exists", obj.uri)
                self.stats.skipped += 1
                continue
            prompt = resolve_prompt(metadata, obj.key, self.settings.prompt_by_prefix)
            event = prefect_event(obj, prompt)
            marker = self._marker_key(str(event.id))
            if marker is not None and self._exists(*marker):
                log.info("duplicate %s (etag %s, prompt %r): already handed to Prefect as %s",
                         obj.uri, obj.etag, prompt, event.id)
                self.stats.duplicates += 1
                continue
            if any(e.id == event.id for e in prepared.events):
                self.stats.duplicates += 1
                continue
            prepared.events.append(event)
            if marker is not None:
                prepared.markers.append(marker[1])
        return prepared

    def _write_markers(self, prepared: Prepared) -> None:
        if not prepared.markers:
            return
        bucket, _ = split_s3_uri(self.settings.event_marker_root or "")
        for event, key in zip(prepared.events, prepared.markers, strict=True):
            self.s3.put_object(Bucket=bucket, Key=key, Body=event.model_dump_json().encode(),
                               ContentType="application/json")

    def publish(self, records: list[ObjectCreated]) -> list[Event]:
        """Hand the new uploads among ``records`` to Prefect; returns the events posted.

        Raises:
            TransientBridgeError, PermanentBridgeError: from ``post_events``.
            botocore errors: from HEAD/PUT of objects and markers.
        """
        prepared = self.prepare(records)
        post_events(self.api_url, prepared.events, api_key=self.api_key,
                    timeout_s=self.settings.bridge_http_timeout_s)
        self._write_markers(prepared)
        for event in prepared.events:
            p = event.payload
            log.info("event %s for s3://%s/%s (prompt %r)", event.id, p["bucket"], p["key"], p["prompt"])
        self.stats.posted += len(prepared.events)
        return prepared.events


class EventsBridge:
    """Moves S3 upload notifications from one SQS queue into Prefect events.

    Args:
        queue_url: the SQS queue receiving S3 notifications (directly or through EventBridge).
        api_url: ``PREFECT_API_URL``.
        settings: filter, prompt mapping, marker root and polling knobs.
        api_key: Prefect Cloud API key, if any.
        sqs, s3: boto3 clients (default: new ones honouring ``AWS_ENDPOINT_URL``).
    """

    def __init__(self, queue_url: str, api_url: str, settings: EventSettings | None = None, *,
                 api_key: str | None = None, sqs: Any = None, s3: Any = None) -> None:
        import boto3

        self.queue_url = queue_url
        self.api_url = api_url
        self.settings = settings or EventSettings()
        self.sqs = sqs or boto3.client("sqs")
        self.publisher = UploadPublisher(api_url, self.settings, api_key=api_key, s3=s3)
        self.stats = self.publisher.stats
        self._failures = 0  # transient failures in a row (the wait grows with them)
        self.keeper = None
        if self.settings.bridge_keep_s > 0:
            from sam3d_pipeline.events.keeper import RunKeeper

            timeout_s = self.settings.bridge_http_timeout_s
            self.keeper = RunKeeper(
                lambda method, path, body: prefect_request(api_url, method, path, body, api_key=api_key,
                                                           timeout_s=timeout_s),
                lambda events: post_events(api_url, events, api_key=api_key, timeout_s=timeout_s),
                deployment=self.settings.bridge_deployment, repost_after_s=self.settings.bridge_repost_after_s,
                attempts=self.settings.bridge_run_attempts, window_s=self.settings.bridge_keep_window_s,
                pending_timeout_s=self.settings.bridge_pending_timeout_s)

    # -- one message -------------------------------------------------------------------------------
    def handle(self, message: dict[str, Any]) -> bool:
        """Process one SQS message; True when it was deleted (done), False when it stays on the queue.

        A message that stays is received again after the queue's visibility timeout, until the redrive
        policy moves it to the dead-letter queue. Malformed bodies (``parse_message``), refused events and
        permanent S3 errors are logged and left; so is anything unexpected, logged with its traceback.

        Raises:
            TransientBridgeError: a retryable failure; the message stays and becomes visible again.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        self.stats.messages += 1
        message_id = message.get("MessageId", "?")
        receives = (message.get("Attributes") or {}).get("ApproximateReceiveCount", "?")
        try:
            records = parse_message(message.get("Body"))
        except MalformedMessageError as exc:
            self.stats.malformed += 1
            log.error("malformed SQS message %s (receive #%s), left for the dead-letter queue: %s",
                      message_id, receives, exc)
            return False
        try:
            posted = self.publisher.publish(records)
        except PermanentBridgeError as exc:
            self.stats.errors += 1
            log.error("SQS message %s not delivered, left for the dead-letter queue: %s", message_id, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - classified right here
            if isinstance(exc, TransientBridgeError) or is_transient_aws_error(exc):
                raise TransientBridgeError(f"message {message_id}: {exc}") from exc
            self.stats.errors += 1
            if isinstance(exc, ClientError | BotoCoreError):  # access denied, bad marker root, ...
                log.error("SQS message %s not delivered (%s: %s), left for the dead-letter queue",
                          message_id, type(exc).__name__, exc)
            else:
                log.exception("SQS message %s (receive #%s) failed unexpectedly, left for the dead-letter queue",
                              message_id, receives)
            return False
        try:
            self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
        except Exception as exc:  # noqa: BLE001 - classified right here
            # The events are with Prefect: a redelivery posts the same event ids, which change nothing.
            if is_transient_aws_error(exc):
                raise TransientBridgeError(f"deleting message {message_id}: {exc}") from exc
            self.stats.errors += 1
            log.error("SQS message %s delivered but not deleted (%s: %s); it will be received again",
                      message_id, type(exc).__name__, exc)
            return False
        self.stats.deleted += 1
        if self.keeper is not None:
            self.keeper.accept([event.model_dump(mode="json") for event in posted])
        return True

    # -- the run keeper ----------------------------------------------------------------------------------
    def _load_markers(self) -> None:
        """Follow again the uploads of the last ``bridge_keep_window_s`` from their markers (after a restart)."""
        root = self.settings.event_marker_root
        if self.keeper is None or not root:
            return
        bucket, prefix = split_s3_uri(root)
        try:
            loaded = self.keeper.load_markers(self.publisher.s3, bucket, prefix.rstrip("/") + "/" if prefix else "")
        except Exception as exc:  # noqa: BLE001 - the keeper is a safety net; the bridge runs without it
            log.warning("run keeper: could not read the markers under %s (%s); following new uploads only", root, exc)
            return
        log.info("run keeper: following %d upload(s) accepted in the last %.0f s", loaded,
                 self.settings.bridge_keep_window_s)

    def keep(self) -> dict[str, int] | None:
        """One sweep of the run keeper (``keeper.RunKeeper.sweep``); a failed sweep is logged and tried again later."""
        if self.keeper is None:
            return None
        try:
            did = self.keeper.sweep()
        except (TransientBridgeError, PermanentBridgeError) as exc:
            log.warning("run keeper: %s; trying again in %.0f s", exc, self.settings.bridge_keep_s)
            return None
        if did["reposted"] or did["rescheduled"] or did["gave_up"]:
            log.info("run keeper: %s", ", ".join(f"{k}={v}" for k, v in did.items()))
        return did

    # -- the loop ------------------------------------------------------------------------------------
    def poll_once(self) -> int:
        """One long-poll receive and the handling of what it returned; returns the number of messages.

        Raises:
            TransientBridgeError: SQS unreachable, or a message hit a transient failure.
        """
        try:
            response = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=self.settings.bridge_batch,
                WaitTimeSeconds=self.settings.bridge_wait_s,
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
        except Exception as exc:  # noqa: BLE001 - classified right here
            if is_transient_aws_error(exc):
                raise TransientBridgeError(f"SQS receive from {self.queue_url}: {exc}") from exc
            if _client_error_code(exc) in MISSING_QUEUE_CODES:  # being re-created (a stack restart, a redeploy)
                raise TransientBridgeError(f"SQS queue {self.queue_url} does not exist (yet); waiting for it") \
                    from exc
            raise
        messages = response.get("Messages", [])
        failure: TransientBridgeError | None = None
        for message in messages:
            try:
                self.handle(message)
            except TransientBridgeError as exc:
                self.stats.errors += 1
                failure = failure or exc
            except Exception:  # noqa: BLE001 - one message must never stop the bridge
                self.stats.errors += 1
                log.exception("SQS message %s could not be handled, left on the queue",
                              message.get("MessageId", "?") if isinstance(message, dict) else "?")
        if failure is not None:
            raise failure
        return len(messages)

    def run(self, *, max_messages: int | None = None, stats_every_s: float = 60.0) -> BridgeStats:
        """Poll until interrupted (or until ``max_messages`` were received), backing off after errors.

        Args:
            max_messages: stop after this many messages (None: run until SIGINT/SIGTERM).
            stats_every_s: how often to log the counters (seconds).

        Returns:
            The counters at exit.
        """
        log.info("events bridge: %s → %s/events", self.queue_url, self.api_url.rstrip("/"))
        last_stats = time.monotonic()
        self._load_markers()
        last_keep = time.monotonic()
        try:
            while max_messages is None or self.stats.messages < max_messages:
                try:
                    self.poll_once()
                    self._failures = 0
                except TransientBridgeError as exc:
                    self._failures += 1
                    pause = jittered(backoff_s(self._failures, 0.5, self.settings.bridge_backoff_max_s))
                    log.warning("%s; retrying in %.1f s", exc, pause)
                    time.sleep(pause)
                if self.keeper is not None and time.monotonic() - last_keep >= self.settings.bridge_keep_s:
                    self.keep()
                    last_keep = time.monotonic()
                if time.monotonic() - last_stats >= stats_every_s:
                    log.info("stats: %s", self.stats.line())
                    last_stats = time.monotonic()
        except KeyboardInterrupt:
            log.info("interrupted")
        log.info("stopped; stats: %s", self.stats.line())
        return self.stats
