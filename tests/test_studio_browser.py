"""The studio page in Debian's Chromium on the local stack (``sam3d-pipeline up``): upload a photo with a prompt,
review the mask with a click, confirm, and see the GLB in ``<model-viewer>``; refusals shown as text.

:class:`StudioPage` drives the page; ``bench/studio_latency.py`` times the same steps with it.
"""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from sam3d_pipeline.masks import iou

from .conftest import CHROMIUM
from .photos import encode, object_photo
from .stack import STACK_MAX_INPUT_BYTES

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is installed by `make test`")]

JOB_URL = re.compile(r"/jobs/([0-9a-f-]{36})$")
VIEWPORT = {"width": 1280, "height": 1000}


class StudioPage:
    """One browser tab on the studio, with the steps of the loop and what the page reports after each.

    Times are the browser's own clock (epoch milliseconds): ``submitted_ms`` when Create was clicked,
    ``first_mask_ms`` when the first candidate mask was painted, ``confirmed_ms`` when Confirm was clicked,
    ``glb_ms`` when ``<model-viewer>`` had loaded object.glb and painted a frame.
    """

    def __init__(self, page, web_url: str, token: str, shots: Path | None = None) -> None:
        self.page = page
        self.web, self.token, self.shots = web_url, token, shots
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.page.on("console", lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None)
        self.requests: list[tuple[str, str | None]] = []
        self.page.on("request", lambda r: self.requests.append((r.url, r.headers.get("authorization"))))
        self.job_id: str | None = None

    def shot(self, name: str) -> None:
        if self.shots is not None:
            self.shots.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    def open(self, token: str | None = None) -> None:
        self.page.goto(f"{self.web}/#token={token or self.token}")
        self.page.wait_for_selector("body[data-studio-ready='1'], #login:not([hidden])", timeout=30_000)

    def fill(self, photo: bytes, prompt: str, review: str, name: str = "photo.png", mime: str = "image/png") -> None:
        self.page.set_input_files("#image", files=[{"name": name, "mimeType": mime, "buffer": photo}])
        self.page.fill("#job-prompt", prompt)
        self.page.select_option("#review-mode", review)

    def submit(self) -> str:
        """Click Create and wait for the job's page; returns the job id."""
        self.submitted_ms = self.page.evaluate("window.sameDocument = true; Date.now()")
        self.page.click("#submit")
        self.page.wait_for_function("/^\\/jobs\\//.test(location.pathname) || "
                                    "!document.getElementById('form-error').hidden", timeout=60_000)
        assert JOB_URL.search(self.page.url), self.page.inner_text("#form-error")
        self.page.wait_for_load_state()
        assert self.page.evaluate("window.sameDocument === true")  # the job's page came without a page load
        self.job_id = JOB_URL.search(self.page.url).group(1)
        return self.job_id

    def wait_first_mask(self, timeout_s: float = 120) -> int:
        """Wait for the review section's first candidate mask; returns its pixels."""
        self.page.wait_for_selector("body[data-ready='1']", timeout=timeout_s * 1000)
        self.first_mask_ms = self.page.evaluate("performance.timeOrigin + Number(document.body.dataset.firstMaskMs)")
        return self.mask_pixels()

    def mask_pixels(self) -> int:
        return int(self.page.get_attribute("#canvas", "data-mask-pixels"))

    def click_image(self, x: float, y: float, width: int) -> float:
        """Click at image pixel (x, y) on the review canvas; returns the refinement's milliseconds."""
        refined = len(self.page.evaluate("window.reviewClicks"))
        box = self.page.locator("#canvas").bounding_box()
        scale = box["width"] / width
        self.page.mouse.click(box["x"] + x * scale, box["y"] + y * scale)
        self.page.wait_for_function(f"window.reviewClicks.length > {refined}", timeout=30_000)
        return float(self.page.evaluate("window.reviewClicks.at(-1).totalMs"))

    def confirm(self, timeout_s: float = 120) -> None:
        """Click Confirm and wait until ``<model-viewer>`` has loaded the job's object.glb."""
        self.confirmed_ms = self.page.evaluate("Date.now()")
        self.page.click("#approve")
        self.page.wait_for_function("document.body.dataset.resumed === 'approve' || "
                                    "/refused/.test(document.getElementById('status').textContent)", timeout=90_000)
        assert self.page.get_attribute("body", "data-resumed") == "approve", self.page.inner_text("#status")
        self.page.wait_for_selector("body[data-glb-loaded='1'], #job-error:not([hidden])", timeout=timeout_s * 1000)
        assert self.page.get_attribute("body", "data-glb-loaded") == "1", self.page.inner_text("#job-error")
        self.glb_ms = float(self.page.get_attribute("body", "data-glb-loaded-at"))

    def close(self) -> None:
        self.page.close()


