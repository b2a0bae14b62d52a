"""Fast tests of the pure event parser: shapes, key decoding, filters, prompts and deterministic event ids."""

from __future__ import annotations

import json
import re
import uuid

import pytest

from sam3d_pipeline.events.parse import (
    EVENT_NAME,
    EventFilter,
    MalformedMessageError,
    ObjectCreated,
    event_id,
    parse_message,
    prefect_event,
    resolve_prompt,
)
from sam3d_pipeline.events.settings import EventSettings


def notification(key: str, etag: str = "abc123", sequencer: str = "0062", name: str = "ObjectCreated:Put") -> str:
    return json.dumps({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-11-25T08:00:00.000Z", "eventName": name,
        "responseElements": {"x-amz-request-id": "REQ1"},
        "s3": {"bucket": {"name": "photos"}, "object": {"key": key, "size": 1234, "eTag": etag,
                                                         "sequencer": sequencer}},
    }]})


def eventbridge(key: str, etag: str = "abc123", sequencer: str = "0062") -> dict:
    return {
        "version": "0", "id": "17793124-05d4-b198-2fde-7ededc63b103", "detail-type": "Object Created",
        "source": "aws.s3", "account": "123456789012", "time": "2026-11-25T08:00:00Z", "region": "us-east-1",
        "resources": ["arn:aws:s3:::photos"],
        "detail": {"version": "0", "bucket": {"name": "photos"},
                   "object": {"key": key, "size": 1234, "etag": etag, "version-id": "v1", "sequencer": sequencer},
                   "request-id": "REQ1", "requester": "123456789012", "reason": "PutObject"},
    }


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        ("uploads/red+chair.jpg", "uploads/red chair.jpg"),
        ("uploads/a%2Bb.jpg", "uploads/a+b.jpg"),
        ("uploads%2Fnested%2Fdeep%2Fx.png", "uploads/nested/deep/x.png"),  # moto encodes '/'
        ("uploads/%C3%BCnic%C3%B6de+%D1%84%D0%BE%D1%82%D0%BE.png", "uploads/ünicöde фото.png"),
    ],
)
def test_keys_are_decoded_in_both_shapes(encoded, decoded):
    (a,) = parse_message(notification(encoded))
    (b,) = parse_message(eventbridge(encoded))
    assert a.key == b.key == decoded
    assert (a.bucket, a.size, a.etag, a.source) == ("photos", 1234, "abc123", "s3-notification")
    assert (b.version_id, b.source, b.aws_event_id) == ("v1", "eventbridge", "17793124-05d4-b198-2fde-7ededc63b103")


def test_eventbridge_delivered_through_sqs_as_text_and_sns_envelope():
    assert parse_message(json.dumps(eventbridge("k.jpg")))[0].key == "k.jpg"
    wrapped = json.dumps({"Type": "Notification", "Message": notification("a+b.jpg")})
    assert parse_message(wrapped)[0].key == "a b.jpg"


def test_test_events_and_other_event_types_start_nothing():
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "photos", "RequestId": "x"}
    assert parse_message(json.dumps(test_event)) == []
    assert parse_message(notification("a.jpg", name="ObjectRemoved:Delete")) == []
    assert parse_message({**eventbridge("a.jpg"), "detail-type": "Object Deleted"}) == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"hello": 1}', "neither an S3 notification"),
        ('{"Records": {}}', "Records is not a list"),
        ('{"Records": [{"eventSource": "aws:sqs"}]}', "eventSource"),
        ('{"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"},'
         ' "object": {}}}]}', "missing Records[0].s3.object.key"),
        (json.dumps({**eventbridge("x"), "detail": {"bucket": {"name": "b"}}}), "missing detail.object"),
    ],
)
def test_malformed_messages_say_why(body, reason):
    with pytest.raises(MalformedMessageError, match=re.escape(reason)):
        parse_message(body)


def obj(key: str, bucket: str = "photos", etag: str = "e1", sequencer: str = "01") -> ObjectCreated:
    return ObjectCreated(bucket=bucket, key=key, size=1, etag=etag, version_id=None, sequencer=sequencer,
                         source="s3-notification")


