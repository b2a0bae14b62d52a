"""AWS Lambda entry for the EventBridge path: S3 "Object Created" → Prefect event on a self-hosted API.

Wire an EventBridge rule (source ``aws.s3``, detail-type ``Object Created``, your bucket) to this function.
Package it with ``pip install --target build/ . && cp deployments/lambda/handler.py build/`` (the library
brings the parser, the filter, the prompt lookup and the dedup markers shared with ``events-bridge``).

Environment: ``PREFECT_API_URL`` (required), ``PREFECT_API_KEY`` (Prefect Cloud only), and the ``SAM3D_``
settings of ``sam3d_pipeline.events.settings.EventSettings`` (``SAM3D_OUTPUT_ROOT``, ``SAM3D_UPLOAD_PREFIX``,
``SAM3D_PROMPT_BY_PREFIX``, ``SAM3D_EVENT_MARKER_ROOT``). The role needs ``s3:GetObject`` on the uploads
(HEAD reads the ``prompt`` metadata) and ``s3:GetObject``/``s3:PutObject`` on the marker root.

A failure raises, so Lambda's retry policy and on-failure destination (or DLQ) keep the event; retries are
harmless because the event id is deterministic.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sam3d_pipeline.events.bridge import UploadPublisher
from sam3d_pipeline.events.parse import parse_message

logging.getLogger().setLevel(logging.INFO)
_publisher: UploadPublisher | None = None


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Lambda handler.

    Args:
        event: an EventBridge event from S3 (also accepts an S3 notification ``{"Records": [...]}``).
        context: the Lambda context (unused).

    Returns:
        ``{"posted": [event ids], "records": n}``.

    Raises:
        MalformedMessageError: the event is not an S3 event (not retried usefully: goes to the DLQ).
        TransientBridgeError, PermanentBridgeError: the Prefect API did not take the event.
    """
    global _publisher
    if _publisher is None:  # one S3 client per warm container
        _publisher = UploadPublisher(os.environ["PREFECT_API_URL"], api_key=os.environ.get("PREFECT_API_KEY"))
    records = parse_message(event)
    posted = _publisher.publish(records)
    return {"posted": [str(e.id) for e in posted], "records": len(records)}
