"""Webhooks of the job API: the signature, the retry schedule, and the delivery loop.

A job that gave a ``webhook_url`` gets the job JSON POSTed there once its run reaches a final state (completed,
failed, crashed or cancelled: whatever ended it, not only the flow's own end). Headers:

- ``X-Sam3d-Timestamp``: unix seconds when the attempt was signed;
- ``X-Sam3d-Signature``: ``sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`` (:func:`sign`; receivers
  check it with :func:`verify`, which also refuses stale timestamps);
- ``X-Sam3d-Delivery``: the job id, the same on every attempt (receivers drop duplicates with it).

A non-2xx answer, a timeout or a refused connection is retried after ``backoff_s`` (1 s, 2 s, 4 s, ... up to
``SAM3D_WEBHOOK_BACKOFF_MAX_S``), up to ``SAM3D_WEBHOOK_MAX_ATTEMPTS`` attempts in all. Every attempt is recorded
on the job before the next decision, by the :class:`WebhookStore` (the web server keeps them in Prefect, with the
run), so a restarted server resumes the schedule where it stopped and never re-sends a delivered webhook. The
one gap: a server killed between a receiver's 2xx and recording it sends that webhook once more (at least once).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

SIGNATURE_HEADER = "X-Sam3d-Signature"
TIMESTAMP_HEADER = "X-Sam3d-Timestamp"
DELIVERY_HEADER = "X-Sam3d-Delivery"
SIGNATURE_TOLERANCE_S = 300
ERROR_MAX_CHARS = 300

log = logging.getLogger(__name__)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``, the ``X-Sam3d-Signature`` header."""
    digest = hmac.new(secret.encode(), f"{int(timestamp)}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(secret: str, timestamp: str | int, body: bytes, signature: str, *, now: float | None = None,
           tolerance_s: float = SIGNATURE_TOLERANCE_S) -> bool:
    """True when ``signature`` signs ``body`` at ``timestamp`` with ``secret`` and the timestamp is within
    ``tolerance_s`` of ``now`` (a replayed old delivery fails). Compares in constant time."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body).encode(), str(signature).encode())


def backoff_s(attempts_made: int, base_s: float, max_s: float) -> float:
    """The wait after ``attempts_made`` failed attempts before the next one: ``base_s * 2**(n-1)``, at most
    ``max_s`` (1, 2, 4, 8 ... seconds with a 1 s base)."""
    if attempts_made < 1:
        return 0.0
    return min(max_s, base_s * 2 ** min(attempts_made - 1, 60))


@dataclass(frozen=True)
class Schedule:
    """How a job's webhook is retried (from settings)."""

    max_attempts: int = 8
    base_s: float = 1.0
    max_s: float = 600.0


@dataclass(frozen=True)
class Decision:
    """What to do with a job's webhook now.

    Attributes:
        action: ``deliver`` (an attempt is due), ``wait`` (the next attempt is due at ``due_at``), ``delivered``
            (a receiver answered 2xx) or ``gave_up`` (every allowed attempt failed).
        due_at: unix seconds of the next attempt (``deliver`` / ``wait``).
    """

    action: str
    due_at: float | None = None


def decide(attempts: list[dict[str, Any]], schedule: Schedule, now: float) -> Decision:
    """The next step for a webhook, from its recorded attempts (each with ``ok`` and ``at_unix``)."""
    if any(a.get("ok") for a in attempts):
        return Decision("delivered")
    if len(attempts) >= schedule.max_attempts:
        return Decision("gave_up")
    if not attempts:
        return Decision("deliver", now)
    due = float(attempts[-1]["at_unix"]) + backoff_s(len(attempts), schedule.base_s, schedule.max_s)
    return Decision("deliver", due) if due <= now else Decision("wait", due)


def body_bytes(job: dict[str, Any]) -> bytes:
    """The exact bytes POSTed (and signed): compact JSON, UTF-8."""
    return json.dumps(job, separators=(",", ":"), ensure_ascii=False).encode()


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> tuple[int | None, str | None]:
    """POST once; returns (status code, None) on an answer, (None, reason) when there was none. Redirects are not
    followed (a receiver moved is a failed attempt, never a delivery to somewhere else)."""
    import httpx

    try:
        response = httpx.post(url, content=body, headers=headers, timeout=timeout_s, follow_redirects=False)
    except httpx.TimeoutException:
        return None, f"no answer within {timeout_s:g} s"
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:ERROR_MAX_CHARS]
    return response.status_code, None