def test_filter_prefix_suffix_and_ignored_roots():
    f = EventFilter(prefix="uploads/", suffixes=(".jpg", ".png"), ignored=(("photos", "uploads/out/"),))
    assert f.reason_to_skip(obj("uploads/a.JPG")) is None
    assert "upload prefix" in f.reason_to_skip(obj("other/a.jpg"))
    assert "not one of" in f.reason_to_skip(obj("uploads/a.txt"))
    assert "own prefix" in f.reason_to_skip(obj("uploads/out/x-1/mask.png"))
    assert f.reason_to_skip(obj("uploads/out/x.png", bucket="elsewhere")) is None
    assert "folder" in f.reason_to_skip(obj("uploads/dir/"))


def test_settings_always_ignore_output_and_marker_roots(monkeypatch):
    monkeypatch.setenv("SAM3D_OUTPUT_ROOT", "s3://photos/outputs")
    monkeypatch.setenv("SAM3D_EVENT_MARKER_ROOT", "s3://photos/_sam3d/events/")
    monkeypatch.setenv("SAM3D_PROMPT_BY_PREFIX", '{"mugs/": "mug"}')
    settings = EventSettings()
    f = settings.event_filter()
    assert f.reason_to_skip(obj("outputs/a-123/mask.png"))
    assert f.reason_to_skip(obj("_sam3d/events/x.png"))
    assert f.reason_to_skip(obj("outputs-2/a.png")) is None  # a sibling prefix is not the output root
    assert settings.prompt_by_prefix == {"mugs/": "mug"}


def test_prompt_metadata_then_longest_prefix_then_default():
    mapping = {"uploads/": "object on a table", "uploads/mugs/": "mug"}
    assert resolve_prompt({"prompt": " red chair "}, "uploads/mugs/a.jpg", mapping) == "red chair"
    assert resolve_prompt({"prompt": "  "}, "uploads/mugs/a.jpg", mapping) == "mug"
    assert resolve_prompt({}, "uploads/a.jpg", mapping) == "object on a table"
    assert resolve_prompt(None, "elsewhere/a.jpg", mapping) is None


def test_event_id_is_deterministic_over_upload_identity():
    first = event_id(obj("a.jpg", sequencer="01"), "chair")
    assert first == event_id(obj("a.jpg", sequencer="02"), "chair")  # re-upload of the same bytes
    assert first != event_id(obj("a.jpg", etag="e2"), "chair")  # new content
    assert first != event_id(obj("b.jpg"), "chair")
    assert first != event_id(obj("a.jpg"), "table")  # another prompt is another result
    (n,) = parse_message(notification("a.jpg"))
    (e,) = parse_message(eventbridge("a.jpg"))
    assert event_id(n, None) == event_id(e, None)  # the same upload seen by both paths
    assert event_id(ObjectCreated("b", "k", None, "", None, "s1", "x"), None) != event_id(
        ObjectCreated("b", "k", None, "", None, "s2", "x"), None
    )


def test_prefect_event_shape():
    from prefect.events import Event

    (record,) = parse_message(notification("uploads/red+chair.jpg"))
    typed = prefect_event(record, "red chair")
    assert isinstance(typed, Event) and typed.id == event_id(record, "red chair")
    event = typed.model_dump(mode="json")  # the JSON POST /api/events takes
    assert event["event"] == EVENT_NAME == "aws.s3.object.created"
    assert event["resource"]["prefect.resource.id"] == "aws.s3.object.photos/uploads/red chair.jpg"
    assert uuid.UUID(event["id"]).version == 5
    assert event["occurred"].startswith("2026-11-25T08:00:00")
    assert event["related"] == []
    assert event["payload"] == {
        "bucket": "photos", "key": "uploads/red chair.jpg", "size": 1234, "etag": "abc123", "version_id": None,
        "sequencer": "0062", "source": "s3-notification", "prompt": "red chair", "aws_event_id": "REQ1",
    }
    assert Event.model_validate_json(json.dumps(event)) == typed  # survives the trip through JSON


