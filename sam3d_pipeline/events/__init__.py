"""S3 upload events → Prefect events: the parser (pure), its settings, and the SQS bridge loop."""

from sam3d_pipeline.events.parse import (
    EVENT_NAME,
    EventFilter,
    MalformedMessageError,
    ObjectCreated,
    SqsMessage,
    parse_message,
    prefect_event,
    resolve_prompt,
    sqs_messages,
)

__all__ = [
    "EVENT_NAME",
    "EventFilter",
    "MalformedMessageError",
    "ObjectCreated",
    "SqsMessage",
    "parse_message",
    "prefect_event",
    "resolve_prompt",
    "sqs_messages",
]
