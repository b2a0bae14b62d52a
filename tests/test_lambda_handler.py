"""The Lambda handler on real local S3 (moto) and a local events API: direct events and SQS batches.

An SQS batch is answered with a partial batch response: malformed or undelivered messages are named in
``batchItemFailures`` (they stay on the queue, then go to its dead-letter queue); the others are published.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from sam3d_pipeline.events.parse import MalformedMessageError

from .test_events_fuzz import EVENTBRIDGE, EventsApi, malformed_bodies, s3_notification

HANDLER = Path(__file__).resolve().parents[1] / "deployments" / "lambda" / "handler.py"


@pytest.fixture
def lambda_env(s3, monkeypatch):
    """(handler module, S3 client, bucket, events API): a fresh module per test, so a fresh publisher."""
    client, bucket = s3
    with EventsApi() as api:
        monkeypatch.setenv("PREFECT_API_URL", api.url)
        spec = importlib.util.spec_from_file_location("lambda_handler", HANDLER)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module, client, bucket, api


def eventbridge_event(bucket: str, key: str) -> dict:
    event = json.loads(json.dumps(EVENTBRIDGE))
    event["detail"]["bucket"]["name"] = bucket
    event["detail"]["object"]["key"] = key
    return event


def sqs_event(bodies: dict[str, str]) -> dict:
    """A Lambda event from an SQS queue (the shape in the Lambda developer guide), one record per body."""
    return {"Records": [{
        "messageId": message_id, "receiptHandle": f"handle-{message_id}", "body": body,
        "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1764057600000"},
        "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:uploads", "awsRegion": "us-east-1",
    } for message_id, body in bodies.items()]}


def test_sqs_batch_reports_only_the_bad_messages(lambda_env, caplog):
    module, client, bucket, api = lambda_env
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        client.put_object(Bucket=bucket, Key=f"uploads/{name}", Body=b"jpeg", Metadata={"prompt": name[0]})
    good = {
        "good-notification": s3_notification(bucket, "uploads/a.jpg"),
        "good-eventbridge": json.dumps(eventbridge_event(bucket, "uploads/b.jpg")),
        "good-sns": json.dumps({"Type": "Notification", "Message": s3_notification(bucket, "uploads/c.jpg")}),
        "test-event": json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": bucket}),
    }
    bad = malformed_bodies(bucket)
    caplog.set_level(logging.INFO)
    answer = module.handler(sqs_event({**good, **bad}), None)
    assert answer == {"batchItemFailures": [{"itemIdentifier": name} for name in bad]}
    assert sorted(e["payload"]["key"] for e in api.events) == ["uploads/a.jpg", "uploads/b.jpg", "uploads/c.jpg"]
    assert sorted(e["payload"]["prompt"] for e in api.events) == ["a", "b", "c"]
    logged = [r.getMessage() for r in caplog.records if "malformed SQS message" in r.getMessage()]
    assert len(logged) == len(bad) and all(len(line) < 500 for line in logged)


def test_sqs_batch_with_the_api_down_fails_each_message_not_the_batch(lambda_env):
    module, client, bucket, api = lambda_env
    client.put_object(Bucket=bucket, Key="uploads/a.jpg", Body=b"jpeg")
    api.status = 503
    answer = module.handler(sqs_event({"m1": s3_notification(bucket, "uploads/a.jpg"), "m2": "[]"}), None)
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m1"}, {"itemIdentifier": "m2"}]}
    api.status = 200  # the retried message goes through
    assert module.handler(sqs_event({"m1": s3_notification(bucket, "uploads/a.jpg")}), None) == {
        "batchItemFailures": []}
    assert len(api.events) == 2 and api.events[0]["id"] == api.events[1]["id"]


def test_sqs_batch_without_message_ids_fails_as_a_whole(lambda_env):
    module, _, bucket, _ = lambda_env
    event = sqs_event({"m1": s3_notification(bucket, "uploads/a.jpg")})
    del event["Records"][0]["messageId"]
    with pytest.raises(MalformedMessageError, match=r"missing Records\[0\]\.messageId"):
        module.handler(event, None)


def test_direct_eventbridge_and_s3_notification_still_publish(lambda_env):
    module, client, bucket, api = lambda_env
    client.put_object(Bucket=bucket, Key="uploads/red chair.jpg", Body=b"jpeg", Metadata={"prompt": "chair"})
    first = module.handler(eventbridge_event(bucket, "uploads/red+chair.jpg"), None)
    second = module.handler(json.loads(s3_notification(bucket, "uploads/red+chair.jpg")), None)
    assert first["records"] == second["records"] == 1
    assert first["posted"] == second["posted"]  # the same upload seen by both paths: one event id
    with pytest.raises(MalformedMessageError):
        module.handler({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                                     "s3": {"bucket": {"name": bucket}, "object": {"key": "k", "size": 1e400}}}]})
    assert [e["payload"]["key"] for e in api.events] == ["uploads/red chair.jpg"] * 2
