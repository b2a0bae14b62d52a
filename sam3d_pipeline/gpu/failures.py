"""Why a GPU stage run ended badly, and whether trying again can help.

A GPU stage runs as a background task (a task run) served by a GPU worker session (a flow run on the ECS GPU pool).
What ended it badly is classified here, without Prefect, so the rule is testable and shared by every caller: the
task run's final state and message (the stage's own exception), or, when the worker was lost mid-task, its session's
final state and message (written by Prefect's ECS worker from the ECS task's ``stoppedReason`` / container
exit) or a stale lease.

Classes:
- ``no_capacity``: ECS could not place the task (``RESOURCE:GPU``, ``RESOURCE:MEMORY``, no container
  instances, capacity provider still scaling out). Transient: the auto scaling group starts an instance.
- ``spot_interruption``: the instance was reclaimed or drained (spot interruption, host terminated).
- ``oom``: CUDA or host out of memory (``CUDA out of memory``, ``OutOfMemoryError``, exit code 137).
  Retried once more with the low-memory settings.
- ``crashed``: the process died for another infrastructure reason (Prefect ``CRASHED``). Transient.
- ``transient``: the stage raised one of our transient errors (S3 5xx/throttling inside the stage). Transient.
- ``failed``: the stage itself raised (bad input, missing checkpoint). Permanent: never retried.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from sam3d_pipeline.errors import PipelineError

NO_CAPACITY = re.compile(
    r"RESOURCE:GPU|RESOURCE:MEMORY|RESOURCE:CPU|No Container Instances were found|"
    r"no container instances|capacity provider .*(?:scal|provision)|Capacity is unavailable|"
    r"InsufficientInstanceCapacity|Unable to place",
    re.IGNORECASE,
)
SPOT = re.compile(
    r"spot interruption|SpotInterruption|instance .*(?:terminated|retired|drain)|Host EC2 .* terminated|"
    r"Task stopped because the underlying instance|EC2 instance .* is being drained",
    re.IGNORECASE,
)
OOM = re.compile(
    r"CUDA out of memory|OutOfMemoryError|OutOfMemory|out of memory|exit code:? 137|exited with code 137|"
    r"OOMKilled|Killed \(signal 9\)",
    re.IGNORECASE,
)
TRANSIENT_ERRORS = re.compile(r"\b(?:TransientStorageError|TransientError)\b")
TRANSIENT_KINDS = frozenset({"no_capacity", "spot_interruption", "oom", "crashed", "transient"})


@dataclass(frozen=True)
class StageAttempt:
    """One try of a GPU stage: what happened and what we decided.

    Attributes:
        attempt: 1-based attempt number.
        flow_run_id: the stage's task run id (the key keeps its first name: ``result.json`` reports it).
        state: final state name (``COMPLETED``, ``CRASHED``, ``FAILED``, ...).
        kind: ``ok`` or a failure class (module docstring).
        message: the state message, trimmed to 500 characters.
        low_memory: whether this attempt ran with the low-memory settings.
    """

    attempt: int
    flow_run_id: str
    state: str
    kind: str
    message: str
    low_memory: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def line(self) -> str:
        mode = ", low-memory" if self.low_memory else ""
        return f"attempt {self.attempt}{mode}: {self.state} ({self.kind}) {self.message}".rstrip()


def classify(state_type: str, message: str | None) -> str:
    """Classify a finished stage run.

    Args:
        state_type: Prefect state type name: ``COMPLETED``, ``FAILED``, ``CRASHED``, ``CANCELLED``, ...
        message: the state's message (may be None).

    Returns:
        ``ok``, ``no_capacity``, ``spot_interruption``, ``oom``, ``crashed``, ``transient``, ``cancelled`` or
        ``failed``.
    """
    state_type = (state_type or "").upper()
    text = message or ""
    if state_type == "COMPLETED":
        return "ok"
    if state_type in ("CANCELLED", "CANCELLING"):
        return "cancelled"
    # OOM can surface as a flow failure (torch raised) or a crash (the kernel killed the process).
    if OOM.search(text):
        return "oom"
    if NO_CAPACITY.search(text):
        return "no_capacity"
    if SPOT.search(text):
        return "spot_interruption"
    if state_type == "CRASHED":
        return "crashed"
    if TRANSIENT_ERRORS.search(text):
        return "transient"
    return "failed"


def next_low_memory(kind: str, low_memory: bool) -> bool:
    """Whether the next attempt runs with the low-memory settings (after an OOM, and from then on)."""
    return low_memory or kind == "oom"


def should_retry(kind: str, attempt: int, max_attempts: int, low_memory: bool) -> bool:
    """Retry transient kinds while attempts remain; an OOM already in low-memory mode is final."""
    if kind not in TRANSIENT_KINDS or attempt >= max_attempts:
        return False
    return not (kind == "oom" and low_memory)


class GpuStageError(PipelineError):
    """A GPU stage run did not complete after its retries (or failed permanently); ``attempts`` says why."""

    code = "gpu_stage_failed"

    def __init__(self, message: str, attempts: list[StageAttempt]):
        super().__init__(message)
        self.attempts = attempts