def record(**object_fields) -> dict:
    return {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "eventTime": "2026-11-25T08:00:00Z",
                         "s3": {"bucket": {"name": "photos"}, "object": {"key": "a.jpg", **object_fields}}}]}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (json.dumps(record(size=float("inf")), allow_nan=True), "non-finite number Infinity"),
        (json.dumps(record(size=float("nan")), allow_nan=True), "non-finite number NaN"),
        (json.dumps(record(size=0)).replace('"size": 0', '"size": 1e400'), "number '1e400' out of range"),
        (json.dumps(record(size=10**30)), "integer with 31 digits"),
        (json.dumps(record(size=2**63)), "Records[0].s3.object.size: Input should be less than or equal to"),
        (json.dumps(record(size=-1)), "Records[0].s3.object.size: Input should be greater than or equal to 0"),
        (json.dumps(record(size="12")), "Records[0].s3.object.size: Input should be a valid integer"),
        (json.dumps(record(size=True)), "Records[0].s3.object.size: Input should be a valid integer"),
        (json.dumps(record(size=1.0)), "Records[0].s3.object.size: Input should be a valid integer"),
        (json.dumps(record(key=["a"])), "Records[0].s3.object.key: Input should be a valid string"),
        (json.dumps(record(key="k" * 1025)), "decoded key is 1025 bytes"),
        (json.dumps(record(key="100%.jpg")), "invalid percent-encoding"),
        (json.dumps(record(key="%FF.jpg")), "not UTF-8"),
        (json.dumps(record(key="\ud800.jpg")), "Records[0].s3.object.key"),
        (json.dumps(record(eTag={"a": 1})), "Records[0].s3.object.eTag: Input should be a valid string"),
        (json.dumps({"Records": [{"eventSource": "aws:s3", "eventName": 7}]}), "Records[0].eventName"),
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 32"),
        ('{"a":' * 40_000 + "1" + "}" * 40_000, "nested deeper than 32"),
        ('{"a": "' + "x" * 300_000 + '"}', "longer than 262144 bytes"),
        (b"\xff\xfe{}", "not UTF-8"),
        (json.dumps({**eventbridge("x"), "detail": "x"}), "detail: Input should be a valid dictionary"),
        (json.dumps({k: v for k, v in eventbridge("x").items() if k != "detail"}), "missing detail"),
        (json.dumps({**eventbridge("x"), "time": "yesterday"}), "time: Value error, not an ISO-8601 time"),
        (json.dumps({"Type": "Notification", "Message": '{"Records": [{"a": NaN}]}'}),
         "in the SNS Message: non-finite"),
        (json.dumps({"Type": "Notification", "Message": 5}), "SNS envelope without a Message string"),
    ],
)
def test_every_class_of_bad_value_is_malformed_with_a_short_reason(body, reason):
    with pytest.raises(MalformedMessageError, match=re.escape(reason)) as caught:
        parse_message(body)
    assert len(str(caught.value)) <= 300


def test_decoded_events_are_checked_too():
    with pytest.raises(MalformedMessageError, match="size: Input should be a valid integer"):
        parse_message(record(size=float("inf")))  # a Lambda event arrives as a dict
    (obj,) = parse_message({**eventbridge("k.jpg"), "time": 1764057600})  # moto's EventBridge time: epoch seconds
    assert obj.event_time.isoformat() == "2025-11-25T08:00:00+00:00"


def test_sqs_messages_splits_a_lambda_batch_and_ignores_other_events():
    from sam3d_pipeline.events.parse import SqsMessage, sqs_messages

    batch = {"Records": [
        {"messageId": "m1", "body": notification("a.jpg"), "eventSource": "aws:sqs",
         "attributes": {"ApproximateReceiveCount": "3"}},
        {"messageId": "m2", "body": "oops", "eventSource": "aws:sqs"},
    ]}
    assert sqs_messages(batch) == [SqsMessage("m1", notification("a.jpg"), "3"), SqsMessage("m2", "oops", "?")]
    assert sqs_messages(json.loads(notification("a.jpg"))) is None
    assert sqs_messages(eventbridge("a.jpg")) is None
    with pytest.raises(MalformedMessageError, match=r"Records\[1\]\.messageId"):
        sqs_messages({"Records": [batch["Records"][0], {"messageId": 5, "eventSource": "aws:sqs"}]})
    with pytest.raises(MalformedMessageError, match=r"Records\[1\]\.eventSource"):
        sqs_messages({"Records": [batch["Records"][0], json.loads(notification("a.jpg"))["Records"][0]]})


@pytest.mark.parametrize("body", ['\\"' * 130_000, '"' + "\\" * 260_000, '"[' * 130_000, '"' * 260_000])
def test_pathological_bodies_are_refused_in_linear_time(body):
    import time

    started = time.perf_counter()
    with pytest.raises(MalformedMessageError, match=r"^(body is not JSON|JSON nested deeper)"):
        parse_message(body)
    assert time.perf_counter() - started < 1.0
