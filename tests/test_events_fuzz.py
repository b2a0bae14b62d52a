"""Bad messages: the parser fuzzed, and every class of bad message sent through the real bridge loop.

Fuzz: whatever a body holds, parsing ends in valid records or ``MalformedMessageError``. Bodies are valid
notifications with one field replaced, removed or wrapped (wrong types, non-finite numbers, huge integers,
deep nesting, bad percent-encoding, lone surrogates), SNS envelopes around such bodies, Lambda SQS batches
around them, and arbitrary text and bytes. Deterministic (``derandomize``, no example database).

Loop: one message per class on a moto SQS queue, then a good one; the bridge logs each bad one, leaves it
on the queue for the redrive policy, and posts the good one to a local events API.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sam3d_pipeline.events.bridge import EventsBridge
from sam3d_pipeline.events.parse import (
    MAX_KEY_BYTES,
    MalformedMessageError,
    ObjectCreated,
    parse_message,
    prefect_event,
    sqs_messages,
)
from sam3d_pipeline.events.settings import EventSettings

from .servers import FaultyProxy, free_port

FUZZ = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NOTIFICATION = {"Records": [{
    "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
    "eventTime": "2026-11-25T08:00:00.000Z", "eventName": "ObjectCreated:Put",
    "responseElements": {"x-amz-request-id": "REQ1", "x-amz-id-2": "host"},
    "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": "photos"},
           "object": {"key": "uploads/red+chair.jpg", "size": 1234, "eTag": "abc123", "versionId": "v1",
                      "sequencer": "0062"}},
}]}
EVENTBRIDGE = {
    "version": "0", "id": "17793124-05d4-b198-2fde-7ededc63b103", "detail-type": "Object Created",
    "source": "aws.s3", "account": "123456789012", "time": "2026-11-25T08:00:00Z", "region": "us-east-1",
    "detail": {"version": "0", "bucket": {"name": "photos"},
               "object": {"key": "uploads/red+chair.jpg", "size": 1234, "etag": "abc123", "version-id": "v1",
                          "sequencer": "0062"}},
}
DEEP = "__deep__"  # replaced in the text by a deeply nested value


def paths(value, prefix=()):
    """Every (path, value) inside a JSON value (dict keys and list indexes)."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, (*prefix, i))


ALL_PATHS = [(t, p) for t in (NOTIFICATION, EVENTBRIDGE) for p, _ in paths(t) if p]
# The values the parser reads (every leaf of the templates except version fields and x-amz-id-2).
LEAVES = [(t, p) for t in (NOTIFICATION, EVENTBRIDGE) for p, v in paths(t)
          if p and not isinstance(v, dict | list) and p[-1] not in ("version", "eventVersion", "x-amz-id-2")]

scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**18, max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12) | st.just(DEEP)
    | st.lists(st.sampled_from(["%", "%f", "%FF", "%C3", "%C3%BC", "+", "/", "a", "\ud800", "\x00", "é"]),
               max_size=8).map("".join)
    | st.integers(min_value=1020, max_value=4000).map(lambda n: "k" * n)
)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                           max_size=3), max_leaves=6)
odd_numbers = st.sampled_from([math.inf, -math.inf, math.nan, 10**400, -(10**30), 2**63, -1, 1.5, True, False])


