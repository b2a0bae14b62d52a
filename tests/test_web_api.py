"""The job API and its webhooks.

Unit tests (no Prefect, no server): the signature, the retry schedule, the delivery loop against a real local
receiver with an in-memory store, the status mapping, the request checks and the fingerprint.

Stack tests (HTTP only, on the session's local stack: real Prefect server, workers and moto): submit with an
Idempotency-Key, poll to completed, a signed webhook on a local receiver; replay and conflict; a receiver failing
twice gets three recorded attempts and a second server delivers nothing twice; a run killed mid-flight still gets
a ``failed`` webhook; cancel; bad requests get their 4xx and create no run.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from sam3d_pipeline.errors import ImageTooLargeError, InputError, InvalidImageError
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import LocalStorage
from sam3d_pipeline.web import jobs, uploads, webhooks
from sam3d_pipeline.web.client import ApiError, JobClient
from sam3d_pipeline.web.jobs import RunView
from sam3d_pipeline.web.webhook_targets import TargetPolicy

from .photos import encode, object_photo
from .servers import free_port, wait_for_port
from .stack import STACK_MAX_INPUT_BYTES


class Receiver:
    """A webhook receiver on a loopback port: answers each POST with the next status of ``statuses`` (then 200),
    after ``delay_s``; records (unix time, headers, body) of every request."""

    def __init__(self, statuses: list[int] | None = None, delay_s: float = 0.0) -> None:
        self.statuses = list(statuses or [])
        self.delay_s = delay_s
        self.requests: list[tuple[float, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    receiver.requests.append((time.time(), dict(self.headers), body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                time.sleep(receiver.delay_s)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, count: int, timeout_s: float = 60.0) -> list[tuple[float, dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout_s
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"receiver got {len(self.requests)} of {count} webhook(s) in {timeout_s} s")
            time.sleep(0.1)
        return list(self.requests)


# The receivers here listen on loopback, which webhooks may reach only when allowed (the local stack allows it too).
LOCAL_RECEIVERS = TargetPolicy(allow_networks=(ipaddress.ip_network("127.0.0.0/8"),))


def hmac_hex(secret: str, timestamp: str, body: bytes) -> str:
    """The signature as a receiver computes it from the documented recipe (not with the library's ``sign``)."""
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


# ---- unit tests: signature, schedule, delivery loop ------------------------------------------------------------


def test_signature_follows_the_documented_recipe_and_verify_refuses_tampering():
    body, ts = b'{"id":"j","status":"completed"}', 1_900_000_000
    signature = webhooks.sign("s3cret", ts, body)
    assert signature == hmac_hex("s3cret", str(ts), body)
    assert webhooks.verify("s3cret", str(ts), body, signature, now=ts + 10)
    assert not webhooks.verify("s3cret", str(ts), body + b" ", signature, now=ts)
    assert not webhooks.verify("other", str(ts), body, signature, now=ts)
    assert not webhooks.verify("s3cret", str(ts + 1), body, signature, now=ts)
    assert not webhooks.verify("s3cret", str(ts), body, signature, now=ts + 301)  # a replayed old delivery
    assert not webhooks.verify("s3cret", "not-a-number", body, signature, now=ts)


def test_backoff_doubles_up_to_its_cap_and_decide_follows_the_attempts():
    from sam3d_pipeline.backoff import backoff_s

    assert [backoff_s(n, 1.0, 10.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    schedule = webhooks.Schedule(max_attempts=3, base_s=2.0, max_s=60.0)
    assert webhooks.decide([], schedule, now=100).action == "deliver"
    failed = [{"ok": False, "at_unix": 100.0}]
    assert webhooks.decide(failed, schedule, now=101) == webhooks.Decision("wait", 102.0)
    assert webhooks.decide(failed, schedule, now=102).action == "deliver"
    two = failed + [{"ok": False, "at_unix": 102.0}]
    assert webhooks.decide(two, schedule, now=105) == webhooks.Decision("wait", 106.0)
    assert webhooks.decide(two + [{"ok": False, "at_unix": 106.0}], schedule, now=999).action == "gave_up"
    assert webhooks.decide(failed + [{"ok": True, "at_unix": 102.0}], schedule, now=103).action == "delivered"


class MemoryStore:
    """The webhook store in memory: jobs that ended, with their URL; the attempts; the settled ones."""

    def __init__(self, jobs_: dict[str, str]) -> None:
        self.urls = dict(jobs_)
        self.recorded: dict[str, list[dict]] = {}
        self.settled: set[str] = set()

    def pending(self):
        return [(j, u) for j, u in self.urls.items() if j not in self.settled]

    def attempts(self, job_id):
        return list(self.recorded.get(job_id, []))

    def record(self, job_id, attempts):
        self.recorded[job_id] = list(attempts)

    def settle(self, job_id):
        self.settled.add(job_id)

    def job_body(self, job_id, attempts):
        return {"id": job_id, "status": "completed", "webhook": {"attempts": attempts}}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_deliverer_retries_with_backoff_records_every_attempt_and_never_sends_twice():
    clock = Clock()
    with Receiver([500, 503]) as receiver:
        store = MemoryStore({"job-1": receiver.url})
        deliverer = webhooks.WebhookDeliverer(store, "k", webhooks.Schedule(8, 1.0, 60.0), timeout_s=5, clock=clock,
                                              targets=LOCAL_RECEIVERS)
        assert deliverer.run_once() == {"job-1": "failed"}
        assert deliverer.run_once() == {"job-1": "wait"}  # 1 s not over yet
        clock.now += 1.0
        assert deliverer.run_once() == {"job-1": "failed"}
        clock.now += 1.5
        assert deliverer.run_once() == {"job-1": "wait"}  # the second wait is 2 s
        clock.now += 0.5
        assert deliverer.run_once() == {"job-1": "delivered"}
        attempts = store.recorded["job-1"]
        assert [(a["number"], a["status_code"], a["ok"]) for a in attempts] == [(1, 500, False), (2, 503, False),
                                                                                 (3, 200, True)]
        assert attempts[0]["error"] == "answered 500" and "job-1" in store.settled
        # A new deliverer over the same store (a restarted server) sends nothing more.
        again = webhooks.WebhookDeliverer(store, "k", webhooks.Schedule(8, 1.0, 60.0), clock=clock,
                                          targets=LOCAL_RECEIVERS)
        clock.now += 100
        assert again.run_once() == {}
        assert len(receiver.requests) == 3
        # Each body carried the attempts before it and was signed at its own timestamp.
        for i, (_, headers, body) in enumerate(receiver.requests):
            assert json.loads(body)["webhook"]["attempts"] == [{k: v for k, v in a.items()} for a in attempts[:i]]
            assert headers["X-Sam3d-Signature"] == hmac_hex("k", headers["X-Sam3d-Timestamp"], body)
            assert headers["X-Sam3d-Delivery"] == "job-1"


def test_deliverer_gives_up_after_max_attempts_and_counts_a_timeout_as_a_failure():
    clock = Clock()
    with Receiver([500, 500, 500], delay_s=0.0) as failing, Receiver(delay_s=2.0) as slow:
        store = MemoryStore({"a": failing.url, "b": slow.url})
        deliverer = webhooks.WebhookDeliverer(store, "k", webhooks.Schedule(2, 0.0, 0.0), timeout_s=0.3,
                                              clock=clock, targets=LOCAL_RECEIVERS)
        first = deliverer.run_once()
        assert first == {"a": "failed", "b": "failed"}
        assert store.recorded["b"][0]["error"] == "no answer within 0.3 s"
        assert deliverer.run_once() == {"a": "gave_up", "b": "gave_up"}
        assert store.settled == {"a", "b"} and len(failing.requests) == 2
        assert deliverer.run_once() == {}


def test_one_job_failing_to_load_does_not_stop_the_others():
    class Broken(MemoryStore):
        def job_body(self, job_id, attempts):
            if job_id == "bad":
                raise RuntimeError("storage refused")
            return super().job_body(job_id, attempts)

    with Receiver() as receiver:
        store = Broken({"bad": receiver.url, "good": receiver.url})
        deliverer = webhooks.WebhookDeliverer(store, "k", webhooks.Schedule(3, 0.0, 0.0), targets=LOCAL_RECEIVERS)
        assert deliverer.run_once() == {"bad": "error", "good": "delivered"}
        assert "bad" not in store.recorded and store.settled == {"good"} and len(receiver.requests) == 1


def test_an_unreachable_receiver_is_a_recorded_failure():
    store = MemoryStore({"c": f"http://127.0.0.1:{free_port()}/closed"})
    deliverer = webhooks.WebhookDeliverer(store, "k", webhooks.Schedule(3, 0.0, 0.0), timeout_s=2,
                                          targets=LOCAL_RECEIVERS)
    assert deliverer.run_once() == {"c": "failed"}
    (attempt,) = store.recorded["c"]
    assert attempt["status_code"] is None and attempt["error"].startswith("ConnectError")


# ---- unit tests: status, request checks, fingerprint, intake ---------------------------------------------------


def run_view(state_type: str, state_name: str = "", message: str | None = None, **labels) -> RunView:
    return RunView(id="run-1", state_type=state_type, state_name=state_name or state_type.title(),
                   state_message=message, created_at="", updated_at="", parameters={"prompt": "cup"}, labels=labels)


@pytest.mark.parametrize(("state_type", "result_status", "expected"), [
    ("SCHEDULED", None, "queued"), ("PENDING", None, "queued"), ("RUNNING", None, "running"),
    ("CANCELLING", None, "running"), ("PAUSED", None, "awaiting_review"), ("COMPLETED", "completed", "completed"),
    ("COMPLETED", "no_object", "no_object"), ("COMPLETED", "rejected", "rejected"), ("COMPLETED", None, "failed"),
    ("FAILED", "failed", "failed"), ("CRASHED", None, "failed"), ("CANCELLED", None, "cancelled"),
])
def test_status_of_every_prefect_state(state_type, result_status, expected):
    result = {"status": result_status} if result_status else None
    assert jobs.job_status(state_type, result) == expected


def test_errors_say_why_a_job_failed():
    crashed = run_view("CRASHED", message="Process exited with status code: -9.")
    assert jobs.job_error(crashed, "failed", None) == {"code": "crashed",
                                                       "message": "Process exited with status code: -9."}
    failed = run_view("FAILED", message="boom")
    own = {"status": "failed", "flow_run_id": "run-1", "error": {"code": "invalid_image", "message": "bad"}}
    assert jobs.job_error(failed, "failed", own) == {"code": "invalid_image", "message": "bad"}
    older = own | {"flow_run_id": "another-run"}  # an earlier run's result at the same prefix is not this one's
    assert jobs.job_error(failed, "failed", older) == {"code": "run_failed", "message": "boom"}
    missing = run_view("COMPLETED", **{jobs.LABEL_OUTPUT_PREFIX: "s3://b/outputs/cup-1"})
    assert jobs.job_error(missing, "failed", None)["code"] == "result_missing"
    assert jobs.job_error(run_view("COMPLETED"), "completed", {"status": "completed"}) is None


def test_job_json_shows_review_url_only_while_awaiting_review_and_backends_per_file():
    result = {"status": "completed", "flow_run_id": "run-1", "prompt_used_by_segmenter": False,
              "segmenter": {"name": "lite", "version": "grabcut-1"}, "reconstructor": {"name": "lite"},
              "outputs": {"mask.png": "s3://x", "overlay.png": "s3://x", "object.glb": "s3://x",
                          "objects/0/mask.png": "s3://x", "result.json": "s3://x"}}
    job = jobs.job_json(run_view("COMPLETED"), result=result, output_prefix="s3://b/o/p", outputs={"a": "u"},
                        status_url="/v1/jobs/run-1", review_url="/runs/run-1", attempts=[])
    assert job["status"] == "completed" and job["review_url"] is None and job["webhook"] is None
    assert job["backends"]["segmenter"]["produced"] == ["mask.png", "objects/0/mask.png", "overlay.png"]
    assert job["backends"]["reconstructor"]["produced"] == ["object.glb"]
    assert "outputs" not in job["result"] and job["outputs"] == {"a": "u"}
    paused = jobs.job_json(run_view("PAUSED", "Suspended", **{jobs.LABEL_SEGMENTER: "sam3"}), result=None,
                           output_prefix=None, outputs={}, status_url="", review_url="/runs/run-1", attempts=[])
    assert paused["status"] == "awaiting_review" and paused["review_url"] == "/runs/run-1"
    assert paused["backends"] == {"segmenter": {"name": "sam3", "planned": True, "produced": []}}


@pytest.mark.parametrize(("fields", "reason"), [
    ({}, "prompt: required"),
    ({"prompt": "   "}, "prompt: prompt is blank"),
    ({"prompt": "x" * 501}, "prompt: String should have at most 500 characters"),
    ({"prompt": "cup", "boxes": "[1, 2"}, "boxes: not valid JSON"),
    ({"prompt": "cup", "boxes": "[[1, 2, 3]]"}, "boxes.0"),
    ({"prompt": "cup", "points": '[{"x": 1}]'}, "points.0.y: Field required"),
    ({"prompt": "cup", "review": "maybe"}, "review: Input should be 'none', 'auto' or 'required'"),
    ({"prompt": "cup", "webhook_url": "ftp://example.org/x"}, "webhook_url: must be an http:// or https:// URL"),
    ({"prompt": "cup", "promt": "cup"}, "promt: Extra inputs are not permitted"),
])
def test_bad_fields_are_refused_with_the_field_and_the_reason(fields, reason):
    with pytest.raises(jobs.JobRequestError) as refused:
        jobs.parse_request(fields)
    assert str(refused.value).startswith(reason), str(refused.value)


def test_form_fields_parse_and_blank_optional_ones_are_ignored():
    request, options = jobs.parse_request({"prompt": " red chair ", "boxes": "[[1, 2, 30, 40]]", "points": "",
                                           "webhook_url": "", "review": "required"})
    assert options.prompt == "red chair" and options.boxes == [(1, 2, 30, 40)] and options.points == []
    assert request.webhook_url is None and request.review == "required"
    with pytest.raises(jobs.JobRequestError, match="Idempotency-Key"):
        jobs.check_idempotency_key("has space")
    assert jobs.check_idempotency_key("a" * 200) == "a" * 200
    with pytest.raises(jobs.JobRequestError):
        jobs.check_idempotency_key("a" * 201)


def test_fingerprint_changes_with_anything_that_makes_another_request():
    base, _ = jobs.parse_request({"prompt": "cup"})
    same, _ = jobs.parse_request({"prompt": " cup "})
    fp = jobs.fingerprint(base, "s3://b/k.png", "sha256:aa")
    assert jobs.fingerprint(same, "s3://b/k.png", "sha256:aa") == fp
    for other, image, content in [({"prompt": "mug"}, "s3://b/k.png", "sha256:aa"),
                                  ({"prompt": "cup", "review": "auto"}, "s3://b/k.png", "sha256:aa"),
                                  ({"prompt": "cup", "webhook_url": "http://8.8.8.8/x"}, "s3://b/k.png", "sha256:aa"),
                                  ({"prompt": "cup", "points": '[{"x": 1, "y": 2}]'}, "s3://b/k.png", "sha256:aa"),
                                  ({"prompt": "cup"}, "s3://b/k.png", "sha256:bb"),
                                  ({"prompt": "cup"}, "s3://b/other.png", "sha256:aa")]:
        assert jobs.fingerprint(jobs.parse_request(other)[0], image, content) != fp, other


def test_uploads_are_checked_before_storing_and_stored_content_addressed(tmp_path):
    settings = Settings(output_root=str(tmp_path), max_input_bytes=50_000)
    storage = LocalStorage(tmp_path)
    png = encode(object_photo(64, 48)[0])
    intake = uploads.check_upload(png, "../../Red Chair.exe", storage, settings)
    digest = hashlib.sha256(png).hexdigest()
    assert intake.upload_key == f"_uploads/{digest}/Red-Chair.png"  # name kept, folder and extension not trusted
    assert intake.content_id == f"sha256:{digest}" and (intake.width, intake.height) == (64, 48)
    assert not list(tmp_path.rglob("*.png"))  # checking stores nothing
    uploads.store_upload(intake, png, storage)
    assert (tmp_path / intake.upload_key).read_bytes() == png
    with pytest.raises(InvalidImageError, match="not a recognised image format"):
        uploads.check_upload(b"%PDF-1.7 not a photo", "doc.pdf", storage, settings)
    with pytest.raises(ImageTooLargeError, match="exceeds SAM3D_MAX_INPUT_BYTES=50,000"):
        uploads.check_upload(b"\0" * 50_001, "big.png", storage, settings)
    _, options = jobs.parse_request({"prompt": "cup", "boxes": "[[70, 50, 90, 70]]"})
    with pytest.raises(InputError, match="lies outside the 64x48 image"):
        uploads.check_prompts(options, intake)
    with pytest.raises(InputError, match="SAM3D_API_INPUT_ROOTS"):
        uploads.check_uri(str(tmp_path / intake.upload_key), settings)  # no local folder is allowed by default
    allowed = Settings(output_root=str(tmp_path), api_input_roots=str(tmp_path))
    assert uploads.check_uri(str(tmp_path / intake.upload_key), allowed).content_id == intake.content_id


def test_one_app_serves_studio_review_docs_and_refuses_bad_submissions_before_prefect(tmp_path, monkeypatch):
    """In process, with no Prefect API at all: pages, docs and every refusal that needs no run."""
    from fastapi.testclient import TestClient

    from sam3d_pipeline.web.app import MODEL_VIEWER_DIST, STUDIO, create_app

    # No API in effect, whatever the session's test server set in this process's settings.
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr("sam3d_pipeline.review.prefect_api.api_url", lambda: None)
    client = TestClient(create_app(["tok"], Settings(output_root=str(tmp_path), max_input_bytes=100_000),
                                   deliver_webhooks=False))
    studio = client.get("/")
    assert studio.status_code == 200 and studio.text == (STUDIO / "index.html").read_text()
    assert client.get(f"/jobs/{uuid.uuid4()}").text == studio.text  # the page reads the id from the path
    assert studio.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert "mask review" in client.get("/review").text and "mask review" in client.get(f"/runs/{uuid.uuid4()}").text
    viewer = client.get("/vendor/model-viewer/model-viewer.min.js")
    assert viewer.status_code == 200 and viewer.content == (MODEL_VIEWER_DIST / "model-viewer.min.js").read_bytes()
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    auth = {"Authorization": "Bearer tok"}
    png = encode(object_photo(64, 48)[0])
    assert client.post("/v1/jobs", files={"image": ("p.png", png)}, data={"prompt": "x"}).status_code == 401
    assert client.get("/v1/jobs?token=tok", headers=auth).status_code == 401  # never in a URL query
    refused = {
        "no prompt": (client.post("/v1/jobs", headers=auth, files={"image": ("p.png", png)}), 422),
        "not an image": (client.post("/v1/jobs", headers=auth, files={"image": ("p.png", b"GIF89a?")},
                                     data={"prompt": "cup"}), 422),
        "too large": (client.post("/v1/jobs", headers=auth, files={"image": ("p.png", b"\0" * 100_001)},
                                  data={"prompt": "cup"}), 413),
        "webhook without secret": (client.post("/v1/jobs", headers=auth, files={"image": ("p.png", png)},
                                               data={"prompt": "cup", "webhook_url": "http://93.184.215.14/x"}), 422),
    }
    for what, (answer, status) in refused.items():
        assert answer.status_code == status, (what, answer.text)
    assert "SAM3D_WEBHOOK_SECRET" in refused["webhook without secret"][0].json()["detail"]
    assert not (tmp_path / "_uploads").exists()  # nothing refused was stored
    # With no Prefect API, a valid submission is answered 503 with the reason.
    answer = client.post("/v1/jobs", headers=auth, files={"image": ("p.png", png)}, data={"prompt": "cup"})
    assert answer.status_code == 503 and "PREFECT_API_URL is not set" in answer.json()["detail"]


# ---- on the local stack (HTTP only) ----------------------------------------------------------------------------


class Api:
    """HTTP calls to the stack's web server and its Prefect API."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.base = stack.web
        self.auth = {"Authorization": f"Bearer {stack.token}"}
        self.client = JobClient(self.base, stack.token)
        self.secret = stack.env["SAM3D_WEBHOOK_SECRET"]

    def submit(self, data: bytes, name: str = "photo.png", headers: dict | None = None, **fields) -> requests.Response:
        return requests.post(f"{self.base}/v1/jobs", headers=self.auth | (headers or {}), data=fields,
                             files={"image": (name, data)}, timeout=60)

    def job(self, job_id: str) -> dict:
        return self.client.get(job_id)

    def prefect(self, method: str, path: str, body: dict | None = None):
        response = requests.request(method, f"{self.stack.api}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def run_count(self) -> int:
        deployment = self.prefect("GET", "/deployments/name/image-to-3d/image-to-3d")["id"]
        return self.prefect("POST", "/flow_runs/count", {"deployments": {"id": {"any_": [deployment]}}})

    def wait_attempts(self, job_id: str, count: int, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if len(job["webhook"]["attempts"]) >= count:
                return job
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id}: {len(job['webhook']['attempts'])} of {count} attempts recorded")
            time.sleep(0.3)


@pytest.fixture
def api(stack):
    api = Api(stack)
    yield api
    api.client.close()


def photo(seed: int) -> bytes:
    return encode(object_photo(160, 120, seed=seed)[0])


@pytest.mark.slow
def test_submit_poll_completed_signed_webhook_and_idempotent_replay(api):
    key = f"order-{uuid.uuid4().hex[:8]}"
    image = photo(501)
    with Receiver() as receiver:
        first = api.submit(image, "red chair.png", {"Idempotency-Key": key}, prompt="red chair",
                           webhook_url=receiver.url)
        assert first.status_code == 202, first.text
        accepted = first.json()
        assert set(accepted) == {"id", "status", "status_url", "output_prefix", "input"}
        assert accepted["input"] == {"kind": "photo", "width": 160, "height": 120}
        assert accepted["status"] == "queued" and first.headers["Location"] == accepted["status_url"]
        assert accepted["output_prefix"].startswith(f"{api.stack.env['SAM3D_OUTPUT_ROOT']}/red-chair-")
        seen = []
        job = api.client.wait(accepted["id"], timeout_s=180, poll_s=0.3, on_progress=lambda j: seen.append(j["status"]))
        assert job["status"] == "completed", job
        assert seen[-1] == "completed" and set(seen) <= {"queued", "running", "completed"}
        # The output prefix in the 202 is the one the flow wrote to; outputs are fetchable links.
        assert job["result"]["output_prefix"] == accepted["output_prefix"] == job["output_prefix"]
        assert {"object.glb", "mask.png", "overlay.png", "preview.png", "result.json"} <= set(job["outputs"])
        glb = requests.get(job["outputs"]["object.glb"], timeout=30)
        assert glb.status_code == 200 and glb.content[:4] == b"glTF"
        assert job["backends"]["segmenter"]["name"] == "lite" and "mask.png" in job["backends"]["segmenter"]["produced"]
        assert "object.glb" in job["backends"]["reconstructor"]["produced"]
        assert job["result"]["status"] == "completed" and job["result"]["flow_run_id"] == job["id"]
        # The webhook: once, signed with the stack's secret over "<timestamp>.<body>".
        (at, headers, body), = receiver.wait_for(1)
        assert headers["X-Sam3d-Signature"] == hmac_hex(api.secret, headers["X-Sam3d-Timestamp"], body)
        assert abs(int(headers["X-Sam3d-Timestamp"]) - at) < 5
        sent = json.loads(body)
        assert sent["id"] == job["id"] and sent["status"] == "completed" and sent["webhook"]["attempts"] == []
        recorded = api.wait_attempts(job["id"], 1)["webhook"]
        assert recorded["url"] == receiver.url
        assert [(a["number"], a["status_code"], a["ok"]) for a in recorded["attempts"]] == [(1, 200, True)]
        runs = api.run_count()
        # Same key, same request: the same job (200), nothing new; same key, another request: 409.
        replay = api.submit(image, "red chair.png", {"Idempotency-Key": key}, prompt="red chair",
                            webhook_url=receiver.url)
        assert replay.status_code == 200, replay.text
        assert replay.json()["id"] == job["id"] and replay.json()["status"] == "completed"
        changed = api.submit(image, "red chair.png", {"Idempotency-Key": key}, prompt="blue chair",
                             webhook_url=receiver.url)
        assert changed.status_code == 409 and job["id"] in changed.json()["detail"]
        assert api.run_count() == runs
        time.sleep(2.5)  # more than one pass of the webhook loop (SAM3D_WEBHOOK_POLL_S): nothing is sent again
        assert len(receiver.requests) == 1


def start_web_server(stack, port: int) -> subprocess.Popen:
    """A second web server on the stack (as after a restart): same Prefect, storage, token and secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_", "SAM3D_"))} | stack.env
    env["SAM3D_WEB_URL"] = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "sam3d_pipeline.cli", "web", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_port(port, timeout_s=60, proc=proc)
    return proc


@pytest.mark.slow
def test_a_receiver_failing_twice_gets_three_attempts_and_a_restart_sends_nothing_again(api):
    with Receiver([500, 502]) as receiver:
        accepted = api.submit(photo(502), prompt="mug", webhook_url=receiver.url).json()
        job = api.client.wait(accepted["id"], timeout_s=180, poll_s=0.5)
        assert job["status"] == "completed"
        requests_ = receiver.wait_for(3, timeout_s=60)
        times = [t for t, _, _ in requests_]
        assert times[1] - times[0] >= 0.9 and times[2] - times[1] >= 1.9  # backoff 1 s, then 2 s (less jitter)
        for _, headers, body in requests_:
            assert headers["X-Sam3d-Signature"] == hmac_hex(api.secret, headers["X-Sam3d-Timestamp"], body)
            assert headers["X-Sam3d-Delivery"] == job["id"] and json.loads(body)["status"] == "completed"
        attempts = api.wait_attempts(job["id"], 3)["webhook"]["attempts"]
        assert [(a["number"], a["status_code"], a["ok"]) for a in attempts] == [(1, 500, False), (2, 502, False),
                                                                                (3, 200, True)]
        # Another server on the same Prefect (a restart): the job and its attempts are all there, and nothing is
        # delivered again.
        port = free_port()
        proc = start_web_server(api.stack, port)
        try:
            other = requests.get(f"http://127.0.0.1:{port}/v1/jobs/{job['id']}", headers=api.auth, timeout=30).json()
            assert other["status"] == "completed" and other["webhook"]["attempts"] == attempts
            time.sleep(2.5)
            assert len(receiver.requests) == 3
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_a_run_killed_mid_flight_still_sends_a_failed_webhook(api):
    """SIGKILL the flow run's process while it runs: the worker marks the run Crashed (Prefect's own state), and
    the web server's loop, not the flow, sends the webhook."""
    with Receiver() as receiver:
        accepted = api.submit(photo(503), prompt="lamp", webhook_url=receiver.url).json()
        deadline = time.monotonic() + 120
        while True:
            run = api.prefect("GET", f"/flow_runs/{accepted['id']}")
            if run["state_type"] == "RUNNING" and run.get("infrastructure_pid"):
                break
            assert run["state_type"] in ("SCHEDULED", "PENDING"), run["state_type"]
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.1)
        os.kill(int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1]), signal.SIGKILL)
        (_, headers, body), = receiver.wait_for(1, timeout_s=60)
        sent = json.loads(body)
        assert headers["X-Sam3d-Signature"] == hmac_hex(api.secret, headers["X-Sam3d-Timestamp"], body)
        assert sent["status"] == "failed" and sent["state"]["type"] == "CRASHED"
        assert sent["error"]["code"] == "crashed" and "-9" in sent["error"]["message"]
        assert api.job(accepted["id"])["status"] == "failed"