def attempt_once(job: dict[str, Any], url: str, secret: str, timeout_s: float,
                 send: Callable[..., tuple[int | None, str | None]] = post,
                 clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Sign and POST ``job`` to ``url`` once; returns the attempt's record: ``number`` (filled by the caller),
    ``at`` (ISO 8601), ``at_unix``, ``status_code``, ``ok`` (2xx), ``error`` and ``duration_ms``."""
    body = body_bytes(job)
    started = clock()
    timestamp = int(started)
    headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: str(timestamp),
               SIGNATURE_HEADER: sign(secret, timestamp, body), DELIVERY_HEADER: str(job.get("id", "")),
               "User-Agent": "sam3d-pipeline-webhooks"}
    status, error = send(url, body, headers, timeout_s)
    ok = status is not None and 200 <= status < 300
    if status is not None and not ok:
        error = f"answered {status}"
    return {"at": datetime.fromtimestamp(started, UTC).isoformat(timespec="milliseconds"), "at_unix": started,
            "status_code": status, "ok": ok, "error": error, "duration_ms": round((clock() - started) * 1000, 1)}


class WebhookStore(Protocol):
    """Where jobs and their delivery attempts live (the web server: Prefect)."""

    def pending(self) -> list[tuple[str, str]]:
        """(job id, webhook URL) of every job that ended and whose webhook is neither delivered nor given up."""

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        """The attempts recorded for the job, oldest first."""

    def record(self, job_id: str, attempts: list[dict[str, Any]]) -> None:
        """Store the job's attempts (all of them, the newest last)."""

    def settle(self, job_id: str) -> None:
        """Stop watching the job: its webhook was delivered or given up."""

    def job_body(self, job_id: str, attempts: list[dict[str, Any]]) -> dict[str, Any]:
        """The job JSON to send, with ``attempts`` as its webhook attempts so far."""


class WebhookDeliverer:
    """Delivers due webhooks: one pass with :meth:`run_once`, or a background thread with :meth:`start`.

    Args:
        store: the jobs and their attempts.
        secret: the HMAC key.
        schedule: attempts and backoff.
        timeout_s: a receiver slower than this failed.
        poll_s: seconds between passes of the background thread.
        send, clock: the HTTP POST and the clock (tests pass their own).
    """

    def __init__(self, store: WebhookStore, secret: str, schedule: Schedule, timeout_s: float = 10.0,
                 poll_s: float = 2.0, send: Callable[..., tuple[int | None, str | None]] = post,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.secret, self.schedule = store, secret, schedule
        self.timeout_s, self.poll_s, self.send, self.clock = timeout_s, poll_s, send, clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> dict[str, str]:
        """One pass over the pending jobs; returns job id → what happened (``delivered``, ``failed``, ``wait``,
        ``gave_up``, or ``error`` when reading the job failed: logged, tried again next pass)."""
        outcome = {}
        for job_id, url in self.store.pending():
            try:
                outcome[job_id] = self._advance(job_id, url)
            except Exception:  # noqa: BLE001 (one job's trouble, e.g. its storage refusing, must not stop the others)
                log.exception("webhook %s: this pass failed; the next one tries again", job_id)
                outcome[job_id] = "error"
        return outcome

    def _advance(self, job_id: str, url: str) -> str:
        """Settle, wait for, or attempt one job's webhook; returns what happened."""
        attempts = self.store.attempts(job_id)
        decision = decide(attempts, self.schedule, self.clock())
        if decision.action in ("delivered", "gave_up"):
            self.store.settle(job_id)
            return decision.action
        if decision.action == "wait":
            return "wait"
        record = attempt_once(self.store.job_body(job_id, attempts), url, self.secret, self.timeout_s,
                              self.send, self.clock)
        attempts = [*attempts, {"number": len(attempts) + 1, **record}]
        self.store.record(job_id, attempts)
        log.info("webhook %s attempt %d → %s", job_id, len(attempts), record["status_code"] or record["error"])
        after = decide(attempts, self.schedule, self.clock())
        if after.action in ("delivered", "gave_up"):
            self.store.settle(job_id)
            if after.action == "gave_up":
                log.warning("webhook %s: gave up after %d attempts", job_id, len(attempts))
        return "delivered" if record["ok"] else ("gave_up" if after.action == "gave_up" else "failed")

    def start(self) -> None:
        """Run passes every ``poll_s`` in a daemon thread until :meth:`stop`; a failing pass is logged and the
        next one tries again (the store keeps every attempt, so nothing is lost)."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.run_once()
                except Exception:  # noqa: BLE001 (Prefect or storage unreachable: the next pass retries)
                    log.exception("webhook pass failed; retrying in %.1f s", self.poll_s)
                self._stop.wait(self.poll_s)

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="sam3d-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
