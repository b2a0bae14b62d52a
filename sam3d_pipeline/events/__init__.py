"""S3 upload events → Prefect events: the parser (pure), its settings, and the SQS bridge loop."""

from .parse import (
    EVENT_NAME,
    EventFilter,
    MalformedMessageError,
    ObjectCreated,
    parse_message,
    prefect_event,
    resolve_prompt,
)

__all__ = [
    "EVENT_NAME",
    "EventFilter",
    "MalformedMessageError",
    "ObjectCreated",
    "parse_message",
    "prefect_event",
    "resolve_prompt",
]
