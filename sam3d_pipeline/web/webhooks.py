"""Webhooks of the job API: the signature, the retry schedule, and the delivery loop.

A job that gave a ``webhook_url`` gets the job JSON POSTed there once its run reaches a final state (completed,
failed, crashed or cancelled: whatever ended it, not only the flow's own end). Headers:

- ``X-Sam3d-Timestamp``: unix seconds when the attempt was signed;
- ``X-Sam3d-Signature``: ``sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`` (:func:`sign`; receivers
  check it with :func:`verify`, which also refuses stale timestamps);
- ``X-Sam3d-Delivery``: the job id, the same on every attempt (receivers drop duplicates with it).

Where a webhook may go is :mod:`.webhook_targets`: public addresses only unless allow-listed, checked at
submission and again on every attempt against the very address connected to. An attempt has one deadline for all
of it (``SAM3D_WEBHOOK_TIMEOUT_S``: resolving, connecting, sending, the answer and its body) and reads at most
``SAM3D_WEBHOOK_MAX_RESPONSE_BYTES`` of the answer's body; attempts run in a small pool of threads
(``SAM3D_WEBHOOK_WORKERS``), so a slow receiver holds one thread for one deadline, never the others' webhooks.

A non-2xx answer, a timeout, a refused connection, an unresolved name or an oversized answer is retried after
``backoff_s`` (1 s, 2 s, 4 s, ... up to ``SAM3D_WEBHOOK_BACKOFF_MAX_S``), up to ``SAM3D_WEBHOOK_MAX_ATTEMPTS``
attempts in all; an invalid URL or a refused address is an attempt too, the last one (``permanent``: retrying
cannot help). Every attempt is recorded on the job before the next decision, by the :class:`WebhookStore` (the web
server keeps them in Prefect, with the run), so a restarted server resumes the schedule where it stopped and never
re-sends a delivered webhook. The one gap: a server killed between a receiver's 2xx and recording it sends that
webhook once more (at least once).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sam3d_pipeline.backoff import backoff_s
from sam3d_pipeline.web.webhook_targets import (
    InvalidTarget,
    TargetPolicy,
    TargetRefused,
    TargetUnresolved,
    parse_url,
    post_pinned,
)

SIGNATURE_HEADER = "X-Sam3d-Signature"
TIMESTAMP_HEADER = "X-Sam3d-Timestamp"
DELIVERY_HEADER = "X-Sam3d-Delivery"
SIGNATURE_TOLERANCE_S = 300
ERROR_MAX_CHARS = 300
MAX_RESPONSE_BYTES = 64 * 1024
REPEAT_LOG_S = 60.0  # a failure that repeats is logged with its traceback once, then one line this often

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
    """The next step for a webhook, from its recorded attempts (each with ``ok`` and ``at_unix``; one marked
    ``permanent`` (an invalid URL, a refused address) ends the schedule)."""
    if any(a.get("ok") for a in attempts):
        return Decision("delivered")
    if len(attempts) >= schedule.max_attempts or any(a.get("permanent") for a in attempts):
        return Decision("gave_up")
    if not attempts:
        return Decision("deliver", now)
    due = float(attempts[-1]["at_unix"]) + backoff_s(len(attempts), schedule.base_s, schedule.max_s)
    return Decision("deliver", due) if due <= now else Decision("wait", due)


def body_bytes(job: dict[str, Any]) -> bytes:
    """The exact bytes POSTed (and signed): compact JSON, UTF-8."""
    return json.dumps(job, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class PostResult:
    """What one POST of a webhook got.

    Attributes:
        status_code: the receiver's HTTP status, or None when it sent none (or none was sent).
        error: why the attempt failed, or None when the receiver's whole answer was read (then a 2xx delivered).
        permanent: retrying cannot help (an invalid URL, an address webhooks may not reach): the last attempt.
    """

    status_code: int | None
    error: str | None = None
    permanent: bool = False


class Poster:
    """POSTs a webhook once: to checked addresses only, within one deadline, reading a capped answer.

    Args:
        targets: where webhooks may go (public addresses unless allow-listed); checked on every call.
        max_response_bytes: most bytes of the answer's body read; a longer body fails the attempt.
        ssl_context: TLS settings (httpx's verifying default).
    """

    def __init__(self, targets: TargetPolicy | None = None, max_response_bytes: int = MAX_RESPONSE_BYTES,
                 ssl_context: Any = None) -> None:
        self.targets = targets if targets is not None else TargetPolicy()
        self.max_response_bytes, self.ssl_context = max_response_bytes, ssl_context

    def __call__(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> PostResult:
        """POST ``body`` to ``url`` once, all of it within ``timeout_s``. Redirects are not followed (a receiver
        moved is a failed attempt, never a delivery to somewhere else). Never raises for what the URL, the
        network or the receiver did: every failure is a :class:`PostResult` with its reason."""
        deadline = time.monotonic() + timeout_s
        try:
            target = parse_url(url)
            addresses = self.targets.addresses(target, max(deadline - time.monotonic(), 0.0))
        except InvalidTarget as exc:
            return PostResult(None, f"invalid URL: {exc}"[:ERROR_MAX_CHARS], permanent=True)
        except TargetRefused as exc:
            return PostResult(None, f"refused: {exc}"[:ERROR_MAX_CHARS], permanent=True)
        except TargetUnresolved as exc:
            return PostResult(None, str(exc)[:ERROR_MAX_CHARS])
        answer = post_pinned(target, addresses, body, headers, deadline, self.max_response_bytes, self.ssl_context)
        if answer.timed_out:
            if answer.status_code is None:
                return PostResult(None, f"no answer within {timeout_s:g} s")
            return PostResult(answer.status_code, f"answered {answer.status_code} but did not finish its answer "
                                                  f"within {timeout_s:g} s")
        return PostResult(answer.status_code, answer.error[:ERROR_MAX_CHARS] if answer.error else None)


def attempt_once(job: dict[str, Any], url: str, secret: str, timeout_s: float,
                 send: Callable[..., PostResult] | None = None,
                 clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Sign and POST ``job`` to ``url`` once; returns the attempt's record: ``number`` (filled by the caller),
    ``at`` (ISO 8601), ``at_unix``, ``status_code``, ``ok`` (2xx and the whole answer read), ``error``,
    ``duration_ms`` and ``permanent`` (retrying cannot help: the last attempt)."""
    body = body_bytes(job)
    started = clock()
    timestamp = int(started)
    headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: str(timestamp),
               SIGNATURE_HEADER: sign(secret, timestamp, body), DELIVERY_HEADER: str(job.get("id", "")),
               "User-Agent": "sam3d-pipeline-webhooks"}
    try:
        result = (send or Poster())(url, body, headers, timeout_s)
    except Exception as exc:  # noqa: BLE001 (an unforeseen error still counts as an attempt, so it ends)
        log.warning("webhook %s: the attempt failed unexpectedly", job.get("id"), exc_info=True)
        result = PostResult(None, f"{type(exc).__name__}: {exc}"[:ERROR_MAX_CHARS])
    status, error = result.status_code, result.error
    ok = status is not None and 200 <= status < 300 and error is None
    if status is not None and not ok and error is None:
        error = f"answered {status}"
    return {"at": datetime.fromtimestamp(started, UTC).isoformat(timespec="milliseconds"), "at_unix": started,
            "status_code": status, "ok": ok, "error": error, "duration_ms": round((clock() - started) * 1000, 1),
            "permanent": result.permanent}


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