def job(stack, job_id: str) -> dict:
    response = requests.get(f"{stack.web}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {stack.token}"},
                            timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def job_ids(stack) -> set[str]:
    response = requests.get(f"{stack.web}/v1/jobs", params={"limit": 200},
                            headers={"Authorization": f"Bearer {stack.token}"}, timeout=30)
    assert response.status_code == 200, response.text
    return {j["id"] for j in response.json()["jobs"]}


def test_studio_upload_review_click_confirm_and_view_the_glb(stack, browser, tmp_path):
    shots = tmp_path / "studio-screenshots"
    print(f"\nstudio screenshots: {shots}")
    rgb, truth = object_photo(320, 240, seed=19)
    prompt = f"red ellipse {uuid.uuid4().hex[:6]}"  # a new output prefix: never a finished result to reuse
    studio = StudioPage(browser.new_page(viewport=VIEWPORT), stack.web, stack.token, shots)
    studio.open()
    try:
        the_whole_loop(stack, studio, rgb, truth, prompt)
    except Exception:
        studio.shot("failed-here")
        raise
    finally:
        studio.close()


def the_whole_loop(stack, studio: StudioPage, rgb: np.ndarray, truth: np.ndarray, prompt: str) -> None:
    laps, last = {}, [time.perf_counter()]

    def lap(name: str) -> None:  # seconds per step, printed at the end
        laps[name] = round(time.perf_counter() - last[0], 1)
        last[0] = time.perf_counter()

    assert studio.page.is_visible("#job-form")
    studio.fill(encode(rgb), prompt, "required", name="ellipse.png")
    assert studio.page.is_visible("#photo-preview")
    studio.shot("1-photo-and-prompt")
    lap("fill")

    job_id = studio.submit()
    first_pixels = studio.wait_first_mask()
    assert first_pixels > 0
    assert studio.page.get_attribute("body", "data-job-status") == "awaiting_review"
    assert studio.page.locator("#instances input[type=radio]").count() >= 1  # the candidate masks
    assert prompt in studio.page.inner_text("#meta")
    studio.shot("2-candidate-mask")
    lap("submit_to_first_mask")

    # A reviewer looking at the mask leaves the page idle: the viewer makes its one-off set-up render then, out of
    # sight (the result section is hidden again once it has).
    studio.page.wait_for_function("window.studio.marks['viewer-warm']", timeout=60_000)
    assert not studio.page.is_visible("#result") and not studio.page.is_visible("#viewer")
    lap("viewer_set_up_while_idle")

    cy, cx = (float(v.mean()) for v in np.nonzero(truth))
    click_ms = studio.click_image(cx, cy, 320)
    shown_pixels = studio.mask_pixels()
    assert shown_pixels > 0
    assert studio.page.evaluate("window.reviewClicks.length") == 1
    (point,) = studio.page.evaluate("window.reviewState.points")  # the click became one object point
    assert point["label"] == 1 and abs(point["x"] - cx) <= 2 and abs(point["y"] - cy) <= 2, point
    studio.shot("3-refined-by-a-click")
    lap("click")

    studio.confirm()
    assert studio.page.evaluate("document.getElementById('viewer').loaded") is True
    lap("confirm_to_glb")  # the GLB is published before the slower formats: it can be on screen while the run ends
    studio.page.wait_for_selector("body[data-job-status='completed']", timeout=120_000)
    assert studio.page.evaluate("window.studio.shownGlbBytes") == len(requests.get(
        job(stack, job_id)["outputs"]["object.glb"], timeout=10).content)  # the GLB shown is the final one
    studio.shot("4-glb-in-model-viewer")
    lap("screenshot_of_the_viewer")

    final = job(stack, job_id)
    assert final["status"] == "completed", final
    assert final["prompt"] == prompt and final["review"] == "required"
    # The mask the page showed after the click is the mask the run reconstructed.
    mask_png = requests.get(final["outputs"]["mask.png"], timeout=10)
    assert mask_png.status_code == 200
    mask = np.asarray(Image.open(io.BytesIO(mask_png.content))) > 127
    assert int(mask.sum()) == shown_pixels
    assert iou(mask, truth) > 0.85
    assert final["result"]["review"]["edited_mask"].startswith("review/final-")
    # Every output is linked, each with the backend that made it; the summary names both backends.
    links = dict(studio.page.eval_on_selector_all("#downloads a", "as => as.map(a => [a.textContent, a.href])"))
    assert set(links) == set(final["outputs"]) and {"object.glb", "mask.png", "result.json"} <= set(links)
    downloads = studio.page.inner_text("#downloads")
    segmenter, reconstructor = final["backends"]["segmenter"]["name"], final["backends"]["reconstructor"]["name"]
    assert f"mask.png · made by the segmenter {segmenter}" in downloads
    assert f"object.glb · made by the reconstructor {reconstructor}" in downloads
    summary = studio.page.inner_text("#summary")
    assert f"{segmenter}" in summary and f"{reconstructor}" in summary and "mask refined by clicks" in summary
    # The new job heads the list of recent jobs.
    studio.page.wait_for_selector(f"#jobs a[href='/jobs/{job_id}']", timeout=10_000)
    assert studio.page.get_attribute("#jobs li:first-child a", "href") == f"/jobs/{job_id}"
    assert not studio.errors, studio.errors
    # The token travels only in the Authorization header, never in a URL.
    assert not [url for url, _ in studio.requests if stack.token in url.split("#")[0]]
    calls = [(url, auth) for url, auth in studio.requests if url.startswith(stack.web) and ("/v1/" in url
                                                                                          or "/api/" in url)]
    assert calls and all(auth == f"Bearer {stack.token}" for _, auth in calls), calls
    lap("checks")
    print(json.dumps({"submit_to_first_mask_s": round((studio.first_mask_ms - studio.submitted_ms) / 1000, 2),
                      "click_refine_ms": round(click_ms),
                      "confirm_to_glb_s": round((studio.glb_ms - studio.confirmed_ms) / 1000, 2),
                      "test_steps_s": laps}))


