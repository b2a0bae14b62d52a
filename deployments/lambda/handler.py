"""AWS Lambda entry for the event path: S3 "Object Created" → Prefect event on a self-hosted API.

Three triggers work, told apart by the event's shape:

* an EventBridge rule (source ``aws.s3``, detail-type ``Object Created``, your bucket) invoking the function
  directly (https://docs.aws.amazon.com/AmazonS3/latest/userguide/ev-events.html);
* an S3 event notification invoking the function directly (``{"Records": [{"eventSource": "aws:s3", ...}]}``,
  https://docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure.html);
* an SQS queue receiving either of those (``{"Records": [{"eventSource": "aws:sqs", "messageId": ...,
  "body": "<S3 notification or EventBridge JSON>"}]}``, https://docs.aws.amazon.com/lambda/latest/dg/with-sqs.html).

Package it with ``pip install --target build/ . && cp deployments/lambda/handler.py build/`` (the library
brings the parser, the filter, the prompt lookup and the dedup markers shared with ``events-bridge``).

Environment: ``PREFECT_API_URL`` (required); the Prefect API key, if the API needs one, as
``PREFECT_API_KEY_SECRET_ARN`` (a Secrets Manager secret read once per cold start, so the key never sits in the
function's configuration; needs ``secretsmanager:GetSecretValue`` on it) or as ``PREFECT_API_KEY``; and the
``SAM3D_`` settings of ``sam3d_pipeline.events.settings.EventSettings`` (``SAM3D_OUTPUT_ROOT``,
``SAM3D_UPLOAD_PREFIX``, ``SAM3D_PROMPT_BY_PREFIX``, ``SAM3D_EVENT_MARKER_ROOT``). The role needs ``s3:GetObject``
on the uploads (HEAD reads the ``prompt`` metadata) and ``s3:GetObject``/``s3:PutObject`` on the marker root.
``deployments/infrastructure.yaml`` (``EventsBridgeMode=lambda``) creates the function from the service image with
exactly these permissions.

Failures: for a direct invocation the handler raises, so Lambda's retry policy and on-failure destination
(or DLQ) keep the event. For an SQS batch it answers a partial batch response naming the messages that
failed (malformed, refused, or not delivered), so only those return to the queue and reach its dead-letter
queue after ``maxReceiveCount`` receives; the rest are deleted. This needs ``ReportBatchItemFailures`` in
the event source mapping's ``FunctionResponseTypes``
(https://docs.aws.amazon.com/lambda/latest/dg/services-sqs-errorhandling.html); without it Lambda ignores
the answer and deletes the whole batch. Retries are harmless because the event id is deterministic.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sam3d_pipeline.events.bridge import UploadPublisher
from sam3d_pipeline.events.parse import MalformedMessageError, SqsMessage, parse_message, sqs_messages

log = logging.getLogger("sam3d_pipeline.events.lambda")
logging.getLogger().setLevel(logging.INFO)
_publisher: UploadPublisher | None = None


def prefect_api_key() -> str | None:
    """The Prefect API key: the secret ``PREFECT_API_KEY_SECRET_ARN`` names, else ``PREFECT_API_KEY``, else None."""
    secret_arn = os.environ.get("PREFECT_API_KEY_SECRET_ARN")
    if not secret_arn:
        return os.environ.get("PREFECT_API_KEY")
    import boto3

    return boto3.client("secretsmanager").get_secret_value(SecretId=secret_arn)["SecretString"].strip()


def _get_publisher() -> UploadPublisher:
    global _publisher
    if _publisher is None:  # one S3 client and one secret read per warm container
        _publisher = UploadPublisher(os.environ["PREFECT_API_URL"], api_key=prefect_api_key())
    return _publisher


def _handle_message(publisher: UploadPublisher, message: SqsMessage) -> bool:
    """Publish one SQS message's uploads; False when it failed (the reason is logged) and must stay queued."""
    try:
        records = parse_message(message.body)
    except MalformedMessageError as exc:
        log.error("malformed SQS message %s (receive #%s), left for the dead-letter queue: %s",
                  message.message_id, message.receive_count, exc)
        return False
    try:
        publisher.publish(records)
    except Exception:  # noqa: BLE001 - reported in batchItemFailures; the message is retried, then redriven
        log.exception("SQS message %s (receive #%s) not delivered; it stays on the queue",
                      message.message_id, message.receive_count)
        return False
    return True


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Lambda handler.

    Args:
        event: an EventBridge event from S3, an S3 notification ``{"Records": [...]}``, or an SQS batch
            whose message bodies are either (optionally in an SNS envelope).
        context: the Lambda context (unused).

    Returns:
        Direct invocation: ``{"posted": [event ids], "records": n}``.
        SQS batch: ``{"batchItemFailures": [{"itemIdentifier": messageId}, ...]}``, the partial batch
        response (an empty list: every message is done and Lambda deletes them all).

    Raises:
        MalformedMessageError: a direct event that is not an S3 event, or an SQS batch with a record that
            has no ``messageId`` (no partial response can name it, so the whole batch is retried).
        TransientBridgeError, PermanentBridgeError: direct invocation only, the Prefect API did not take the event.
    """
    publisher = _get_publisher()
    messages = sqs_messages(event)
    if messages is None:
        records = parse_message(event)
        posted = publisher.publish(records)
        return {"posted": [str(e.id) for e in posted], "records": len(records)}
    failures = [{"itemIdentifier": m.message_id} for m in messages if not _handle_message(publisher, m)]
    if failures:
        log.warning("%d of %d SQS messages failed and stay on the queue", len(failures), len(messages))
    return {"batchItemFailures": failures}