@pytest.mark.slow
def test_awaiting_review_list_and_cancel_with_a_cancelled_webhook(api):
    with Receiver() as receiver:
        accepted = api.submit(photo(504), prompt="vase", review="required", webhook_url=receiver.url).json()
        job = api.client.wait(accepted["id"], timeout_s=180, poll_s=0.5, until=frozenset({"awaiting_review"}))
        assert job["review_url"] == f"{api.base}/runs/{job['id']}"
        assert requests.get(job["review_url"], timeout=10).status_code == 200  # the review page of this server
        listed = api.client.list(status="awaiting_review", limit=50)
        assert job["id"] in [j["id"] for j in listed] and {j["status"] for j in listed} == {"awaiting_review"}
        asked = time.monotonic()  # nothing changes: the server answers after wait_s, with the job as it is
        held = requests.get(f"{api.base}/v1/jobs/{job['id']}", params={"changed_from": "awaiting_review",
                                                                       "wait_s": 1}, headers=api.auth, timeout=30)
        assert held.status_code == 200 and held.json()["status"] == "awaiting_review"
        assert time.monotonic() - asked >= 1.0
        cancelled = requests.post(f"{api.base}/v1/jobs/{job['id']}/cancel", headers=api.auth, timeout=30)
        assert cancelled.status_code == 202, cancelled.text
        job = api.client.wait(job["id"], timeout_s=60, poll_s=0.3)
        assert job["status"] == "cancelled"
        assert json.loads(receiver.wait_for(1)[0][2])["status"] == "cancelled"
        again = requests.post(f"{api.base}/v1/jobs/{job['id']}/cancel", headers=api.auth, timeout=30)
        assert again.status_code == 409 and "already ended (cancelled)" in again.json()["detail"]


