"""Review of a video: each round offers the best tracked frames, and an answer picking frame k reconstructs from
frame k (inline here; on the GPU workers in ``test_gpu_workers.py``; in the browser in ``test_review_page.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3d_pipeline.masks import iou
from sam3d_pipeline.review import prefect_api

from .clips import Clip, encode, moving_object
from .test_review_flow import PausedRun

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

CLIP_FRAMES = 60


@pytest.fixture(autouse=True)
def _fast_polling(monkeypatch):
    monkeypatch.setenv("SAM3D_REVIEW_POLL_INTERVAL_S", "0.2")


def paused_clip(tmp_path: Path, **params) -> tuple[Clip, PausedRun]:
    """A short clip of a red disc, run with review required (lite backends), waiting in round 1."""
    clip = moving_object(CLIP_FRAMES)
    path = tmp_path / "clip.mp4"
    path.write_bytes(encode(clip.frames, "mp4"))
    run = PausedRun(tmp_path, None, source=path, prompt="red disc", review="required", segmenter="lite",
                    reconstructor="lite", export=["glb"], **params)
    run.wait_paused(timeout_s=120)
    return clip, run


def offered_frames(run: PausedRun) -> list[dict]:
    return prefect_api.review_context(run.run_id).frames


def assert_reconstructed_from(run: PausedRun, clip: Clip, k: int) -> dict:
    """The run completed from source frame ``k``, picked by the reviewer: result.json, frame.png and the mask say so."""
    state = run.finish()
    assert state.is_completed(), state.message
    result = run.result  # read in the run's thread (a browser driver's event loop would make it a coroutine here)
    assert result["status"] == "completed" and result["review"]["frame"] == k
    assert result["video"]["chosen"]["index"] == k and result["video"]["chosen"]["chosen_by"] == "reviewer"
    assert Image.open(run.prefix / "frame.png").text["frame_index"] == str(k)
    assert iou(np.asarray(Image.open(run.prefix / "mask.png")) > 127, clip.truth[k]) > 0.7
    assert any(f"the reviewer picked frame {k}" in m for m in result["messages"])
    return result


def test_a_review_that_picks_frame_k_reconstructs_from_frame_k(tmp_path):
    clip, run = paused_clip(tmp_path)
    frames = offered_frames(run)
    assert len(frames) == 4 and [f["chosen"] for f in frames] == [True, False, False, False]  # the best is shown
    assert [f["view_score"] for f in frames] == sorted((f["view_score"] for f in frames), reverse=True)
    assert set(frames[0]) == {"index", "time_s", "score", "view_score", "overlay_key", "chosen"}
    for f in frames:
        assert Image.open(run.out / f["overlay_key"]).size == (96, 72) and clip.whole(f["index"])
    k = frames[2]["index"]  # not the default choice
    assert k != frames[0]["index"]
    not_offered = next(i for i in range(CLIP_FRAMES) if i not in {f["index"] for f in frames})
    with pytest.raises(RuntimeError, match="frame"):  # the Prefect server refuses it; the run keeps waiting
        run.resume(action="approve", frame=not_offered)
    run.wait_paused()
    run.resume(action="approve", frame=k)
    result = assert_reconstructed_from(run, clip, k)
    assert result["review"]["rounds"] == [{"round": 1, "by": "person", "action": "approve", "boxes": [], "points": [],
                                           "frame": k}]


def test_settings_bound_the_frames_offered_and_a_plain_approval_keeps_the_best_view(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM3D_REVIEW_VIDEO_FRAMES", "2")
    _, run = paused_clip(tmp_path, video_frames=2)
    frames = offered_frames(run)
    assert len(frames) == 2 and frames[0]["chosen"]
    run.resume(action="approve")
    result = run.finish().result()
    assert result["status"] == "completed" and result["review"]["frame"] == frames[0]["index"]
    assert result["video"]["chosen"] == result["video"]["chosen"] | {"index": frames[0]["index"],
                                                                     "chosen_by": "view_score"}
