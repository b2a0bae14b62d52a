"""The review page in a real headless Chromium (Debian's), against a paused run on a Prefect test server."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import requests
from PIL import Image

from sam3d_pipeline.masks import iou

from .conftest import REVIEW_TOKEN as TOKEN
from .photos import object_photo
from .test_review_flow import PausedRun

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(autouse=True)
def _fast_polling(monkeypatch):
    monkeypatch.setenv("SAM3D_REVIEW_POLL_INTERVAL_S", "0.2")


def test_api_requires_the_token_and_validates_input(tmp_path, review_server):
    run = PausedRun(tmp_path, object_photo()[0], review="required")
    run.wait_paused()
    base = f"{review_server}/api/runs/{run.run_id}"
    assert requests.get(base, timeout=10).status_code == 401
    assert requests.get(base, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert requests.get(base, params={"token": TOKEN}, timeout=10).status_code == 401  # never in a URL query
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = requests.get(base, headers=auth, timeout=10)
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["width"] == 320 and info["decoder"] == "lite-server"
    response = requests.get(f"{review_server}/api/runs", headers=auth, timeout=10)
    assert response.status_code == 200, response.text
    listed = response.json()
    assert str(run.run_id) in {r["id"] for r in listed}
    # Bad bodies are refused and the run keeps waiting.
    bad = requests.post(f"{base}/refine", headers=auth, json={"points": [{"x": 5000, "y": 1}]}, timeout=10)
    assert bad.status_code == 422 and "outside the image" in bad.text
    bad = requests.post(f"{base}/approve", headers=auth, json={"mask_png_base64": "bm90IGEgcG5n"}, timeout=10)
    assert bad.status_code == 422 and "not a readable mask" in bad.text
    bad = requests.post(f"{base}/approve", headers=auth, json={"instance_index": 9}, timeout=10)
    assert bad.status_code == 422 and "instance_index" in bad.text
    huge = requests.post(f"{base}/refine", headers=auth | {"Content-Type": "application/json"},
                         data=b"x" * (9 * 1024 * 1024), timeout=30)
    assert huge.status_code == 413
    chunked = requests.post(f"{base}/refine", headers=auth | {"Content-Type": "application/json"},
                            data=iter([b'{"points": [', b"]}"]), timeout=10)  # no Content-Length
    assert chunked.status_code == 411
    run.wait_paused()
    assert requests.post(f"{base}/reject", headers=auth, json={"comment": "no"}, timeout=10).status_code == 200
    run.finish()
    assert run.result["status"] == "rejected"


def test_click_refine_and_approve_in_chromium(tmp_path, review_server, browser):
    rgb, truth = object_photo()
    run = PausedRun(tmp_path, rgb, review="required")
    run.wait_paused()
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sent = []
    page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))))
    opened = time.perf_counter()
    page.goto(f"{review_server}/runs/{run.run_id}#token={TOKEN}")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    first_mask_s = time.perf_counter() - opened
    assert "lite segmenter" in page.inner_text("#decoder")
    cy, cx = (float(v.mean()) for v in np.nonzero(truth))
    box = page.locator("#canvas").bounding_box()
    scale = box["width"] / 320
    page.mouse.click(box["x"] + cx * scale, box["y"] + cy * scale)
    page.wait_for_function("document.body.dataset.lastRefineMs !== undefined", timeout=30_000)
    shown_pixels = int(page.get_attribute("#canvas", "data-mask-pixels"))
    page.screenshot(path=str(tmp_path / "review.png"))
    page.click("#approve")
    page.wait_for_function("document.body.dataset.resumed === 'approve'", timeout=30_000)
    state = run.finish()
    assert state.is_completed(), state.message
    result = run.result
    mask = np.asarray(Image.open(run.prefix / "mask.png")) > 127
    assert int(mask.sum()) == shown_pixels  # the mask the page showed is the mask the run used
    assert iou(mask, truth) > 0.85
    assert result["review"]["edited_mask"].startswith("review/final-")
    assert (run.prefix / "object.glb").is_file()
    assert not errors, errors
    # The token travels only in the Authorization header (photo and masks too: fetched, then object URLs).
    assert not [url for url, _ in sent if TOKEN in url.split("#")[0] or "token=" in url.split("#")[0]], sent
    api_calls = [(url, auth) for url, auth in sent if "/api/" in url]
    assert {f"/api/runs/{run.run_id}", f"/api/runs/{run.run_id}/image", f"/api/runs/{run.run_id}/masks/0"} <= {
        url.removeprefix(review_server) for url, _ in api_calls}
    assert all(auth == f"Bearer {TOKEN}" for _, auth in api_calls), api_calls
    print(json.dumps({"first_mask_s": round(first_mask_s, 2),
                      "refine_ms": int(page.evaluate("document.body.dataset.lastRefineMs"))}))


def test_run_list_shows_upload_text_as_text(tmp_path, review_server, browser):
    """Prompts come from upload metadata: the list page shows markup in them as text and runs none of it."""
    prompt = '<img src=x onerror="window.injected = 1">chair'
    run = PausedRun(tmp_path, object_photo()[0], prompt=prompt, review="required")
    run.wait_paused()
    page = browser.new_page()
    page.goto(f"{review_server}/review#token={TOKEN}")
    link = page.locator(f"a[href='/runs/{run.run_id}']")
    link.wait_for(timeout=30_000)
    item = page.locator("#runs li", has=link)
    assert prompt in item.inner_text()
    assert item.locator("img").count() == 0
    assert page.evaluate("window.injected") is None
    link.click()
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    assert prompt in page.inner_text("#meta")
    assert page.evaluate("window.injected") is None
    page.click("#reject")
    page.wait_for_function("document.body.dataset.resumed === 'reject'", timeout=30_000)
    assert run.finish().is_completed()
    assert run.result["status"] == "rejected"


def _expires_in_s(url: str) -> float:
    """Seconds a presigned URL stays valid (SigV4 ``X-Amz-Expires`` or SigV2 ``Expires``)."""
    from urllib.parse import parse_qs, urlsplit

    query = {k.lower(): v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    if "x-amz-expires" in query:
        return float(query["x-amz-expires"])
    return float(query["expires"]) - time.time()


def test_page_reads_s3_files_through_presigned_urls(tmp_path, s3, review_server, browser):
    """Outputs on S3 (moto server in its own process): the page fetches the photo and masks from 5-minute
    presigned URLs, straight from the bucket (CORS for the page's origin), and the run completes."""
    client, bucket = s3
    client.put_bucket_cors(Bucket=bucket, CORSConfiguration={"CORSRules": [{
        "AllowedOrigins": [review_server], "AllowedMethods": ["GET", "HEAD"], "AllowedHeaders": ["*"]}]})
    rgb, truth = object_photo()
    run = PausedRun(tmp_path, rgb, output_root=f"s3://{bucket}/out", review="required")
    run.wait_paused()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    info = requests.get(f"{review_server}/api/runs/{run.run_id}", headers=auth, timeout=10).json()
    image_url = info["files"]["image"]
    assert image_url.startswith("http") and bucket in image_url
    assert 250 <= _expires_in_s(image_url) <= 300  # short-lived
    assert requests.get(image_url, timeout=10).content[:3] == b"\xff\xd8\xff"  # the JPEG, no token needed
    redirect = requests.get(f"{review_server}/api/runs/{run.run_id}/image", headers=auth, timeout=10,
                            allow_redirects=False)
    assert redirect.status_code == 307 and 250 <= _expires_in_s(redirect.headers["location"]) <= 300

    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    s3_requests = []
    page.on("requestfinished", lambda r: s3_requests.append(r.url) if bucket in r.url else None)
    page.goto(f"{review_server}/runs/{run.run_id}#token={TOKEN}")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    assert int(page.get_attribute("#canvas", "data-mask-pixels")) > 0  # the candidate mask came from S3
    assert any("image.jpg" in u for u in s3_requests) and any("mask-" in u for u in s3_requests)
    canvas = page.locator("#canvas")
    scale = canvas.bounding_box()["width"] / 320
    cy, cx = (float(v.mean()) for v in np.nonzero(truth))
    canvas.click(position={"x": cx * scale, "y": cy * scale})
    page.wait_for_function("document.body.dataset.lastRefineMs !== undefined", timeout=30_000)
    shown_pixels = int(page.get_attribute("#canvas", "data-mask-pixels"))
    page.click("#approve")
    page.wait_for_function("document.body.dataset.resumed === 'approve'", timeout=30_000)
    state = run.finish()
    assert state.is_completed(), state.message
    prefix = run.result["output_prefix"].removeprefix(f"s3://{bucket}/")
    mask = np.asarray(Image.open(io.BytesIO(client.get_object(Bucket=bucket, Key=f"{prefix}/mask.png")["Body"].read())))
    assert int((mask > 127).sum()) == shown_pixels
    assert not errors, errors


def test_a_video_review_shows_the_best_frames_and_a_clicked_frame_is_reconstructed(tmp_path, review_server, browser):
    from .test_review_video import assert_reconstructed_from, offered_frames, paused_clip

    clip, run = paused_clip(tmp_path)
    offered = [f["index"] for f in offered_frames(run)]
    base, auth = f"{review_server}/api/runs/{run.run_id}", {"Authorization": f"Bearer {TOKEN}"}
    not_offered = next(i for i in range(len(clip.frames)) if i not in offered)
    assert requests.get(f"{base}/frames/{offered[1]}", timeout=10).status_code == 401
    thumb = requests.get(f"{base}/frames/{offered[1]}", headers=auth, timeout=10)
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size == (96, 72)
    assert requests.get(f"{base}/frames/{not_offered}", headers=auth, timeout=10).status_code == 404
    refused = requests.post(f"{base}/approve", headers=auth, json={"frame": not_offered}, timeout=10)
    assert refused.status_code == 422 and "frame" in refused.text  # the Prefect server's bound
    run.wait_paused()
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{review_server}/runs/{run.run_id}#token={TOKEN}")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    frames = page.locator("#frames .frame")
    assert frames.count() == 4 and page.is_visible("#frames")
    assert [int(frames.nth(i).get_attribute("data-frame-index")) for i in range(4)] == offered
    first = frames.nth(0).inner_text()
    assert first.startswith(f"#{offered[0]} ·") and "view" in first and first.endswith("shown")
    page.wait_for_function("[...document.querySelectorAll('#frames img')].every(i => i.complete && i.naturalWidth)")
    frames.nth(2).click()
    assert [frames.nth(i).get_attribute("aria-pressed") for i in range(4)] == ["false", "false", "true", "false"]
    assert f"frame {offered[2]} picked" in page.inner_text("#status")
    page.click("#approve")
    page.wait_for_selector("body[data-resumed='approve']", timeout=10_000)
    assert_reconstructed_from(run, clip, offered[2])
    assert not errors, errors