def test_studio_shows_refusals_as_text_and_creates_no_job(stack, browser, tmp_path):
    before = job_ids(stack)
    studio = StudioPage(browser.new_page(viewport=VIEWPORT), stack.web, stack.token, tmp_path / "studio-screenshots")
    studio.open()
    studio.fill(b"these are notes, not a photo\n", "mug", "none", name="notes.txt", mime="text/plain")
    studio.page.click("#submit")
    studio.page.wait_for_selector("#form-error:not([hidden])", timeout=30_000)
    error = studio.page.inner_text("#form-error")
    assert error.startswith("The job was not created: 422") and "notes.txt" in error, error

    big = np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)
    data = encode(big)
    assert len(data) > STACK_MAX_INPUT_BYTES
    studio.fill(data, "mug", "none", name="huge.png")
    studio.page.click("#submit")
    studio.page.wait_for_function("document.getElementById('form-error').textContent.includes('413')",
                                  timeout=30_000)
    assert "SAM3D_MAX_INPUT_BYTES" in studio.page.inner_text("#form-error")
    studio.shot("refused-too-large")

    wrong = StudioPage(browser.new_page(), stack.web, stack.token)
    wrong.open(token="not-the-token")
    assert wrong.page.is_visible("#login")
    wrong.page.wait_for_function("document.getElementById('error').textContent.includes('401')", timeout=10_000)
    assert "missing or wrong token" in wrong.page.inner_text("#error")
    # A link whose token cannot go into a header (a newline, a non-Latin-1 letter) asks for the token again.
    for bad in ("bad%0Atoken", "caf%C3%A9-%E2%9C%93"):
        odd = StudioPage(browser.new_page(), stack.web, stack.token)
        odd.open(token=bad)
        odd.page.wait_for_selector("#login:not([hidden])", timeout=10_000)
        assert "cannot be right" in odd.page.inner_text("#error")
        assert "did not answer" not in odd.page.inner_text("body")
        odd.close()
        page = browser.new_page()
        page.goto(f"{stack.web}/review#token={bad}")
        page.wait_for_selector("#login:not([hidden])", timeout=10_000)
        page.close()
    time.sleep(0.5)  # anything submitted would be listed by now
    assert job_ids(stack) == before
    studio.close()
    wrong.close()


