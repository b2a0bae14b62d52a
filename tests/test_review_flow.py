"""Review in the Prefect UI: the flow pauses for a typed answer given from another thread, for every decision."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3d_pipeline.masks import iou, mask_to_png

from .photos import encode, object_photo, two_objects_photo

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(autouse=True)
def _fast_polling(monkeypatch):
    monkeypatch.setenv("SAM3D_REVIEW_POLL_INTERVAL_S", "0.2")


def _schema_saved(client, run) -> bool:
    """The run is Paused before its input schema is stored; answers are validated only once it is."""
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
    from prefect.input.run_input import keyset_from_paused_state

    try:
        client.read_flow_run_input(run.id, keyset_from_paused_state(run.state)["schema"])
    except ObjectNotFound:
        return False
    except PrefectHTTPStatusError as exc:  # the sync client's read_flow_run_input answers a missing input so
        if exc.response.status_code == 404:
            return False
        raise
    return True


class PausedRun:
    """Runs image-to-3d in a thread and gives access to its paused flow run: on ``rgb`` as a photo, or on the file
    ``source`` (a clip) when given."""

    def __init__(self, tmp_path: Path, rgb: np.ndarray | None, output_root: str | None = None, prompt: str = "thing",
                 source: Path | None = None, **params):
        from prefect import tags

        from flows.image_to_3d import image_to_3d

        self.out = tmp_path / "out"
        photo = source or tmp_path / "photo.png"
        if source is None:
            photo.write_bytes(encode(rgb))
        self.tag = f"t-{uuid.uuid4().hex[:10]}"
        self.state = None

        def target():
            with tags(self.tag):
                self.state = image_to_3d(image=str(photo), prompt=prompt, output_root=output_root or str(self.out),
                                         return_state=True, **params)
            # Read the result here: a caller running an event loop (a browser driver) would get a coroutine.
            self.result = self.state.result(raise_on_failure=False)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        self.run_id = None

    def wait_paused(self, round_number: int = 1, timeout_s: float = 60.0):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

        deadline = time.monotonic() + timeout_s
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[self.tag])))
                if runs and runs[0].state.is_paused():
                    self.run_id = runs[0].id
                    key = runs[0].state.state_details.pause_key
                    if key == f"review-round-{round_number}" and _schema_saved(client, runs[0]):
                        return runs[0]
                assert self.thread.is_alive(), f"run ended without pausing: {self.state}"
                time.sleep(0.2)
        raise TimeoutError(f"run did not pause for round {round_number}")

    def resume(self, **answer):
        from prefect.flow_runs import resume_flow_run

        resume_flow_run(self.run_id, run_input=answer)

    def finish(self, timeout_s: float = 120.0):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "run did not finish"
        return self.state

    @property
    def prefix(self) -> Path:
        [prefix] = [p for p in self.out.iterdir() if not p.name.startswith("_")]  # not _decoders/
        return prefix


def test_approve_reconstructs_the_best_instance(tmp_path):
    rgb, truth = object_photo()
    run = PausedRun(tmp_path, rgb, review="required")
    paused = run.wait_paused()
    assert (run.prefix / "review" / "overlay-r1.png").is_file()
    assert not (run.prefix / "result.json").exists()  # nothing published while waiting
    run.resume(action="approve")
    state = run.finish()
    assert state.is_completed(), state.message
    result = state.result()
    assert result["status"] == "completed" and (run.prefix / "object.glb").is_file()
    assert result["review"]["outcome"] == "approved" and result["review"]["rounds"][0]["by"] == "person"
    assert paused.state.state_details.pause_reschedule is False


def test_choose_another_instance(tmp_path):
    rgb, left, right = two_objects_photo()
    run = PausedRun(tmp_path, rgb, review="required")
    run.wait_paused()
    run.resume(action="approve", instance_index=1)
    result = run.finish().result()
    assert result["selected"] == 1
    mask = np.asarray(Image.open(run.prefix / "mask.png")) > 127
    chosen = left if iou(mask, left) > iou(mask, right) else right
    assert iou(mask, chosen) > 0.9
    assert result["instances"][1]["score"] <= result["instances"][0]["score"]  # not the default choice


def test_invalid_input_is_refused_and_the_run_keeps_waiting(tmp_path):
    rgb, _ = object_photo()
    run = PausedRun(tmp_path, rgb, review="required")
    run.wait_paused()
    with pytest.raises(RuntimeError, match="instance_index"):
        run.resume(action="approve", instance_index=5)
    with pytest.raises(RuntimeError, match="action"):
        run.resume(action="maybe")
    with pytest.raises(RuntimeError):
        run.resume(action="reprompt", boxes=[[0, 0, 5000, 10]])  # outside the 320x240 image
    with pytest.raises(RuntimeError, match="frame"):
        run.resume(action="approve", frame=0)  # a photo offers no frame to pick
    run.wait_paused()  # still paused in round 1
    run.resume(action="approve", instance_index=0)
    assert run.finish().result()["status"] == "completed"


def test_reprompt_resegments_and_pauses_again(tmp_path):
    rgb, left, right = two_objects_photo()
    run = PausedRun(tmp_path, rgb, review="required")
    run.wait_paused(1)
    cy, cx = (int(v.mean()) for v in np.nonzero(right))
    run.resume(action="reprompt", prompt="blue disc", points=[{"x": cx, "y": cy, "label": 1}])
    run.wait_paused(2)
    assert (run.prefix / "review" / "overlay-r2.png").is_file()
    run.resume(action="approve")
    result = run.finish().result()
    assert result["prompt"] == "blue disc" and len(result["review"]["rounds"]) == 2
    mask = np.asarray(Image.open(run.prefix / "mask.png")) > 127
    assert iou(mask, right) > 0.85


def test_reject_ends_without_reconstruction(tmp_path):
    rgb, _ = object_photo()
    run = PausedRun(tmp_path, rgb, review="required")
    run.wait_paused()
    run.resume(action="reject", comment="wrong object")
    state = run.finish()
    assert state.is_completed()
    result = state.result()
    assert result["status"] == "rejected" and result["review"]["rounds"][0]["comment"] == "wrong object"
    assert not (run.prefix / "object.glb").exists()
    assert json.loads((run.prefix / "result.json").read_text())["status"] == "rejected"


def test_approve_with_an_edited_mask(tmp_path):
    rgb, truth = object_photo()
    run = PausedRun(tmp_path, rgb, review="required")
    run.wait_paused()
    edited = np.zeros_like(truth)
    edited[60:180, 100:220] = True  # the page's final mask, uploaded under the run's prefix
    (run.prefix / "review" / "final-1.png").write_bytes(mask_to_png(edited))
    run.resume(action="approve", mask_key="review/final-1.png")
    result = run.finish().result()
    mask = np.asarray(Image.open(run.prefix / "mask.png")) > 127
    assert np.array_equal(mask, edited)
    assert result["review"]["edited_mask"] == "review/final-1.png"
    assert result["selected"] == len(result["instances"]) - 1


def test_auto_review_skips_confident_results(tmp_path):
    rgb, _ = object_photo()
    run = PausedRun(tmp_path, rgb, review="auto", review_auto_approve_score=0.1)
    result = run.finish().result()
    assert result["status"] == "completed" and result["review"]["reason"].startswith("auto-approved")


def test_timeout_fails_by_default(tmp_path):
    rgb, _ = object_photo()
    run = PausedRun(tmp_path, rgb, review="required", review_timeout_s=2)
    state = run.finish()
    assert state.is_failed() and "review timed out (policy: fail)" in state.message
    assert json.loads((run.prefix / "result.json").read_text())["error"]["code"] == "review_timeout"


def test_timeout_approves_when_confident_and_policy_allows(tmp_path):
    rgb, _ = object_photo()
    run = PausedRun(tmp_path, rgb, review="required", review_timeout_s=2, review_on_timeout="approve_if_confident",
                    review_auto_approve_score=0.1)
    state = run.finish()
    assert state.is_completed(), state.message
    result = state.result()
    assert result["status"] == "completed" and result["review"]["outcome"] == "timeout-approve"