@st.composite
def mutated(draw, where=ALL_PATHS, values=json_values) -> str:
    """A valid notification with one field replaced by one of ``values``, removed, or wrapped in a list."""
    template, path = draw(st.sampled_from(where))
    doc = copy.deepcopy(template)
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    action = draw(st.sampled_from(["replace", "replace", "remove", "wrap"]))
    if action == "remove" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "wrap":
        parent[path[-1]] = [parent[path[-1]]]
    else:
        parent[path[-1]] = draw(values)
    text = json.dumps(doc, allow_nan=True)
    depth = draw(st.integers(min_value=1, max_value=120_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    return text.replace(json.dumps(DEEP), opener * depth + "1" + closer * depth)


def decoded(text: str) -> dict | None:
    """The dict a Lambda runtime hands over for ``text`` (Python's json accepts NaN and Infinity), or None."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


bodies = (
    mutated()
    | mutated(LEAVES).map(decoded).filter(lambda d: d is not None)
    | mutated(LEAVES)
    | mutated(LEAVES, odd_numbers)
    | mutated(LEAVES).map(lambda text: json.dumps({"Type": "Notification", "Message": text}))
    | json_values.map(lambda v: json.dumps(v, allow_nan=True))
    | st.text(max_size=40)
    | st.binary(max_size=40)
)


def check_parse(body) -> list[ObjectCreated]:
    try:
        records = parse_message(body)
    except MalformedMessageError as exc:
        assert 0 < len(str(exc)) <= 400, str(exc)
        return []
    from prefect.events import Event

    for record in records:
        assert isinstance(record.bucket, str) and record.bucket
        assert isinstance(record.key, str) and 0 < len(record.key.encode("utf-8")) <= MAX_KEY_BYTES
        assert record.size is None or (type(record.size) is int and 0 <= record.size < 2**63)
        for text in (record.etag, record.sequencer, record.version_id, record.aws_event_id):
            assert text is None or isinstance(text, str)
        event = prefect_event(record, "chair")
        assert Event.model_validate_json(event.model_dump_json()) == event
    return records


@FUZZ
@given(bodies)
def test_any_body_parses_or_is_malformed(body):
    check_parse(body)


@FUZZ
@given(st.lists(st.tuples(st.text(min_size=1, max_size=8), bodies), min_size=1, max_size=3))
def test_any_lambda_sqs_batch_splits_into_messages(items):
    event = {"Records": [{"messageId": mid, "receiptHandle": "r", "body": body, "eventSource": "aws:sqs",
                          "attributes": {"ApproximateReceiveCount": "1"}} for mid, body in items]}
    messages = sqs_messages(event)
    assert [m.message_id for m in messages] == [mid for mid, _ in items]
    for message in messages:
        check_parse(message.body)


def test_the_issue_examples_are_malformed():
    infinite = json.loads(json.dumps(NOTIFICATION))
    infinite["Records"][0]["s3"]["object"]["size"] = math.inf
    for body in (json.dumps(infinite, allow_nan=True), "[" * 100_000 + "]" * 100_000,
                 '{"a":' * 100_000 + "1" + "}" * 100_000):
        try:
            parse_message(body)
        except MalformedMessageError:
            continue
        raise AssertionError(f"accepted {body[:60]!r}")


# -- the same classes of bad message through the real bridge loop (moto SQS and S3, a local events API) --------
class EventsApi:
    """A stand-in Prefect API on a loopback port: records each ``POST /events`` and answers ``status``.

    ``on_post`` (if set) runs before the answer, e.g. to arm a fault for the request that follows.
    """

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.posts: list[list[dict]] = []
        self.on_post = None
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.endswith("/events"):
                    api.posts.append(json.loads(body))
                if api.on_post is not None:
                    api.on_post()
                self.send_response(api.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/api"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def events(self) -> list[dict]:
        return [event for post in self.posts for event in post]

    def __enter__(self) -> EventsApi:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def s3_notification(bucket: str, key: str, **object_fields) -> str:
    doc = copy.deepcopy(NOTIFICATION)
    doc["Records"][0]["s3"]["bucket"]["name"] = bucket
    doc["Records"][0]["s3"]["object"].update({"key": key, **object_fields})
    return json.dumps(doc, allow_nan=True)


def malformed_bodies(bucket: str) -> dict[str, str]:
    """One body per class of bad message (all fit in an SQS message)."""
    def eventbridge(**changes) -> str:
        doc = copy.deepcopy(EVENTBRIDGE)
        doc["detail"]["bucket"]["name"] = bucket
        doc.update(changes)
        return json.dumps(doc)

    deep = '{"a":' * 40_000 + "1" + "}" * 40_000  # 240 kB: within SQS's default message size
    return {
        "size Infinity": s3_notification(bucket, "uploads/a.jpg", size=math.inf),
        "size NaN": s3_notification(bucket, "uploads/a.jpg", size=math.nan),
        "size huge": s3_notification(bucket, "uploads/a.jpg", size=10**400),
        "size string": s3_notification(bucket, "uploads/a.jpg", size="12"),
        "size bool": s3_notification(bucket, "uploads/a.jpg", size=True),
        "size list": s3_notification(bucket, "uploads/a.jpg", size=[1]),
        "objects 40000 deep": deep,
        "array 100000 deep": "[" * 100_000 + "]" * 100_000,
        "not an object": "[1, 2]",
        "key not a string": s3_notification(bucket, 17),
        "key too long": s3_notification(bucket, "k" * 1100),
        "key bad percent": s3_notification(bucket, "uploads/100%.jpg"),
        "key not UTF-8": s3_notification(bucket, "uploads/%FF%FE.jpg"),
        "key lone surrogate": s3_notification(bucket, "uploads/\ud800.jpg"),
        "records not a list": '{"Records": {"eventSource": "aws:s3"}}',
        "eventbridge detail missing": eventbridge(detail=None),
        "eventbridge detail a string": eventbridge(detail="x"),
        "sns message malformed": json.dumps({"Type": "Notification", "Message": '{"Records": [{"a": Infinity}]}'}),
        "not JSON": "this is not an S3 event",
    }


@pytest.fixture
def queue(moto_server):
    import boto3

    sqs = boto3.client("sqs", endpoint_url=moto_server.url)
    url = sqs.create_queue(QueueName=f"bridge-{uuid.uuid4().hex[:10]}", Attributes={"VisibilityTimeout": "60"})
    yield sqs, url["QueueUrl"]
    sqs.delete_queue(QueueUrl=url["QueueUrl"])


def queue_counts(sqs, url: str) -> tuple[int, int]:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def bridge_for(sqs, url: str, api: EventsApi, s3_client) -> EventsBridge:
    return EventsBridge(url, api.url, EventSettings(bridge_wait_s=0, bridge_backoff_max_s=0.5), sqs=sqs,
                        s3=s3_client)


def test_bridge_logs_every_bad_message_leaves_it_queued_and_goes_on(s3, queue, caplog):
    client, bucket = s3
    sqs, url = queue
    client.put_object(Bucket=bucket, Key="uploads/good.jpg", Body=b"jpeg", Metadata={"prompt": "chair"})
    bad = malformed_bodies(bucket)
    for body in bad.values():
        sqs.send_message(QueueUrl=url, MessageBody=body)
    sqs.send_message(QueueUrl=url, MessageBody=s3_notification(bucket, "uploads/good.jpg"))
    caplog.set_level(logging.INFO, logger="sam3d_pipeline.events")
    with EventsApi() as api:
        stats = bridge_for(sqs, url, api, client).run(max_messages=len(bad) + 1)
    assert (stats.malformed, stats.posted, stats.deleted, stats.errors) == (len(bad), 1, 1, 0)
    (event,) = api.events
    assert (event["payload"]["key"], event["payload"]["prompt"]) == ("uploads/good.jpg", "chair")
    assert queue_counts(sqs, url) == (0, len(bad))  # received, not deleted: the redrive policy decides
    logged = [r.getMessage() for r in caplog.records if "malformed SQS message" in r.getMessage()]
    assert len(logged) == len(bad)
    assert all(len(line) < 500 for line in logged), max(logged, key=len)


def test_an_unexpected_error_is_logged_with_its_traceback_and_the_loop_goes_on(s3, queue, caplog, monkeypatch):
    client, bucket = s3
    sqs, url = queue
    for key in ("uploads/boom.jpg", "uploads/fine.jpg"):
        client.put_object(Bucket=bucket, Key=key, Body=b"jpeg")
        sqs.send_message(QueueUrl=url, MessageBody=s3_notification(bucket, key))
    caplog.set_level(logging.INFO, logger="sam3d_pipeline.events")
    with EventsApi() as api:
        bridge = bridge_for(sqs, url, api, client)
        real_prepare = bridge.publisher.prepare

        def prepare(records):
            if any(r.key.endswith("boom.jpg") for r in records):
                raise KeyError("a bug in the handling of this message")
            return real_prepare(records)

        monkeypatch.setattr(bridge.publisher, "prepare", prepare)
        stats = bridge.run(max_messages=2)
    assert [e["payload"]["key"] for e in api.events] == ["uploads/fine.jpg"]
    assert (stats.deleted, stats.errors) == (1, 1)
    assert queue_counts(sqs, url) == (0, 1)
    (record,) = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert record.exc_info and record.exc_info[0] is KeyError  # the traceback is in the log


@pytest.mark.slow  # waits out a visibility timeout
def test_sqs_failing_on_delete_is_retried_not_fatal(moto_server, s3, queue):
    import boto3
    from botocore.config import Config

    client, bucket = s3
    _, url = queue
    proxy = FaultyProxy(moto_server.url).start()
    try:
        sqs = boto3.client("sqs", endpoint_url=proxy.url, config=Config(retries={"total_max_attempts": 1}))
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "1"})
        client.put_object(Bucket=bucket, Key="uploads/a.jpg", Body=b"jpeg")
        sqs.send_message(QueueUrl=url, MessageBody=s3_notification(bucket, "uploads/a.jpg"))
        with EventsApi() as api:
            # The request after the first POST is the DeleteMessage: SQS answers it 503 once.
            api.on_post = lambda: (proxy.fail_next(1, 503, "ServiceUnavailable"), setattr(api, "on_post", None))
            stats = bridge_for(sqs, url, api, client).run(max_messages=2)
    finally:
        proxy.stop()
    assert (stats.messages, stats.deleted) == (2, 1)
    assert len({e["id"] for e in api.events}) == 1 and len(api.events) == 2  # the same event id, twice
    assert queue_counts(sqs, url) == (0, 0)


def test_bridge_waits_for_a_queue_that_is_briefly_missing(s3, moto_server):
    """The queue is deleted under a running bridge and created again: the bridge backs off and goes on, and the
    upload sent to the new queue is posted."""
    import boto3

    client, bucket = s3
    sqs = boto3.client("sqs", endpoint_url=moto_server.url)
    name = f"bridge-{uuid.uuid4().hex[:10]}"
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    client.put_object(Bucket=bucket, Key="uploads/chair.jpg", Body=b"jpeg", Metadata={"prompt": "chair"})
    with EventsApi() as api:
        bridge = bridge_for(sqs, url, api, client)
        sqs.delete_queue(QueueUrl=url)
        done: list = []
        thread = threading.Thread(target=lambda: done.append(bridge.run(max_messages=1)), daemon=True)
        thread.start()
        time.sleep(2.0)  # the bridge meets the missing queue and backs off
        assert thread.is_alive(), "the bridge stopped when its queue was missing"
        url = sqs.create_queue(QueueName=name)["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody=s3_notification(bucket, "uploads/chair.jpg"))
        thread.join(timeout=60)
        assert done and done[0].posted == 1, done
    sqs.delete_queue(QueueUrl=url)