def test_studio_uploads_a_clip_and_shows_its_track_and_chosen_frame(stack, browser, tmp_path):
    from .clips import encode as encode_clip
    from .clips import moving_object

    clip = encode_clip(moving_object(240, seed=23).frames[:90:2], "webm")  # 1.5 s, 96x72: the lite tracker follows it
    prompt = f"red disc {uuid.uuid4().hex[:6]}"
    studio = StudioPage(browser.new_page(viewport=VIEWPORT), stack.web, stack.token, tmp_path / "studio-screenshots")
    studio.open()
    try:
        studio.fill(clip, prompt, "required", name="turntable.webm", mime="video/webm")
        assert studio.page.is_visible("#video-preview") and not studio.page.is_visible("#photo-preview")
        assert studio.page.get_attribute("body", "data-chosen") == "video"
        studio.page.fill("#video-frames", "2")
        studio.shot("video-1-clip-and-prompt")
        job_id = studio.submit()
        # The review offers the best tracked frames; the reviewer picks another than the one shown.
        studio.wait_first_mask(timeout_s=240)
        frames = studio.page.locator("#frames .frame")
        assert studio.page.is_visible("#frames") and frames.count() >= 2
        studio.page.wait_for_function("[...document.querySelectorAll('#frames img')].every(i => i.complete && "
                                      "i.naturalWidth)")
        picked = int(frames.nth(1).get_attribute("data-frame-index"))
        frames.nth(1).click()
        assert f"frame {picked} picked" in studio.page.inner_text("#status")
        studio.shot("video-2-review-frames")
        studio.confirm(timeout_s=240)
        studio.page.wait_for_selector("body[data-track-shown='1'], #job-error:not([hidden])", timeout=240_000)
        assert studio.page.get_attribute("body", "data-track-shown") == "1", studio.page.inner_text("#job-error")
        assert studio.page.get_attribute("body", "data-job-status") == "completed"
        studio.shot("video-3-track-and-frame")
        final = job(stack, job_id)
        video = final["result"]["video"]
        chosen = video["chosen"]
        assert final["input"]["kind"] == "video" and final["result"]["review"]["frame"] == picked
        assert chosen["index"] == picked and chosen["chosen_by"] == "reviewer", chosen
        info = studio.page.inner_text("#video-info")
        assert f"frame {chosen['index']} at {chosen['time_s']:.2f} s, view score {chosen['view_score']:.2f}" in info
        assert f"{video['frames_tracked']} of {video['frames_sampled']} sampled frames" in info
        assert f"frame {chosen['index']} at" in studio.page.inner_text("#frame-caption")
        sizes = studio.page.evaluate("['track-image', 'frame-image'].map((id) => document.getElementById(id))"
                                     ".map((img) => [img.naturalWidth, img.complete])")
        assert all(width > 0 and complete for width, complete in sizes), sizes
        details = studio.page.inner_text("#job-details")
        assert "video (WEBM" in details and "45 frames" in details, details
        links = studio.page.eval_on_selector_all("#downloads a", "as => as.map(a => a.textContent)")
        assert {"track.webp", "frame.png"} <= set(links)
        assert not studio.errors, studio.errors
    except Exception:
        studio.shot("video-failed-here")
        raise
    finally:
        studio.close()
    # A clip the run would refuse is refused at upload, with the API's reason, and no job is made.
    before = job_ids(stack)
    refused = StudioPage(browser.new_page(viewport=VIEWPORT), stack.web, stack.token)
    refused.open()
    refused.fill(clip[: len(clip) // 2], "red disc", "none", name="cut.webm", mime="video/webm")
    refused.page.click("#submit")
    refused.page.wait_for_selector("#form-error:not([hidden])", timeout=30_000)
    error = refused.page.inner_text("#form-error")
    assert error.startswith("The job was not created: 422") and "cut.webm: truncated" in error, error
    assert job_ids(stack) == before
    refused.close()
