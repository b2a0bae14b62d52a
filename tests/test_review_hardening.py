"""Review server hardening: uploaded masks are checked from their header before anything is decoded, the token
is accepted only in the Authorization header (the page reads it from the URL fragment), and an unreachable
Prefect API stops the server from starting and makes the API answer 503 with the reason."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from sam3d_pipeline.errors import ImageTooLargeError, InputError, InvalidImageError
from sam3d_pipeline.masks import mask_from_png, mask_to_png

from .conftest import REVIEW_TOKEN as TOKEN
from .photos import object_photo
from .servers import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def crafted_png(width: int, height: int, *, value: int = 255, extra: bytes = b"", cut: int = 0,
                before_pixels: bytes = b"", after_pixels: bytes = b"") -> bytes:
    """An 8-bit greyscale PNG of one value, built row by row (the pixels are never held in memory): a header
    can declare any size. ``extra`` is appended to the pixel stream, ``cut`` bytes are taken off its end."""
    deflate = zlib.compressobj(9)
    row = b"\x00" + bytes([value]) * width
    parts = [deflate.compress(row) for _ in range(height - 1)]
    last = row + extra
    parts.append(deflate.compress(last[:len(last) - cut]))
    parts.append(deflate.flush())
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + before_pixels + _chunk(b"IDAT", b"".join(parts)) + after_pixels + _chunk(b"IEND", b""))


def _peak_rss_mb(code: str, png: bytes) -> dict:
    """Run ``code`` (with ``data`` = the PNG bytes) in a fresh interpreter with Pillow's process-wide bomb
    guard switched off; return its outcome, the growth of the peak RSS it caused, and the peak of what
    Python objects it allocated (tracemalloc: Pillow's pixel buffers are not among them, its text chunks are)."""
    script = (
        "import json, resource, sys, tracemalloc\n"
        "from PIL import Image\n"
        "Image.MAX_IMAGE_PIXELS = None\n"  # the checks must not depend on Pillow's global
        "from sam3d_pipeline.masks import mask_from_png\n"
        "data = sys.stdin.buffer.read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "tracemalloc.start()\n"
        "try:\n"
        f"    {code}\n"
        "    outcome = 'accepted'\n"
        "except Exception as exc:\n"
        "    outcome = f'{type(exc).__name__}: {exc}'\n"
        "traced_mb = tracemalloc.get_traced_memory()[1] / 2**20\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'outcome': outcome, 'peak_rss_mb': (after - before) / 1024, 'traced_mb': traced_mb}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], input=png, capture_output=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


# ---- masks: the header first ------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(13_000, 13_000), (20_000, 18_750), (50_000, 50_000)])
def test_a_huge_mask_header_is_refused_before_decoding(width, height):
    png = crafted_png(width, height, value=0)
    assert len(png) < 4_000_000  # a small request...
    measured = _peak_rss_mb("mask_from_png(data, size=(320, 240), source='uploaded mask')", png)
    print(json.dumps({"header": f"{width}x{height}", "png_bytes": len(png)} | measured))
    assert measured["outcome"].startswith("ImageTooLargeError: uploaded mask: mask header declares "
                                          f"{width}x{height} = {width * height:,} pixels")
    assert "refused before decoding" in measured["outcome"]
    assert measured["peak_rss_mb"] < 20  # ...that costs no memory (decoded: 142, 336 and 2,357 MB)
    with pytest.raises(ImageTooLargeError, match="over the limit of 60,000,000"):
        mask_from_png(png)  # no expected size: the limit still applies


def test_a_mask_of_the_wrong_size_is_refused_before_decoding():
    with pytest.raises(InputError, match="mask is 640x480, image is 320x240; refused before decoding"):
        mask_from_png(crafted_png(640, 480), size=(320, 240))
    with pytest.raises(ImageTooLargeError, match="limit of 1,000"):
        mask_from_png(crafted_png(40, 30), max_pixels=1000)


def test_mask_pixel_data_must_decompress_to_the_size_its_header_declares():
    assert mask_from_png(crafted_png(320, 240), size=(320, 240)).all()
    with pytest.raises(InvalidImageError, match="decompresses to more than the 77,040 bytes its 320x240 header"):
        mask_from_png(crafted_png(320, 240, extra=b"\xff" * 50_000_000), size=(320, 240))
    with pytest.raises(InvalidImageError, match="pixel data is truncated"):
        mask_from_png(crafted_png(320, 240, cut=100), size=(320, 240))
    with pytest.raises(InvalidImageError, match="not a PNG file"):
        mask_from_png(b"GIF89a" + b"\x00" * 50)
    # Every PNG colour type and bit depth Pillow writes, and an interlaced file, still decode.
    rng = np.random.default_rng(0)
    truth = rng.random((37, 53)) > 0.5
    grey = Image.fromarray(np.where(truth, 255, 0).astype(np.uint8), "L")
    for im in [grey.convert(mode) for mode in ("1", "L", "LA", "P", "RGB", "RGBA")] + [
            Image.fromarray((truth * 255).astype(np.uint16)).convert("I;16")]:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        assert np.array_equal(mask_from_png(buf.getvalue(), size=(53, 37)), truth), im.mode
    adam7 = b"".join((b"\x00" + b"\xff" * len(range(x0, 53, dx))) * len(range(y0, 37, dy))
                     for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                                            (1, 0, 2, 2), (0, 1, 1, 2)))
    interlaced = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 53, 37, 8, 0, 0, 0, 1))
                  + _chunk(b"IDAT", zlib.compress(adam7)) + _chunk(b"IEND", b""))
    assert mask_from_png(interlaced, size=(53, 37)).all()