@pytest.mark.slow
def test_bad_requests_get_their_4xx_with_a_reason_and_create_nothing(api):
    uploads_prefix = f"{api.stack.env['SAM3D_OUTPUT_PREFIX']}_uploads/"

    def stored_uploads() -> int:
        return api.stack.s3.list_objects_v2(Bucket=api.stack.bucket, Prefix=uploads_prefix).get("KeyCount", 0)

    runs, stored = api.run_count(), stored_uploads()
    good = photo(505)
    url = f"{api.base}/v1/jobs"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {api.stack.token}"}):
        for method, path in (("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{uuid.uuid4()}"),
                             ("GET", "/api/runs")):
            answer = requests.request(method, f"{api.base}{path}", headers=headers, timeout=30,
                                      **({"files": {"image": ("p.png", good)}, "data": {"prompt": "x"}}
                                         if method == "POST" else {}))
            assert answer.status_code == 401, (method, path, headers)
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    cases = [
        (api.submit(good), 422, "prompt: required"),
        (api.submit(good, prompt=" "), 422, "prompt: prompt is blank"),
        (api.submit(b"%PDF-1.7 this is a document", "doc.pdf", prompt="cup"), 422, "doc.pdf: not a recognised "
         "image format"),
        (api.submit(b"\x89PNG\r\n\x1a\n" + b"\0" * (STACK_MAX_INPUT_BYTES + 1), "huge.png", prompt="cup"), 413,
         f"exceeds SAM3D_MAX_INPUT_BYTES={STACK_MAX_INPUT_BYTES:,}"),
        (api.submit(good, prompt="cup", boxes="[[500, 500, 600, 600]]"), 422, "lies outside the 160x120 image"),
        (api.submit(good, prompt="cup", points="[{]"), 422, "points: not valid JSON"),
        (api.submit(good, prompt="cup", webhook_url="file:///etc/passwd"), 422, "webhook_url: must be an http"),
        (api.submit(good, prompt="cup", review="later"), 422, "review: Input should be"),
        (api.submit(good, "p.png", {"Idempotency-Key": "two words"}, prompt="cup"), 422, "Idempotency-Key:"),
        (requests.post(url, headers=api.auth, files={"prompt": (None, "cup")}, timeout=30), 422, "image: required"),
        (requests.post(url, headers=api.auth, data={"prompt": "cup"}, files={"other": ("p.png", good)}, timeout=30),
         422, "other: expected a form field, got a file"),
        (requests.post(url, headers=api.auth, json={"prompt": "cup"}, timeout=30), 422, "image: required"),
        (requests.post(url, headers=api.auth, json={"prompt": "cup", "image": "/etc/hostname"}, timeout=30), 422,
         "the server reads local files only under SAM3D_API_INPUT_ROOTS"),
        (requests.post(url, headers=api.auth, json={"prompt": "cup", "image": f"s3://{api.stack.bucket}/no/such.png"},
                       timeout=30), 422, "no/such.png"),
        (requests.post(url, headers=api.auth | {"Content-Type": "text/plain"}, data="cup", timeout=30), 415,
         "multipart/form-data"),
        (requests.get(f"{api.base}/v1/jobs/{uuid.uuid4()}", headers=api.auth, timeout=30), 404, "no job"),
        (requests.get(f"{api.base}/v1/jobs/not-a-uuid", headers=api.auth, timeout=30), 404, "no job not-a-uuid"),
        (requests.post(f"{api.base}/v1/jobs/{uuid.uuid4()}/cancel", headers=api.auth, timeout=30), 404, "no job"),
        (requests.get(f"{api.base}/v1/jobs?status=done", headers=api.auth, timeout=30), 422, "status: unknown done"),
        (requests.get(f"{api.base}/v1/jobs/{uuid.uuid4()}?changed_from=done&wait_s=1", headers=api.auth, timeout=30),
         422, "changed_from: unknown status 'done'"),
    ]
    for answer, status, reason in cases:
        assert answer.status_code == status, (status, reason, answer.status_code, answer.text)
        assert reason in answer.json()["detail"], (reason, answer.text)
    too_long = requests.get(f"{api.base}/v1/jobs/{uuid.uuid4()}?changed_from=queued&wait_s=99", headers=api.auth,
                            timeout=30)
    assert too_long.status_code == 422 and "wait_s" in too_long.text  # at most 30 s
    assert api.run_count() == runs
    assert stored_uploads() == stored  # refused uploads are not stored either
    with pytest.raises(ApiError) as refused:
        api.client.submit_uri(f"s3://{api.stack.bucket}/no/such.png", "cup")
    assert refused.value.status == 422


