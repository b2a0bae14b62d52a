"""Webhooks that cannot be turned against the server (issue #29, "Hardening II").

Where a webhook may go (public addresses only unless allow-listed; never the server's own services; checked at
submission and on every attempt against the address connected to), how long an attempt may take (one deadline
for all of it), how much of an answer is read (64 KiB), that attempts run side by side (a slow receiver holds no
other webhook), that a bad URL is one recorded attempt and no endless traceback, and that the local stack keeps
its token files private.

Every receiver here listens on 127.0.0.1; names resolve through a resolver the test passes (never the system's),
so nothing leaves the machine.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
import tracemalloc

import pytest

from sam3d_pipeline.settings import Settings, WebhookSettings
from sam3d_pipeline.web import jobs, webhooks
from sam3d_pipeline.web.webhook_targets import (
    InvalidTarget,
    TargetPolicy,
    TargetRefused,
    TargetUnresolved,
    parse_url,
)

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def resolver(names: dict[str, list[str] | list[list[str]]], calls: list[str] | None = None):
    """A resolver answering from ``names`` (name → addresses; or → one list of addresses per call, the last one
    repeating); unknown names do not resolve. Records each call in ``calls``."""
    served: dict[str, int] = {}

    def resolve(host: str, port: int, timeout_s: float) -> list:
        if calls is not None:
            calls.append(host)
        if host not in names:
            raise TargetUnresolved(f"{host} did not resolve: unknown to the test")
        answers = names[host]
        if answers and isinstance(answers[0], list):
            i = served.get(host, 0)
            served[host] = i + 1
            answers = answers[min(i, len(answers) - 1)]
        return [ipaddress.ip_address(a) for a in answers]

    return resolve


# ---- receivers on 127.0.0.1 -------------------------------------------------------------------------------------


def read_request(conn: socket.socket) -> bytes:
    """One HTTP request (headers and a Content-Length body) from ``conn``."""
    conn.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class RawReceiver:
    """A TCP server on 127.0.0.1: each connection is read as one request, then ``behave(receiver, conn)`` answers
    it (or does not). Records the requests, when each arrived, and how many bytes it sent."""

    def __init__(self, behave) -> None:
        self.behave = behave
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.requests: list[tuple[float, bytes]] = []
        self.connections = 0
        self.sent = 0
        self.closed = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def __enter__(self) -> RawReceiver:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed.set()
        self.sock.close()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            request = read_request(conn)
            with self._lock:
                self.requests.append((time.time(), request))
            self.behave(self, conn)
        except OSError:
            pass

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def wait_for(self, count: int, timeout_s: float) -> list[tuple[float, bytes]]:
        deadline = time.monotonic() + timeout_s
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"receiver got {len(self.requests)} of {count} webhook(s) in {timeout_s} s")
            time.sleep(0.02)
        return list(self.requests)


def answer(status: int = 200):
    def behave(receiver: RawReceiver, conn: socket.socket) -> None:
        receiver.send(conn, f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
    return behave


def drip_body(every_s: float):
    """Headers at once, then a 1000-byte body one byte every ``every_s``."""
    def behave(receiver: RawReceiver, conn: socket.socket) -> None:
        receiver.send(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        while not receiver.closed.wait(every_s):
            receiver.send(conn, b".")
    return behave


def drip_headers(every_s: float):
    """The status line, then a header one byte every ``every_s``."""
    def behave(receiver: RawReceiver, conn: socket.socket) -> None:
        receiver.send(conn, b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not receiver.closed.wait(every_s):
            receiver.send(conn, b"a")
    return behave


def hang(receiver: RawReceiver, conn: socket.socket) -> None:
    """Read the request, never answer."""
    receiver.closed.wait(120)


def huge(declared: bool, total: int = 100 * 1024 * 1024):
    """A 200 with a 100 MB body, with its Content-Length or chunked."""
    def behave(receiver: RawReceiver, conn: socket.socket) -> None:
        block = b"x" * 65536
        if declared:
            receiver.send(conn, f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
            frame = block
        else:
            receiver.send(conn, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            frame = b"%x\r\n" % len(block) + block + b"\r\n"
        for _ in range(total // len(block)):
            receiver.send(conn, frame)
    return behave


class MemoryStore:
    """The webhook store in memory: jobs that ended (added in order), their attempts, the settled ones."""

    def __init__(self, jobs_: dict[str, str] | None = None) -> None:
        self.urls = dict(jobs_ or {})
        self.recorded: dict[str, list[dict]] = {}
        self.settled: set[str] = set()
        self.lock = threading.Lock()

    def add(self, job_id: str, url: str, attempts: list[dict] | None = None) -> None:
        with self.lock:
            self.recorded[job_id] = list(attempts or [])
            self.urls[job_id] = url

    def pending(self):
        with self.lock:
            return [(j, u) for j, u in self.urls.items() if j not in self.settled]

    def attempts(self, job_id):
        with self.lock:
            return list(self.recorded.get(job_id, []))

    def record(self, job_id, attempts):
        with self.lock:
            self.recorded[job_id] = list(attempts)

    def settle(self, job_id):
        with self.lock:
            self.settled.add(job_id)

    def job_body(self, job_id, attempts):
        return {"id": job_id, "status": "completed", "webhook": {"attempts": attempts}}


def deliverer(store, targets: TargetPolicy | tuple | None = None, **kwargs) -> webhooks.WebhookDeliverer:
    """A deliverer over ``store``; ``targets`` a policy, or networks to allow besides public addresses."""
    if isinstance(targets, tuple):
        targets = TargetPolicy(allow_networks=targets)
    kwargs.setdefault("timeout_s", 5.0)
    return webhooks.WebhookDeliverer(store, "k", kwargs.pop("schedule", webhooks.Schedule(3, 0.0, 0.0)),
                                     targets=targets, **kwargs)


# ---- 1. where a webhook may go -----------------------------------------------------------------------------------

INTERNAL = {
    "metadata.google.internal": ["169.254.169.254"],
    "localhost": ["127.0.0.1", "::1"],
    "half.example": ["93.184.215.14", "10.0.0.5"],  # one public and one private address: refused
    "ecs-meta.example": ["169.254.170.2"],
    "mapped.example": ["::ffff:10.1.2.3"],
}


@pytest.mark.parametrize(("url", "why"), [
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://2852039166/latest/meta-data/", "169.254.169.254 is a link-local address"),  # decimal
    ("http://0xa9fea9fe/", "169.254.169.254 is a link-local address"),  # hex
    ("http://0251.0376.0251.0376/", "169.254.169.254 is a link-local address"),  # octal
    ("http://169.254.43518/", "169.254.169.254 is a link-local address"),  # two-part
    ("http://169.254.170.2/v2/metadata", "link-local"),  # the ECS task-metadata endpoint
    ("http://[fd00:ec2::254]/latest/meta-data/", "is a private address"),
    ("http://[::ffff:169.254.169.254]/", "link-local"),  # IPv4-mapped
    ("http://[::ffff:a9fe:a9fe]/", "link-local"),
    ("http://[2002:a9fe:a9fe::1]/", "link-local"),  # 6to4 around the metadata address
    ("http://metadata.google.internal/computeMetadata/v1/", "metadata.google.internal resolves to a link-local"),
    ("http://ecs-meta.example/", "link-local"),
    ("http://10.0.0.8/hook", "private"), ("http://172.16.3.4/", "private"), ("http://192.168.1.1/", "private"),
    ("http://100.64.0.1/", "shared"),
    ("http://0.0.0.0:4200/api", "unspecified"), ("http://0/", "unspecified"), ("http://[::]/", "unspecified"),
    ("http://127.0.0.1:4200/api/flow_runs", "loopback"), ("http://127.1/", "loopback"),
    ("http://[::1]:8080/", "loopback"), ("http://localhost:5055/moto-api/reset", "loopback"),
    ("http://224.0.0.1/", "multicast"), ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"), ("http://255.255.255.255/", "reserved"),
    ("https://half.example/hook", "half.example resolves to a private"),
    ("https://mapped.example/hook", "private"),
])
def test_submission_refuses_webhook_urls_that_reach_internal_addresses(url, why):
    with pytest.raises(jobs.JobRequestError) as refused:
        jobs.parse_request({"prompt": "cup", "webhook_url": url}, targets=TargetPolicy(resolver=resolver(INTERNAL)))
    assert str(refused.value).startswith("webhook_url: ") and why in str(refused.value)
    assert "may not reach" in str(refused.value) and "SAM3D_WEBHOOK_ALLOW_NETWORKS" in str(refused.value)


def test_the_servers_own_settings_refuse_the_metadata_endpoint_at_submission(monkeypatch):
    """The API's own call (no policy passed): the server's settings, public addresses only by default."""
    monkeypatch.delenv("SAM3D_WEBHOOK_ALLOW_NETWORKS", raising=False)
    monkeypatch.delenv("SAM3D_WEBHOOK_ALLOW_HOSTS", raising=False)
    monkeypatch.setattr("sam3d_pipeline.settings.get_settings", lambda: Settings())
    for url in ("http://169.254.169.254/latest/meta-data/iam/", "http://2852039166/", "http://0xa9fea9fe/",
                "http://[fd00:ec2::254]/", "http://127.0.0.1:4200/api"):
        with pytest.raises(jobs.JobRequestError, match="may not reach"):
            jobs.parse_request({"prompt": "cup", "webhook_url": url})
    request, _ = jobs.parse_request({"prompt": "cup", "webhook_url": "https://93.184.215.14/hooks"})
    assert request.webhook_url == "https://93.184.215.14/hooks"  # a public literal: nothing resolved, nothing sent


def test_public_names_and_allow_listed_receivers_pass_and_the_servers_own_services_never_do():
    names = {"hooks.example": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
             "hooks.internal": ["10.0.0.7"], "sneaky.internal": ["169.254.169.254"], "localhost": ["127.0.0.1"]}
    settings = Settings(webhook=WebhookSettings(allow_networks="127.0.0.0/8, ::1/128", allow_hosts="hooks.internal,"
                                                "sneaky.internal"), web_url="http://127.0.0.1:8765")
    environ = {"AWS_ENDPOINT_URL": "http://127.0.0.1:5055", "PREFECT_API_URL": "http://localhost:4200/api"}
    policy = TargetPolicy.from_settings(settings, environ=environ, resolver=resolver(names))
    for url in ("https://hooks.example/a?b=c", "http://hooks.internal:9000/x", "http://127.0.0.1:9999/hook",
                "http://127.0.0.2:9999/hook", "http://[::1]:9999/", "http://[::ffff:127.0.0.1]:9999/"):
        assert policy.check_url(url).url == url
    refused = {
        "http://127.0.0.1:5055/moto-api/reset": "own services",  # the S3 endpoint (moto on the local stack)
        "http://127.0.0.9:5055/moto-api/reset": "own services",  # any loopback address, same port
        "http://0.0.0.0:5055/": "own services",
        "http://127.0.0.1:4200/api/flow_runs/filter": "own services",  # the Prefect API
        "http://[::1]:4200/api": "own services",
        "http://[::ffff:127.0.0.1]:8765/v1/jobs": "own services",  # this web server
        "http://sneaky.internal/": "link-local",  # an allowed name still may not reach the metadata endpoint
        "http://0.0.0.0:9999/": "unspecified",
        "http://169.254.169.254/": "link-local",
    }
    for url, why in refused.items():
        with pytest.raises(TargetRefused, match=why):
            policy.check_url(url)
    with pytest.raises(ValueError, match="SAM3D_WEBHOOK_ALLOW_NETWORKS: 'ten.0.0.0/8' is not a network"):
        TargetPolicy.from_settings(Settings(webhook=WebhookSettings(allow_networks="ten.0.0.0/8")), environ={})


def test_delivery_refuses_a_non_public_address_without_connecting():
    """A job whose URL was accepted before this check (or by another server) is refused at delivery: one
    attempt with the reason, given up at once, and the receiver never sees a connection."""
    with RawReceiver(answer(200)) as internal:
        store = MemoryStore({"job-1": internal.url, "job-2": "http://2852039166/latest/meta-data/"})
        assert deliverer(store).run_once() == {"job-1": "gave_up", "job-2": "gave_up"}
        for job_id in ("job-1", "job-2"):
            (attempt,) = store.recorded[job_id]
            assert attempt["permanent"] is True and attempt["ok"] is False and attempt["status_code"] is None
            assert attempt["error"].startswith("refused: ") and "may not reach" in attempt["error"]
        assert store.settled == {"job-1", "job-2"} and internal.connections == 0
        assert deliverer(store).run_once() == {}


def test_the_s3_endpoint_is_refused_even_with_loopback_allowed():
    """The local-stack incident: a webhook to moto's /moto-api/reset emptied every bucket."""
    with RawReceiver(answer(200)) as moto, RawReceiver(answer(200)) as receiver:
        settings = Settings(webhook=WebhookSettings(allow_networks="127.0.0.0/8"))
        policy = TargetPolicy.from_settings(settings, environ={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{moto.port}"})
        reset = f"http://127.0.0.1:{moto.port}/moto-api/reset"
        with pytest.raises(jobs.JobRequestError, match="own services"):
            jobs.parse_request({"prompt": "cup", "webhook_url": reset}, targets=policy)
        store = MemoryStore({"evil": reset, "fine": receiver.url})
        assert deliverer(store, policy).run_once() == {"evil": "gave_up", "fine": "delivered"}
        assert moto.connections == 0 and len(receiver.requests) == 1


def test_delivery_resolves_once_and_connects_to_the_address_it_checked():
    """DNS rebinding: the name is resolved once per attempt and the connection goes to that checked address,
    with the name in ``Host``; when the name later points inside, that attempt is refused."""
    calls: list[str] = []
    names = {"hooks.example": [["127.0.0.1"], ["169.254.169.254"]]}  # first answer, then every later one
    policy = TargetPolicy(allow_networks=(ipaddress.ip_network("127.0.0.1/32"),), resolver=resolver(names, calls))
    with RawReceiver(answer(500)) as receiver:
        url = f"http://hooks.example:{receiver.port}/hook?x=1"
        store = MemoryStore({"job": url})
        assert deliverer(store, policy).run_once() == {"job": "failed"}
        ((_, request),) = receiver.requests
        assert request.startswith(b"POST /hook?x=1 HTTP/1.1\r\n")
        assert f"\r\nHost: hooks.example:{receiver.port}\r\n".encode() in request
        assert calls == ["hooks.example"]  # one resolution for the check and the connection
        assert store.recorded["job"][0]["error"] == "answered 500"
        assert deliverer(store, policy).run_once() == {"job": "gave_up"}
        second = store.recorded["job"][1]
        assert second["permanent"] and "hooks.example resolves to a link-local address" in second["error"]
        assert calls == ["hooks.example"] * 2 and receiver.connections == 1


def self_signed(tmp_path, name: str):
    """A certificate and key for ``name`` (PEM files), made here."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_https_to_a_pinned_address_still_checks_the_certificate_of_the_name(tmp_path):
    """The connection goes to the checked address; TLS still sends the URL's name (SNI) and verifies the
    certificate against it, so pinning never weakens HTTPS."""
    import ssl

    cert_file, key_file = self_signed(tmp_path, "hooks.example")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_file, key_file)
    seen_names: list[str | None] = []
    server_context.sni_callback = lambda sock, name, ctx: seen_names.append(name)

    def tls_answer(receiver: RawReceiver, conn: socket.socket) -> None:
        receiver.send(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    class TlsReceiver(RawReceiver):
        def _serve(self, conn: socket.socket) -> None:
            try:
                super()._serve(server_context.wrap_socket(conn, server_side=True))
            except (OSError, ssl.SSLError):
                pass

    client_context = ssl.create_default_context(cafile=str(cert_file))
    names = {"hooks.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]}
    policy = TargetPolicy(allow_networks=LOOPBACK, resolver=resolver(names))
    with TlsReceiver(tls_answer) as receiver:
        store = MemoryStore({"good": f"https://hooks.example:{receiver.port}/hook",
                             "wrong-name": f"https://other.example:{receiver.port}/hook"})
        loop = deliverer(store, send=webhooks.Poster(policy, ssl_context=client_context))
        assert loop.run_once() == {"good": "delivered", "wrong-name": "failed"}
        assert "CERTIFICATE_VERIFY_FAILED" in store.recorded["wrong-name"][0]["error"]
        assert sorted(seen_names) == ["hooks.example", "other.example"] and len(receiver.requests) == 1
        assert f"\r\nHost: hooks.example:{receiver.port}\r\n".encode() in receiver.requests[0][1]


# ---- 2. slow receivers -------------------------------------------------------------------------------------------


def test_a_dripping_or_hanging_receiver_fails_within_the_attempt_deadline():
    with RawReceiver(drip_body(0.3)) as body, RawReceiver(drip_headers(0.3)) as headers, RawReceiver(hang) as hung:
        store = MemoryStore({"body": body.url, "headers": headers.url, "hung": hung.url})
        done: dict = {}
        worker = threading.Thread(target=lambda: done.update(deliverer(store, LOOPBACK, timeout_s=2.0).run_once()),
                                  daemon=True)
        started = time.monotonic()
        worker.start()
        worker.join(6.0)
        assert not worker.is_alive(), "an attempt outlived its 2 s deadline"
        assert done == {"body": "failed", "headers": "failed", "hung": "failed"}
        assert time.monotonic() - started < 4.0  # side by side, each within its deadline
        assert store.recorded["body"][0]["error"] == "answered 200 but did not finish its answer within 2 s"
        assert store.recorded["headers"][0]["error"] == "no answer within 2 s"
        assert store.recorded["hung"][0]["error"] == "no answer within 2 s"
        for attempts in store.recorded.values():
            assert 1900 <= attempts[0]["duration_ms"] < 3000 and attempts[0]["ok"] is False


def test_an_ordinary_webhook_arrives_within_15_s_while_bad_receivers_are_in_play(capsys):
    """The server's defaults (10 s deadline, 2 s poll, 8 workers). Dripping, hanging and 100 MB receivers have
    webhooks due first, as after a restart (each has failed attempts already, so they are retried at once);
    then an ordinary job ends, and its webhook must arrive within 15 s."""
    s = Settings()
    schedule = webhooks.Schedule(s.webhook.max_attempts, s.webhook.backoff_s, s.webhook.backoff_max_s)
    long_ago = [{"number": 1, "at_unix": time.time() - 3600, "ok": False, "error": "no answer within 10 s"}]
    with RawReceiver(drip_body(5.0)) as dripping, RawReceiver(drip_headers(5.0)) as dripping_headers, \
            RawReceiver(hang) as hanging, RawReceiver(huge(declared=False)) as hundred_mb, \
            RawReceiver(answer(200)) as ordinary:
        store = MemoryStore()
        for receiver in (dripping, dripping_headers, hanging, hundred_mb):
            store.add(f"bad-{receiver.port}", receiver.url, long_ago)
        loop = webhooks.WebhookDeliverer(store, "k", schedule, timeout_s=s.webhook.timeout_s,
                                         poll_s=s.webhook.poll_s, targets=TargetPolicy(allow_networks=LOOPBACK),
                                         max_response_bytes=s.webhook.max_response_bytes, workers=s.webhook.workers)
        loop.start()
        try:
            for receiver in (dripping, dripping_headers, hanging, hundred_mb):
                receiver.wait_for(1, timeout_s=10)  # every bad attempt is in flight
            ended = time.time()  # the ordinary job's run ends now
            store.add("ordinary", ordinary.url)
            ((arrived, _),) = ordinary.wait_for(1, timeout_s=15)
        finally:
            loop.stop()
    latency = arrived - ended
    with capsys.disabled():
        print(f"\nordinary webhook arrived {latency:.2f} s after its run ended (bad receivers in flight)")
    assert latency < 15.0


# ---- 4. invalid URLs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "why"), [
    ("http://[::1/", "not a valid URL"),
    ("http://hooks.example/a\r\nX-Injected: 1", "'\\r'"),
    ("http://hooks.example/\nx", "'\\n'"),
    ("http://hooks\x00.example/", "'\\x00'"),
    ("http://hooks example/", "' '"),
    ("http://hooks.example\\@169.254.169.254/", "'\\\\'"),
    ("http://hooks.example:99999/", "Port out of range"),
    ("http://hooks.example:http/", "not a valid URL"),
    ("http://user:secret@hooks.example/", "credentials"),
    ("http://[fe80::1%25eth0]/", "not an IPv6 address"),
    ("http://-bad-.example/", "not a valid host name"),
    ("http:///path", "must name a host"),
    ("file:///etc/passwd", "must be an http:// or https:// URL"),
])
def test_invalid_webhook_urls_are_refused_at_submission(url, why):
    with pytest.raises(jobs.JobRequestError) as refused:
        jobs.parse_request({"prompt": "cup", "webhook_url": url}, targets=TargetPolicy(resolver=resolver({})))
    assert str(refused.value).startswith("webhook_url: ") and why in str(refused.value), str(refused.value)
    with pytest.raises(InvalidTarget):
        parse_url(url)


def test_an_invalid_stored_url_is_one_recorded_attempt_then_given_up_without_a_traceback(caplog):
    """URLs accepted before this check: each is one attempt with the reason, given up and settled (its pending
    tag cleared); nothing is retried and no traceback is logged, however many passes run."""
    store = MemoryStore({"bracket": "http://[::1/", "crlf": "http://a\r\nb/", "nul": "http://a\x00b/"})
    loop = deliverer(store, LOOPBACK)
    with caplog.at_level(logging.DEBUG, logger="sam3d_pipeline.web.webhooks"):
        assert loop.run_once() == {"bracket": "gave_up", "crlf": "gave_up", "nul": "gave_up"}
        for _ in range(3):
            assert loop.run_once() == {}
    for attempts in store.recorded.values():
        (attempt,) = attempts
        assert attempt["error"].startswith("invalid URL: ") and attempt["permanent"] and not attempt["ok"]
    assert store.settled == {"bracket", "crlf", "nul"}
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_a_job_that_keeps_failing_to_load_logs_its_traceback_once(caplog):
    class Broken(MemoryStore):
        def job_body(self, job_id, attempts):
            raise RuntimeError("storage refused")

    store = Broken({"bad": "http://127.0.0.1:9/hook"})
    loop = deliverer(store, LOOPBACK)
    with caplog.at_level(logging.DEBUG, logger="sam3d_pipeline.web.webhooks"):
        for _ in range(5):
            assert loop.run_once() == {"bad": "error"}
    assert len([r for r in caplog.records if r.exc_info]) == 1


# ---- 16. huge answers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
def test_a_100_mb_answer_is_read_no_further_than_64_kib(declared):
    with RawReceiver(huge(declared)) as receiver:
        store = MemoryStore({"big": receiver.url})
        loop = deliverer(store, LOOPBACK, timeout_s=10.0, max_response_bytes=64 * 1024)
        tracemalloc.start()
        try:
            assert loop.run_once() == {"big": "failed"}
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        (attempt,) = store.recorded["big"]
        assert attempt["status_code"] == 200 and attempt["ok"] is False
        assert "over the 65536-byte limit" in attempt["error"]
        assert peak < 8 * 1024 * 1024, f"{peak / 1e6:.1f} MB held while reading the answer"
        time.sleep(0.2)
        assert receiver.sent < 20 * 1024 * 1024  # the connection was closed long before 100 MB


# ---- 14. the local stack's token files ---------------------------------------------------------------------------


def test_the_local_stack_writes_its_token_files_for_its_owner_only(tmp_path):
    from sam3d_pipeline.stack.local import LOCAL_WEBHOOK_ALLOW_NETWORKS, LocalStack, StackConfig, write_env_file

    env_file = tmp_path / "local-stack.env"
    env_file.write_text("old")
    env_file.chmod(0o644)  # from an earlier stack
    write_env_file(env_file, {"SAM3D_API_TOKEN": "t0ken", "SAM3D_WEBHOOK_ALLOW_NETWORKS": LOCAL_WEBHOOK_ALLOW_NETWORKS})
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "SAM3D_API_TOKEN=t0ken\n" in env_file.read_text()
    stack = LocalStack(StackConfig(state_dir=tmp_path / "state", project_dir=tmp_path))
    stack.logs.mkdir(parents=True)
    (stack.logs / "review-server.log").write_text("")
    (stack.logs / "review-server.log").chmod(0o644)
    proc = stack._spawn("review-server", [sys.executable, "-c", "print('studio: /#token=t0ken')"], dict(os.environ))
    proc.wait(timeout=30)
    assert stat.S_IMODE((stack.logs / "review-server.log").stat().st_mode) == 0o600
    assert stat.S_IMODE(stack.logs.stat().st_mode) == 0o700
    assert stat.S_IMODE((stack.state_dir / "stack.json").stat().st_mode) == 0o600
    local = Settings(webhook=WebhookSettings(allow_networks=LOCAL_WEBHOOK_ALLOW_NETWORKS))
    policy = TargetPolicy.from_settings(local, environ={})
    assert policy.check_url("http://127.0.0.1:9/hook") and policy.check_url("http://[::1]:9/hook")


@pytest.mark.slow
def test_the_web_server_never_prints_a_token_it_was_given(prefect_server, tmp_path):
    """Its output goes to the stack's log file: a given token stays out of it; a made-up one must be shown."""
    import subprocess

    from prefect.settings import PREFECT_API_URL

    from .servers import free_port

    outputs = []
    for given in ("given-secret-token-123", None):
        env = {k: v for k, v in os.environ.items() if k not in ("SAM3D_API_TOKEN", "SAM3D_REVIEW_TOKEN")}
        env |= {"PREFECT_API_URL": PREFECT_API_URL.value(), "SAM3D_OUTPUT_ROOT": str(tmp_path)}
        if given:
            env["SAM3D_API_TOKEN"] = given
        proc = subprocess.Popen([sys.executable, "-m", "sam3d_pipeline.cli", "web", "--port", str(free_port())],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("job API:"):
                    break
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        outputs.append("".join(lines))
    assert "studio:" in outputs[0] and "given-secret-token-123" not in outputs[0] and "<your token>" in outputs[0]
    assert "<your token>" not in outputs[1] and "#token=" in outputs[1]
