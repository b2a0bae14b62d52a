"""The review page's in-browser click decoder (onnxruntime-web in Debian's headless Chromium) on a run paused
with the real sam3 segmenter (random weights on the CPU): the mask the browser shows equals onnxruntime's mask
in Python for the same clicks, and the approved run uses exactly that mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

pytest.importorskip("sam3")
pytest.importorskip("onnxruntime")

from sam3d_pipeline.backends.sam3 import clickdecoder, embeddings
from sam3d_pipeline.review.server import ORT_DIST  # noqa: E402
from sam3d_pipeline.samples import sample_path  # noqa: E402
from sam3d_pipeline.types import Point  # noqa: E402

from .conftest import REVIEW_TOKEN as TOKEN  # noqa: E402
from .test_review_flow import PausedRun  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
LOGIT_TOLERANCE = 0.01  # wasm vs native onnxruntime on the same uint8 decoder: measured at most 0.0035


def _clicks(page, n: int, timeout_s: float = 60) -> list[dict]:
    page.wait_for_function(f"window.reviewClicks.length >= {n}", timeout=timeout_s * 1000)
    return page.evaluate("window.reviewClicks")


def test_browser_decoder_mask_equals_onnxruntime_and_the_run_uses_it(tmp_path, review_server, browser, monkeypatch):
    assert ORT_DIST.is_dir(), "onnxruntime-web is not installed: make review-assets"
    monkeypatch.setenv("SAM3D_REVIEW_POLL_INTERVAL_S", "0.2")
    monkeypatch.setenv("SAM3D_SAM3_RANDOM_INIT", "true")
    monkeypatch.setenv("SAM3D_SAM3_CONFIDENCE_THRESHOLD", "0")
    rgb = np.asarray(Image.open(sample_path("coffee")).convert("RGB"))
    height, width = rgb.shape[:2]
    run = PausedRun(tmp_path, rgb, review="required", segmenter="sam3", reconstructor="lite")
    run.wait_paused(timeout_s=900)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    info = requests.get(f"{review_server}/api/runs/{run.run_id}", headers=auth, timeout=10).json()
    assert info["decoder"] == "onnx-web", info
    assert info["decoder_cache_key"].startswith("_decoders/sam3-") and info["decoder_cache_key"].endswith(".onnx")
    assert requests.get(f"{review_server}{info['embeddings_url']}", timeout=10).status_code == 401

    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{review_server}/runs/{run.run_id}#token={TOKEN}")
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    page.wait_for_selector("body[data-decoder='onnx-web']", timeout=120_000)
    assert page.evaluate("self.crossOriginIsolated") is True
    assert int(page.evaluate("document.body.dataset.decoderThreads")) >= 1
    assert "onnxruntime-web" in page.inner_text("#decoder")

    canvas = page.locator("#canvas")
    scale = canvas.bounding_box()["width"] / width
    clicks = [(300, 210, False), (250, 180, False), (90, 60, True)]  # two on the cup, one background
    for n, (x, y, negative) in enumerate(clicks, start=1):
        canvas.click(position={"x": (x + 0.5) * scale, "y": (y + 0.5) * scale}, modifiers=["Shift"] if negative else [])
        recorded = _clicks(page, n)
    assert [c["decoder"] for c in recorded] == ["onnx-web"] * 3
    points = [Point(p["x"], p["y"], p["label"]) for p in page.evaluate("window.reviewState.points")]
    assert [p.label for p in points] == [1, 1, 0]
    shown = np.array(page.evaluate("Array.from(window.reviewState.mask)"), dtype=bool).reshape(height, width)

    # The same decoder file and stored embeddings, through onnxruntime in Python: the same logits (dynamic
    # uint8 quantisation in wasm and in native code may round an activation differently: measured at most
    # 0.0035), the same output chosen, and the same mask up to pixels whose logit sits at the threshold (with
    # random weights the logits have a standard deviation of ~0.08, so a few hundred may flip).
    decoder = clickdecoder.OnnxClickDecoder(tmp_path / "out" / info["decoder_cache_key"])
    features = embeddings.decode((run.prefix / "review" / "embeddings.bin").read_bytes())
    low, iou = decoder.raw(features, points, None, width, height)
    browser = page.evaluate("(({lowRes, iou, index}) => ({low: Array.from(lowRes), iou, index}))"
                            "(window.reviewState.decoder.lastOutput)")
    browser_low = np.array(browser["low"], np.float32).reshape(low.shape)
    assert np.abs(browser_low - low).max() <= LOGIT_TOLERANCE
    assert np.abs(np.array(browser["iou"]) - iou[0]).max() <= LOGIT_TOLERANCE
    assert browser["index"] == clickdecoder.choose_mask(low[0], iou[0], len(points), False)
    expected, _ = decoder.decode(features, points, None, width, height)
    differing = int((shown != expected).sum())
    assert shown.any() and differing <= 0.01 * shown.size, f"{differing} pixels differ"
    assert embeddings.mask_iou(shown, expected) >= 0.98

    page.click("#approve")
    page.wait_for_function("document.body.dataset.resumed === 'approve'", timeout=30_000)
    state = run.finish(timeout_s=300)
    assert state.is_completed(), state.message
    used = np.asarray(Image.open(run.prefix / "mask.png")) > 127
    assert np.array_equal(used, shown)  # the mask the page showed is the mask the run reconstructed
    assert run.result["review"]["edited_mask"].startswith("review/final-")
    assert run.result["segmenter"]["name"] == "sam3"
    assert not errors, errors
    print(json.dumps({"clicks_ms": [round(c["totalMs"], 1) for c in recorded], "differing_pixels": differing,
                      "embeddings_bytes": Path(run.prefix / "review" / "embeddings.bin").stat().st_size}))