class _QuietLog:
    """Logs a failure with its traceback the first time, then, while the same failure repeats, one line every
    ``every_s`` (a store that stays unreachable must not fill the log with one traceback per pass)."""

    def __init__(self, every_s: float = REPEAT_LOG_S) -> None:
        self.every_s = every_s
        self._seen: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def failed(self, key: str, message: str, exc: BaseException) -> None:
        text, now = f"{type(exc).__name__}: {exc}", time.monotonic()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and last[0] == text and now - last[1] < self.every_s:
                return
            self._seen[key] = (text, now)
        if last is None or last[0] != text:
            log.error(message, exc_info=exc)
        else:
            log.warning("%s (still: %s)", message, text)

    def recovered(self, key: str) -> None:
        with self._lock:
            self._seen.pop(key, None)


class WebhookDeliverer:
    """Delivers due webhooks: one pass with :meth:`run_once`, or a background thread with :meth:`start`.

    Each pass hands every pending job that is not already being attempted to a pool of ``workers`` threads, so a
    slow receiver holds one thread for at most one attempt's deadline and the other jobs' webhooks go on.

    Args:
        store: the jobs and their attempts.
        secret: the HMAC key.
        schedule: attempts and backoff.
        timeout_s: the deadline of one attempt, all of it (resolving, connecting, sending, the whole answer).
        poll_s: seconds between passes of the background thread.
        send: POSTs once (default: a :class:`Poster` with ``targets`` and ``max_response_bytes``).
        clock: the clock (tests pass their own).
        targets: where webhooks may go (default: public addresses only).
        max_response_bytes: most bytes of a receiver's answer body read.
        workers: attempts at once.
    """

    def __init__(self, store: WebhookStore, secret: str, schedule: Schedule, timeout_s: float = 10.0,
                 poll_s: float = 2.0, send: Callable[..., PostResult] | None = None,
                 clock: Callable[[], float] = time.time, *, targets: TargetPolicy | None = None,
                 max_response_bytes: int = MAX_RESPONSE_BYTES, workers: int = 8) -> None:
        self.store, self.secret, self.schedule = store, secret, schedule
        self.timeout_s, self.poll_s, self.clock = timeout_s, poll_s, clock
        self.send = send or Poster(targets, max_response_bytes)
        self.workers = workers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: set[str] = set()
        self._quiet = _QuietLog()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sam3d-webhook")
            return self._pool

    def run_once(self, wait: bool = True) -> dict[str, str]:
        """One pass: every pending job not already being attempted goes to the pool.

        Args:
            wait: wait for this pass's jobs and return what happened to each; the background thread does not
                wait (a job still in flight is skipped by the next pass).

        Returns:
            job id → ``delivered``, ``failed``, ``wait``, ``gave_up``, or ``error`` when reading or recording the
            job failed (logged, tried again next pass); ``{}`` without ``wait``.
        """
        futures: dict[str, Future[str]] = {}
        for job_id, url in self.store.pending():
            with self._lock:
                if job_id in self._in_flight:
                    continue
                self._in_flight.add(job_id)
            try:
                future = self._executor().submit(self._advance_guarded, job_id, url)
            except RuntimeError:  # stopped meanwhile
                self._done(job_id)
                break
            future.add_done_callback(lambda _, job_id=job_id: self._done(job_id))  # a cancelled one too
            futures[job_id] = future
        if not wait:
            return {}
        return {job_id: future.result() for job_id, future in futures.items()}

    def _advance_guarded(self, job_id: str, url: str) -> str:
        try:
            outcome = self._advance(job_id, url)
        except Exception as exc:  # noqa: BLE001 (one job's trouble, e.g. its storage refusing, must not stop the others)
            self._quiet.failed(job_id, f"webhook {job_id}: this pass failed; the next one tries again", exc)
            return "error"
        finally:
            self._done(job_id)  # before the result is set: a pass right after a waited one sees it free
        self._quiet.recovered(job_id)
        return outcome

    def _done(self, job_id: str) -> None:
        with self._lock:
            self._in_flight.discard(job_id)

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
        log.info("webhook %s attempt %d → %s", job_id, len(attempts), record["error"] or record["status_code"])
        after = decide(attempts, self.schedule, self.clock())
        if after.action in ("delivered", "gave_up"):
            self.store.settle(job_id)
            if after.action == "gave_up":
                log.warning("webhook %s: gave up after %d attempt(s): %s", job_id, len(attempts), record["error"])
        return "delivered" if record["ok"] else ("gave_up" if after.action == "gave_up" else "failed")

    def start(self) -> None:
        """Run passes every ``poll_s`` in a daemon thread until :meth:`stop`; a failing pass is logged (its
        traceback once while it repeats) and the next one tries again (the store keeps every attempt)."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.run_once(wait=False)
                    self._quiet.recovered("pass")
                except Exception as exc:  # noqa: BLE001 (Prefect or storage unreachable: the next pass retries)
                    self._quiet.failed("pass", f"webhook pass failed; retrying every {self.poll_s:g} s", exc)
                self._stop.wait(self.poll_s)

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="sam3d-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the passes; attempts in flight end within their deadline (an unrecorded one is sent again by the
        next server: at least once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
