"""The run keeper: every upload the bridge accepted ends in exactly one finished run, whatever was killed meanwhile.

The bridge hands an upload to Prefect as an event; the deployment trigger turns it into a flow run. On
Prefect's open-source server both steps pass through in-memory queues, so a server killed at the wrong moment
loses an event it already answered 2xx to, and a flow run whose process dies with its worker, or with the
server it talks to, ends Crashed and is never run again. The keeper closes both gaps from the bridge's own
durable record, the event markers (``<marker root>/<event id>.json``, written once Prefect took the event):

- **no run** for an accepted upload ``repost_after_s`` after it was posted: the event is posted again. When
  Prefect recorded that the trigger's action failed (``prefect.automation.action.failed`` naming the event:
  e.g. a SQLite server answered its own run-deployment call 503), the copy gets a new id derived from the first
  (``retry_event_id``), since the triggers drop an id they have seen. Otherwise it keeps the same id: while the
  server that took the first copy still runs, its triggers drop the repeated id; when that server was
  restarted, the first copy is gone and this one starts the run. A run exists as soon as its trigger's action
  ran, so a repost never follows a run that exists.
- **a Crashed run** (its process was lost), one that **Failed on a lost connection** (``LOST_CONNECTION``: the
  Prefect server it talks to went away for longer than the client's retries), or one left **Pending** for
  ``pending_timeout_s`` (a worker killed while it was starting the run's process leaves it so for good):
  scheduled again (``AwaitingRetry``, as the
  UI's Retry does), the same flow run, so no second run appears, up to ``attempts`` times. The flow is
  idempotent: its output prefix is deterministic and ``result.json`` is written last, so the re-run writes
  each result once. A run left Running by a process that died with its worker is marked Crashed by the
  unresponsive-runs automation (``sam3d_pipeline.stack.unresponsive``) once its heartbeats stop, and then rescheduled.
- a run that Completed, Failed for any other reason (the pipeline's own errors: permanent, reported in its
  ``result.json``) or was Cancelled is final: the upload is done.

Runs are matched to uploads by the flow's ``image`` parameter (``s3://bucket/key``), oldest run to oldest
upload of that key, among runs of ``deployment`` created from shortly before the upload on. The decisions
(``match_runs``, ``decide``) are plain functions; ``RunKeeper`` applies them through the Prefect API.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from prefect.events import Event

log = logging.getLogger("sam3d_pipeline.events.keeper")

KeeperAction = Literal["wait", "repost", "reschedule", "done", "give_up"]
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED")
# A run that failed on one of these lost its connection (to the Prefect API, or to storage past its retries): the
# run did not fail, its infrastructure did. Prefect words a flow's failure "Flow run encountered an exception:
# <type>: <message>".
LOST_CONNECTION = re.compile(
    r"exception: (?:httpx\.)?(?:ConnectError|ConnectTimeout|ReadError|ReadTimeout|WriteError|WriteTimeout|PoolTimeout|"
    r"RemoteProtocolError|TransientStorageError)\b|PrefectHTTPStatusError: Server error"
)
# A run can be created a moment before the marker saying its event was posted: match runs from this much earlier.
MATCH_SKEW_S = 120.0
PAGE = 200


@dataclass
class Accepted:
    """One upload the bridge handed to Prefect, followed until its run is final.

    Attributes:
        event_id: the Prefect event's id (``parse.event_id``).
        image: the run's ``image`` parameter, ``s3://bucket/key``.
        posted_at: when the event was posted (epoch seconds; a marker's last-modified time after a restart).
        event: the event as posted (JSON), posted again if it was lost.
        posted_id: the id of the copy posted last (``event_id``, or a ``retry_event_id``).
        run_id: the flow run matched to it, once one exists.
        reposts: how often the event was posted again.
        reschedules: how often its run was scheduled again after a crash.
        done: its run reached a final state (or the keeper gave up on it).
    """

    event_id: str
    image: str
    posted_at: float
    event: dict[str, Any]
    posted_id: str = ""
    run_id: str | None = None
    reposts: int = 0
    reschedules: int = 0
    done: bool = False


def accepted_from_event(event: dict[str, Any], posted_at: float) -> Accepted:
    """An ``Accepted`` from an event's JSON (``Event.model_dump(mode="json")`` or a marker's body)."""
    payload = event["payload"]
    return Accepted(event_id=str(event["id"]), image=f"s3://{payload['bucket']}/{payload['key']}",
                    posted_at=posted_at, event=event, posted_id=str(event["id"]))


def retry_event_id(event_id: str, attempt: int) -> str:
    """The id of the ``attempt``-th copy of an event whose trigger action failed: new to Prefect's triggers, and the
    same every time it is derived (a keeper that restarts posts the same copy, which the triggers then drop)."""
    return str(uuid.uuid5(uuid.UUID(event_id), f"retry-{attempt}"))


def _created(run: dict[str, Any]) -> float:
    return datetime.fromisoformat(run["created"].replace("Z", "+00:00")).timestamp()


def match_runs(accepted: Sequence[Accepted], runs: Sequence[dict[str, Any]],
               skew_s: float = MATCH_SKEW_S) -> dict[str, dict[str, Any]]:
    """Pair uploads with flow runs: ``{event id: run}``.

    A run already paired (``Accepted.run_id``) stays with its upload; the others are paired per ``image``, oldest
    unpaired run to oldest unpaired upload, a run created no earlier than ``skew_s`` before the upload was posted.

    Args:
        accepted: the uploads followed (done ones included, so their runs are not paired twice).
        runs: flow runs as the API returns them (``id``, ``created``, ``parameters``, ``state_type``, ...).
    """
    by_id = {r["id"]: r for r in runs}
    paired: dict[str, dict[str, Any]] = {}
    taken = {a.run_id for a in accepted if a.run_id}
    for a in accepted:
        if a.run_id and a.run_id in by_id:
            paired[a.event_id] = by_id[a.run_id]
    free: dict[str, list[dict[str, Any]]] = {}
    for run in sorted(runs, key=_created):
        image = (run.get("parameters") or {}).get("image")
        if image and run["id"] not in taken:
            free.setdefault(image, []).append(run)
    for a in sorted((a for a in accepted if not a.run_id), key=lambda a: a.posted_at):
        candidates = free.get(a.image, [])
        for i, run in enumerate(candidates):
            if _created(run) >= a.posted_at - skew_s:
                paired[a.event_id] = candidates.pop(i)
                break
    return paired


def _state_time(run: dict[str, Any]) -> float:
    stamp = (run.get("state") or {}).get("timestamp") or run["created"]
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def decide(accepted: Accepted, run: dict[str, Any] | None, *, now: float, repost_after_s: float,
           attempts: int, pending_timeout_s: float = 300.0) -> KeeperAction:
    """What to do about one upload given its run (None when none exists yet).

    Returns:
        ``repost`` (no run ``repost_after_s`` x (reposts + 1) after the first post), ``reschedule`` (its run
        Crashed, Failed on a lost connection, or has been Pending for ``pending_timeout_s``, and fewer than
        ``attempts`` runs were made),
        ``done`` (final), ``give_up`` (``attempts`` runs lost, or posted ``attempts`` times more without a run),
        or ``wait``.
    """
    if run is None:
        if now - accepted.posted_at < repost_after_s * (1 + accepted.reposts):
            return "wait"
        return "give_up" if accepted.reposts >= attempts else "repost"
    state = run.get("state_type")
    lost = (state == "CRASHED" or (state == "PENDING" and now - _state_time(run) >= pending_timeout_s)
            or (state == "FAILED" and LOST_CONNECTION.search((run.get("state") or {}).get("message") or "")))
    if state in FINAL_STATES and not lost:
        return "done"
    if lost:
        made = max(int(run.get("run_count") or 0), accepted.reschedules + 1)
        return "reschedule" if made < attempts else "give_up"
    return "wait"


class RunKeeper:
    """Follows accepted uploads until each has one final run (module docstring).

    Args:
        request: ``request(method, path, body)`` → decoded JSON, against the Prefect API (``bridge.prefect_request``).
        post: posts events again (``bridge.post_events`` bound to the API).
        deployment: ``flow/deployment`` whose runs the uploads start (the one with the event trigger).
        repost_after_s: how long an upload may have no run before its event is posted again.
        attempts: most runs of one upload's flow run (the first and the reschedules after crashes).
        pending_timeout_s: how long a run may stay Pending before it counts as lost.
        window_s: how long an upload is followed at most.
        clock: the time source (epoch seconds).
    """

    def __init__(self, request: Callable[[str, str, Any], Any], post: Callable[[list[Event]], None], *,
                 deployment: str = "image-to-3d/image-to-3d", repost_after_s: float = 60.0, attempts: int = 3,
                 pending_timeout_s: float = 300.0, window_s: float = 3600.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.request = request
        self.post = post
        self.flow, _, self.deployment = deployment.partition("/")
        self.repost_after_s = repost_after_s
        self.attempts = attempts
        self.pending_timeout_s = pending_timeout_s
        self.window_s = window_s
        self.clock = clock
        self.accepted: dict[str, Accepted] = {}
        self.counts = {"reposted": 0, "rescheduled": 0, "gave_up": 0, "done": 0}

    def accept(self, events: Sequence[dict[str, Any]], posted_at: float | None = None) -> None:
        """Follow these events' uploads (event JSON), posted at ``posted_at`` (default now)."""
        at = self.clock() if posted_at is None else posted_at
        for event in events:
            self.accepted.setdefault(str(event["id"]), accepted_from_event(event, at))

    def load_markers(self, s3: Any, bucket: str, prefix: str) -> int:
        """Follow the uploads whose markers were written within ``window_s`` (after the bridge restarted).

        Returns how many were loaded.
        """
        since, loaded = self.clock() - self.window_s, 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                modified = obj["LastModified"].timestamp()
                if modified < since or not obj["Key"].endswith(".json"):
                    continue
                try:
                    event = json.loads(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
                    self.accept([event], posted_at=modified)
                    loaded += 1
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("marker s3://%s/%s unreadable, not followed: %s", bucket, obj["Key"], exc)
        return loaded

    def _runs(self, since: float) -> list[dict[str, Any]]:
        after = datetime.fromtimestamp(since - MATCH_SKEW_S, UTC).isoformat()
        body: dict[str, Any] = {"flow_runs": {"expected_start_time": {"after_": after}},
                                "flows": {"name": {"any_": [self.flow]}},
                                "deployments": {"name": {"any_": [self.deployment]}},
                                "sort": "EXPECTED_START_TIME_ASC", "limit": PAGE}
        runs: list[dict[str, Any]] = []
        while True:
            page = self.request("POST", "/flow_runs/filter", body | {"offset": len(runs)}) or []
            runs.extend(page)
            if len(page) < PAGE:
                return runs

    def sweep(self) -> dict[str, int]:
        """Match runs, repost lost events, reschedule crashed runs, forget what is done or too old.

        Returns what this sweep did: ``{"reposted", "rescheduled", "gave_up", "done", "followed"}``.

        Raises:
            bridge.TransientBridgeError, bridge.PermanentBridgeError: the Prefect API failed (nothing is lost:
            the next sweep tries again).
        """
        now = self.clock()
        for key in [k for k, a in self.accepted.items() if now - a.posted_at > self.window_s]:
            del self.accepted[key]
        did = {"reposted": 0, "rescheduled": 0, "gave_up": 0, "done": 0}
        open_ = [a for a in self.accepted.values() if not a.done]
        if not open_:
            return did | {"followed": 0}
        paired = match_runs(list(self.accepted.values()), self._runs(min(a.posted_at for a in open_)))
        lost: list[Accepted] = []
        for a in open_:
            run = paired.get(a.event_id)
            if run is not None:
                a.run_id = run["id"]
            action = decide(a, run, now=now, repost_after_s=self.repost_after_s, attempts=self.attempts,
                            pending_timeout_s=self.pending_timeout_s)
            if action == "repost":
                lost.append(a)
            elif action == "reschedule":
                self._reschedule(a, run)
                did["rescheduled"] += 1
            elif action in ("done", "give_up"):
                a.done = True
                did["done" if action == "done" else "gave_up"] += 1
                if action == "give_up":
                    log.error("%s: given up after %d attempt(s) (flow run %s); see its state", a.image,
                              self.attempts, a.run_id or "never created")
        if lost:
            self._repost(lost)
            did["reposted"] = len(lost)
        for name, n in did.items():
            self.counts[name] += n
        return did | {"followed": sum(1 for a in self.accepted.values() if not a.done)}

    def _reschedule(self, accepted: Accepted, run: dict[str, Any]) -> None:
        state = run.get("state") or {}
        reason = f"{state.get('name') or run.get('state_type')}: {state.get('message') or 'no message'}"
        message = f"scheduled again by the events bridge (the run was lost: {reason})"[:500]
        self.request("POST", f"/flow_runs/{run['id']}/set_state",
                     {"state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": message}, "force": True})
        accepted.reschedules += 1
        log.warning("%s: flow run %s lost (%s); scheduled again (run %d of %d)", accepted.image, run["id"],
                    run.get("state_type"), accepted.reschedules + 1, self.attempts)

    def _failed_actions(self, lost: list[Accepted]) -> set[str]:
        """The posted ids among ``lost`` whose trigger action Prefect recorded as failed."""
        since = datetime.fromtimestamp(min(a.posted_at for a in lost) - MATCH_SKEW_S, UTC).isoformat()
        body = {"filter": {"event": {"name": ["prefect.automation.action.failed"]},
                           "related": {"id": [f"prefect.event.{a.posted_id}" for a in lost]},
                           "occurred": {"since": since}}, "limit": PAGE}
        failed = set()
        for event in (self.request("POST", "/events/filter", body) or {}).get("events", []):
            for related in event.get("related", []):
                if related.get("prefect.resource.role") == "triggering-event":
                    failed.add(related["prefect.resource.id"].removeprefix("prefect.event."))
        return failed

    def _repost(self, lost: list[Accepted]) -> None:
        from prefect.events import Event

        failed = self._failed_actions(lost)
        copies = []
        for a in lost:
            if a.posted_id in failed:  # the triggers saw that id: only a new one runs the action again
                a.posted_id = retry_event_id(a.event_id, a.reposts + 1)
            copies.append(Event.model_validate(a.event | {"id": a.posted_id}))
        self.post(copies)
        for a in lost:
            a.reposts += 1
            how = "with the same id" if a.posted_id == a.event_id else f"as {a.posted_id} (its trigger's action failed)"
            log.warning("%s: no flow run %.0f s after its event %s was posted; posted it again %s", a.image,
                        self.clock() - a.posted_at, a.event_id, how)