def test_mask_metadata_chunks_are_never_decompressed():
    """Text chunks are bounded by neither the header nor the request size: 32 KB of them inflate to 30 MB."""
    text = zlib.compress(b"\x00" * (1024 * 1024 - 16), 9)
    texts = b"".join(_chunk(b"zTXt", f"note{i}".encode() + b"\x00\x00" + text) for i in range(30))
    png = crafted_png(320, 240, before_pixels=texts)
    assert len(png) < 40_000
    measured = _peak_rss_mb("mask_from_png(data, size=(320, 240))", png)
    print(json.dumps({"png_bytes": len(png)} | measured))
    assert measured["outcome"] == "accepted"
    assert measured["traced_mb"] < 2 and measured["peak_rss_mb"] < 8  # decompressed, the text took 30 MB


# ---- a real review server, and a Prefect API that can go away ---------------------------------------------


class TcpForwarder:
    """Forwards a loopback port to the Prefect test server; ``stop()`` makes the API vanish (connections reset,
    then refused), as when the Prefect server goes down."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close alone would not
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def _start_review_server(api_url: str | None, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"SAM3D_REVIEW_TOKEN": TOKEN, "PREFECT_HOME": str(tmp_path / "prefect-home")}  # no profile's URL
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    proc = subprocess.Popen([sys.executable, "-m", "sam3d_pipeline.cli", "review-server", "--port", str(port)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    return proc, port


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_review_server_refuses_to_start_without_a_reachable_prefect_api(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}/api"
    for api_url, expected in [(None, "PREFECT_API_URL is not set: the review server needs the API of a Prefect "
                                     "server"),
                              (closed, f"Prefect API at {closed} is not reachable: ConnectError")]:
        proc, _ = _start_review_server(api_url, tmp_path)
        try:
            _, stderr = proc.communicate(timeout=60)
        finally:
            _stop(proc)
        lines = stderr.decode().strip().splitlines()
        assert proc.returncode == 2, lines
        assert len(lines) == 1 and lines[0].startswith("error: review-server: ") and expected in lines[0], lines


def _api_routes(run_id: uuid.UUID) -> list[tuple[str, str, dict | None]]:
    base = f"/api/runs/{run_id}"
    return [("GET", "/api/runs", None), ("GET", base, None), ("GET", f"{base}/image", None),
            ("GET", f"{base}/masks/0", None), ("GET", f"{base}/embeddings", None), ("GET", f"{base}/decoder", None),
            ("POST", f"{base}/refine", {"points": [{"x": 1, "y": 1}]}), ("POST", f"{base}/approve", {}),
            ("POST", f"{base}/reject", {}), ("POST", f"{base}/reprompt", {"prompt": "chair"})]


def test_api_answers_503_with_the_reason_when_prefect_is_unreachable():
    """Every API route, in process, against a closed port and with no API configured at all (where Prefect's
    client would otherwise start a temporary server of its own)."""
    from fastapi.testclient import TestClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from sam3d_pipeline.web.app import create_app

    client = TestClient(create_app((TOKEN,), deliver_webhooks=False), raise_server_exceptions=False)
    closed = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings({PREFECT_API_URL: closed}):
        for method, path, body in _api_routes(uuid.uuid4()):
            response = client.request(method, path, headers=AUTH, json=body)
            assert response.status_code == 503, (path, response.text)
            assert response.json()["detail"].startswith(f"Prefect API at {closed} is not reachable: ConnectError")
    started = time.monotonic()
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        for method, path, body in _api_routes(uuid.uuid4()):
            response = client.request(method, path, headers=AUTH, json=body)
            assert response.status_code == 503, (path, response.text)
            assert response.json()["detail"].startswith("PREFECT_API_URL is not set")
    assert time.monotonic() - started < 10  # refused at once: no temporary Prefect server was started


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_prefect_going_away_answers_503_and_the_page_says_why(tmp_path, browser):
    from urllib.parse import urlsplit

    from prefect.settings import PREFECT_API_URL

    upstream = urlsplit(PREFECT_API_URL.value())
    forwarder = TcpForwarder(upstream.port)
    api_url = f"http://127.0.0.1:{forwarder.port}{upstream.path}"
    proc, port = _start_review_server(api_url, tmp_path)
    try:
        wait_for_port(port, proc=proc)
        base = f"http://127.0.0.1:{port}"
        response = requests.get(f"{base}/api/runs", headers=AUTH, timeout=30)
        assert response.status_code == 200, response.text
        forwarder.stop()
        for method, path, body in _api_routes(uuid.uuid4()):
            response = requests.request(method, f"{base}{path}", headers=AUTH, json=body, timeout=60)
            assert response.status_code == 503, (path, response.text)
            assert response.json()["detail"].startswith(f"Prefect API at {api_url} is not reachable: ")
            assert response.headers["Retry-After"]
        page = browser.new_page()
        page.goto(f"{base}/review#token={TOKEN}")
        page.wait_for_selector("#error:not([hidden])", timeout=30_000)
        assert f"Prefect API at {api_url} is not reachable" in page.inner_text("#error")
    finally:
        forwarder.stop()
        _stop(proc)


# ---- the token: Authorization header only ----------------------------------------------------------------


@pytest.mark.usefixtures("prefect_server")
def test_token_only_in_the_authorization_header_with_any_case_scheme():
    from fastapi.testclient import TestClient

    from sam3d_pipeline.web.app import create_app

    client = TestClient(create_app((TOKEN,), deliver_webhooks=False), raise_server_exceptions=False)
    for value in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER   {TOKEN}", f"BeArEr {TOKEN} "):
        assert client.get("/api/runs", headers={"Authorization": value}).status_code == 200, value
    for value in (f"Basic {TOKEN}", TOKEN, "Bearer", f"Bearer {TOKEN}x", f"Bearer{TOKEN}"):
        response = client.get("/api/runs", headers={"Authorization": value})
        assert response.status_code == 401, value
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # A token in the query string is refused, right or wrong, with or without the header, on every path.
    for path in (f"/api/runs?token={TOKEN}", "/api/runs?token=wrong", f"/?token={TOKEN}",
                 f"/static/review.js?token={TOKEN}"):
        for headers in ({}, AUTH):
            response = client.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert "URL query is refused" in response.json()["detail"]


# ---- uploads on a paused run ----------------------------------------------------------------------------


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_uploaded_masks_are_refused_from_their_header_on_a_paused_run(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from .test_review_flow import PausedRun

    monkeypatch.setenv("SAM3D_REVIEW_POLL_INTERVAL_S", "0.2")
    rgb, truth = object_photo()
    run = PausedRun(tmp_path, rgb, review="required")
    run.wait_paused()
    proc, port = _start_review_server(PREFECT_API_URL.value(), tmp_path)
    try:
        wait_for_port(port, proc=proc)
        approve = f"http://127.0.0.1:{port}/api/runs/{run.run_id}/approve"

        def upload(png: bytes) -> requests.Response:
            body = {"mask_png_base64": base64.b64encode(png).decode()}
            return requests.post(approve, headers=AUTH, json=body, timeout=60)

        bomb = crafted_png(20_000, 18_750, value=0)  # 0.49 MB as base64
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset the peak RSS
        before = _peak_rss_kib(proc.pid)
        response = upload(bomb)
        growth_mb = (_peak_rss_kib(proc.pid) - before) / 1024
        print(json.dumps({"request_bytes": len(base64.b64encode(bomb)), "server_peak_rss_growth_mb": growth_mb}))
        assert response.status_code == 413, response.text
        assert "20000x18750 = 375,000,000 pixels" in response.json()["detail"]
        assert "refused before decoding" in response.json()["detail"]
        assert growth_mb < 20
        response = upload(crafted_png(640, 480))
        assert response.status_code == 422, response.text
        assert response.json()["detail"] == "uploaded mask: mask is 640x480, image is 320x240; refused before decoding"
        response = upload(crafted_png(320, 240, extra=b"\xff" * 10_000_000))
        assert response.status_code == 422 and "decompresses to more than" in response.text
        run.wait_paused()  # still waiting in round 1
        response = upload(mask_to_png(truth))
        assert response.status_code == 200, response.text
        assert response.json()["mask_pixels"] == int(truth.sum())
        state = run.finish()
        assert state.is_completed(), state.message
        assert np.array_equal(np.asarray(Image.open(run.prefix / "mask.png")) > 127, truth)
    finally:
        _stop(proc)