def test_early_outputs_are_this_runs_glb_while_it_publishes(tmp_path):
    """A running job links object.glb once the run has written it and removed the prefix's old result.json; an
    old run's files beside its result.json, or a job not running, link nothing early."""
    from sam3d_pipeline.keys import RunKeys
    from sam3d_pipeline.web.service import JobService

    root = str(tmp_path / "out")
    service = JobService(Settings(output_root=root))
    keys, storage = RunKeys("photo-abc"), LocalStorage(root)
    labels = {jobs.LABEL_OUTPUT_PREFIX: f"{root}/photo-abc"}
    running = jobs.RunView(id="run-1", state_type="RUNNING", state_name="Running", state_message=None,
                           created_at="", updated_at="", labels=labels)
    assert service.job(running, "http://web")["early_outputs"] == {}  # nothing written yet
    storage.write_bytes(keys.file("object.glb"), b"old glb")
    storage.write_bytes(keys.result, b"{}")  # an earlier run's complete prefix: its files are not this run's
    assert service.job(running, "http://web")["early_outputs"] == {}
    storage.delete(keys.result)  # what a publishing run does before it writes its GLB
    storage.write_bytes(keys.file("object.glb"), b"new glb")
    job = service.job(running, "http://web")
    assert job["early_outputs"] == {"object.glb": "http://web/v1/jobs/run-1/outputs/object.glb"}
    assert job["outputs"] == {}  # the complete list comes with result.json
    paused = jobs.RunView(**{**running.__dict__, "state_type": "PAUSED", "state_name": "Paused"})
    assert service.job(paused, "http://web")["early_outputs"] == {}
