"""The review's decisions as a state machine: every answer and timeout → the next step and the recorded rounds."""

from __future__ import annotations

import numpy as np
import pytest

from sam3d_pipeline import backends
from sam3d_pipeline.errors import InputError
from sam3d_pipeline.masks import iou, mask_from_png, mask_to_png
from sam3d_pipeline.review.machine import (
    Answer,
    Ask,
    ReadMask,
    Resegment,
    ReviewConfig,
    ReviewFailed,
    ReviewMachine,
    ReviewOutcome,
    apply_review,
)
from sam3d_pipeline.run import finish, pipeline
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import BackendInfo, Instance, Point, Segmentation

from .photos import two_objects_photo

W, H = 64, 48


def _instance(x0: int, y0: int, x1: int, y1: int, score: float) -> Instance:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return Instance(mask=mask, box=(float(x0), float(y0), float(x1), float(y1)), score=score)


def _seg(*instances: Instance) -> Segmentation:
    return Segmentation(list(instances), BackendInfo("lite", "1"), used_text_prompt=False)


TWO = _seg(_instance(5, 5, 25, 30, 0.8), _instance(35, 10, 60, 40, 0.4))


def _machine(seg: Segmentation = TWO, selected: int | None = 0, on_timeout="fail", auto_approve_score=0.5,
             options: pipeline.RunOptions | None = None) -> ReviewMachine:
    config = ReviewConfig("required", "review required", auto_approve_score, 600.0, on_timeout)
    return ReviewMachine(config, seg=seg, selected=selected, options=options or pipeline.RunOptions(prompt="thing"))


def _header(machine: ReviewMachine) -> dict:
    return {k: machine.record[k] for k in ("mode", "reason", "on_timeout", "timeout_s")}


def test_first_step_asks_in_round_one_and_the_record_names_the_config():
    machine = _machine(on_timeout="approve_if_confident")
    assert machine.start() == Ask(1, None)
    assert machine.record == {"mode": "required", "reason": "review required", "on_timeout": "approve_if_confident",
                              "timeout_s": 600.0, "rounds": []}
    assert machine.wait_s(0.0) == 600.0 and machine.wait_s(599.5) == 1.0  # never less than a second


def test_approve_takes_the_selected_instance():
    machine = _machine()
    outcome = machine.answer(Answer(), elapsed_s=12.34)
    assert isinstance(outcome, ReviewOutcome)
    assert (outcome.status, outcome.selected, outcome.seg, outcome.edited_mask) == ("approved", 0, TWO, None)
    assert outcome.record == _header(machine) | {
        "rounds": [{"round": 1, "by": "person", "action": "approve", "boxes": [], "points": []}],
        "outcome": "approved", "waited_s": 12.3,
    }


def test_approve_with_an_instance_index_takes_that_instance():
    outcome = _machine().answer(Answer(instance_index=1, comment="the other one"), elapsed_s=3)
    assert isinstance(outcome, ReviewOutcome) and (outcome.status, outcome.selected) == ("approved", 1)
    assert outcome.record["rounds"] == [{"round": 1, "by": "person", "action": "approve", "instance_index": 1,
                                         "boxes": [], "points": [], "comment": "the other one"}]


def test_approve_with_an_edited_mask_reads_it_and_approves_it():
    machine = _machine()
    step = machine.answer(Answer(instance_index=1, mask_key="review/final-abc.png"), elapsed_s=7.0)
    assert step == ReadMask("review/final-abc.png")
    edited = np.zeros((H, W), bool)
    edited[10:20, 30:50] = True
    outcome = machine.mask_read(mask_from_png(mask_to_png(edited), size=(W, H), source=step.key))
    assert isinstance(outcome, ReviewOutcome) and outcome.status == "approved"
    assert outcome.selected == 1 and np.array_equal(outcome.edited_mask, edited)  # refines instance 1
    assert outcome.record["edited_mask"] == "review/final-abc.png"
    assert outcome.record["edited_mask_box"] == [30.0, 10.0, 50.0, 20.0]
    assert outcome.record["outcome"] == "approved" and outcome.record["waited_s"] == 7.0
    assert outcome.record["rounds"][0]["mask_key"] == "review/final-abc.png"


def test_an_edited_mask_of_the_wrong_size_is_refused_and_the_review_asks_again():
    machine = _machine()
    step = machine.answer(Answer(mask_key="review/final-small.png"), elapsed_s=1)
    with pytest.raises(InputError) as refused:
        mask_from_png(mask_to_png(np.ones((10, 10), bool)), size=(W, H), source=step.key)
    step = machine.mask_refused(refused.value)
    assert isinstance(step, Ask) and step.round_number == 2
    assert step.note.startswith("approval refused: ") and "review/final-small.png" in step.note
    assert step.note.endswith("; still waiting")
    assert "outcome" not in machine.record and "edited_mask" not in machine.record
    outcome = machine.answer(Answer(), elapsed_s=2)  # round 2: a plain approval still works
    assert outcome.selected == 0 and outcome.edited_mask is None
    assert [r["round"] for r in outcome.record["rounds"]] == [1, 2]


def test_approve_with_nothing_found_asks_again():
    machine = _machine(seg=_seg(), selected=None)
    step = machine.answer(Answer(), elapsed_s=1)
    assert step == Ask(2, "nothing to approve: no instance found; re-prompt or reject")
    assert "outcome" not in machine.record and len(machine.record["rounds"]) == 1


def test_reject_ends_the_review():
    machine = _machine()
    outcome = machine.answer(Answer(action="reject", comment="wrong object"), elapsed_s=4.56)
    assert isinstance(outcome, ReviewOutcome)
    assert (outcome.status, outcome.selected, outcome.edited_mask) == ("rejected", 0, None)
    assert outcome.record == _header(machine) | {
        "rounds": [{"round": 1, "by": "person", "action": "reject", "boxes": [], "points": [],
                    "comment": "wrong object"}],
        "outcome": "rejected", "waited_s": 4.6,
    }


@pytest.mark.parametrize(
    ("answer", "changed", "threshold"),
    [
        (Answer(action="reprompt", prompt="  blue disc "), {"prompt": "blue disc"}, None),
        (Answer(action="reprompt", boxes=((1, 2, 30, 40),)), {"boxes": [(1, 2, 30, 40)]}, None),
        (Answer(action="reprompt", points=(Point(10, 20, 0),)), {"points": [Point(10, 20, 0)]}, None),
        (Answer(action="reprompt", score_threshold=0.25), {}, 0.25),
    ],
    ids=["prompt", "boxes", "points", "score_threshold"],
)
def test_reprompt_resegments_with_the_new_options_and_no_instance_index(answer, changed, threshold):
    before = pipeline.RunOptions(prompt="thing", boxes=[(0, 0, 10, 10)], instance_index=1)
    machine = _machine(options=before, selected=1)
    step = machine.answer(answer, elapsed_s=1)
    assert isinstance(step, Resegment) and step.round_number == 2 and step.score_threshold == threshold
    expected = {"prompt": "thing", "boxes": [(0, 0, 10, 10)], "points": [], "instance_index": None} | changed
    assert {k: getattr(step.options, k) for k in expected} == expected
    assert machine.options is before and machine.round_number == 1  # nothing changes until it is segmented
    assert machine.record["rounds"][0]["action"] == "reprompt" and "outcome" not in machine.record


def test_a_resegmentation_is_shown_in_the_next_round_and_then_approved():
    rgb, left, right = two_objects_photo()
    height, width = right.shape
    segmenter = backends.get_segmenter("lite", Settings())
    options = pipeline.RunOptions(prompt="thing")
    first = segmenter.segment(rgb, pipeline.segment_request(options, width, height))
    config = ReviewConfig("required", "review required", 0.5, 600.0, "fail")
    machine = ReviewMachine(config, seg=first, selected=0, options=options)

    cy, cx = (float(v.mean()) for v in np.nonzero(right))
    step = machine.answer(Answer.from_form({"action": "reprompt", "prompt": "blue disc",
                                            "points": [{"x": cx, "y": cy, "label": 1}]}), elapsed_s=5)
    assert isinstance(step, Resegment) and step.options.points == [Point(cx, cy, 1)]
    seg = segmenter.segment(rgb, pipeline.segment_request(step.options, width, height))
    step = machine.segmented(seg)
    assert step == Ask(2, f"re-segmented for prompt 'blue disc': {len(seg.instances)} instance(s)")
    assert machine.seg is seg and machine.selected == 0 and machine.options.prompt == "blue disc"

    outcome = machine.answer(Answer(instance_index=0), elapsed_s=9)
    assert outcome.status == "approved" and outcome.options.prompt == "blue disc"
    assert iou(outcome.seg.instances[outcome.selected].mask, right) > 0.85
    assert outcome.record["rounds"][0] == {"round": 1, "by": "person", "action": "reprompt", "prompt": "blue disc",
                                           "boxes": [], "points": [{"x": cx, "y": cy, "label": 1}]}
    assert outcome.record["rounds"][1]["round"] == 2 and outcome.record["waited_s"] == 9.0


@pytest.mark.parametrize("answer", [Answer(action="reprompt"), Answer(action="reprompt", prompt="   ")],
                         ids=["nothing", "blank prompt"])
def test_an_empty_reprompt_asks_again(answer):
    machine = _machine()
    step = machine.answer(answer, elapsed_s=1)
    assert step == Ask(2, "re-prompt needs a new prompt, boxes, points or score_threshold; still waiting")
    assert machine.seg is TWO and machine.selected == 0


def test_a_refused_reprompt_keeps_the_round_and_asks_again_with_the_reason():
    before = pipeline.RunOptions(prompt="thing")
    machine = _machine(options=before)
    step = machine.answer(Answer(action="reprompt", prompt="chair", boxes=((40, 30, 10, 5),)), elapsed_s=1)
    assert isinstance(step, Resegment)
    with pytest.raises(InputError) as refused:  # a degenerate box: the request cannot be built
        pipeline.segment_request(step.options, W, H)
    step = machine.segment_refused(refused.value)
    assert step == Ask(2, f"re-prompt refused: {refused.value}; still waiting")
    assert "need x0 < x1" in step.note
    assert machine.options is before and machine.seg is TWO and machine.selected == 0
    outcome = machine.answer(Answer(), elapsed_s=2)
    assert outcome.options.prompt == "thing" and outcome.selected == 0


def test_timeout_with_policy_fail_fails_with_the_reason():
    machine = _machine(on_timeout="fail")
    step = machine.timeout(elapsed_s=600.04)
    assert step == ReviewFailed("review timed out (policy: fail)")
    assert machine.record == _header(machine) | {
        "rounds": [{"round": 1, "action": "timeout-fail", "by": "policy"}],
        "outcome": "timeout-fail", "detail": "review timed out (policy: fail)", "waited_s": 600.0,
    }


def test_timeout_approves_a_confident_result_when_the_policy_allows():
    machine = _machine(on_timeout="approve_if_confident", auto_approve_score=0.75)
    outcome = machine.timeout(elapsed_s=601)
    assert isinstance(outcome, ReviewOutcome) and (outcome.status, outcome.selected) == ("approved", 0)
    assert outcome.record["rounds"] == [{"round": 1, "action": "timeout-approve", "by": "policy"}]
    assert outcome.record["outcome"] == "timeout-approve"
    assert outcome.record["detail"] == "review timed out; approved because best score 0.80 >= 0.75"


def test_timeout_fails_a_result_below_the_threshold():
    machine = _machine(on_timeout="approve_if_confident", auto_approve_score=0.9)
    step = machine.timeout(elapsed_s=601)
    assert step == ReviewFailed("review timed out and best score 0.80 < 0.90: not approved")
    assert machine.record["outcome"] == "timeout-fail" and machine.record["detail"] == step.reason


def test_timeout_with_no_instance_fails_whatever_the_policy():
    machine = _machine(seg=_seg(), selected=None, on_timeout="approve_if_confident", auto_approve_score=0.0)
    step = machine.timeout(elapsed_s=601)
    assert isinstance(step, ReviewFailed) and "not approved" in step.reason
    assert machine.record["rounds"] == [{"round": 1, "action": "timeout-fail", "by": "policy"}]


def test_timeout_in_a_later_round_is_recorded_for_that_round():
    machine = _machine()
    machine.answer(Answer(action="reprompt"), elapsed_s=1)
    machine.timeout(elapsed_s=600)
    assert [(r["round"], r["by"]) for r in machine.record["rounds"]] == [(1, "person"), (2, "policy")]


def test_an_answer_round_trips_through_its_json_form():
    form = {"action": "reprompt", "instance_index": 1, "prompt": "red chair", "boxes": [[1.0, 2.0, 3.0, 4.0]],
            "points": [{"x": 5.0, "y": 6.0, "label": 0}], "score_threshold": 0.3, "comment": "closer"}
    answer = Answer.from_form(form)
    assert answer.boxes == ((1.0, 2.0, 3.0, 4.0),) and answer.points == (Point(5.0, 6.0, 0),)
    assert answer.entry() == form and list(answer.entry()) == list(form)


def test_apply_review_carries_an_edited_mask_into_the_run_as_a_new_selected_instance():
    seg = _seg(_instance(5, 5, 25, 30, 0.8), _instance(35, 10, 60, 40, 0.4))
    machine = _machine(seg=seg)
    machine.answer(Answer(instance_index=1, mask_key="review/final-x.png"), elapsed_s=1)
    edited = np.zeros((H, W), bool)
    edited[12:38, 36:58] = True
    record = finish.RunRecord(input_uri="photo.png", options=pipeline.RunOptions(prompt="before"))
    apply_review(record, machine.mask_read(edited))
    assert record.selected == 2 and len(record.seg.instances) == 3 and not record.rejected
    added = record.seg.instances[2]
    assert np.array_equal(added.mask, edited) and added.box == (36.0, 12.0, 58.0, 38.0)
    assert added.score == 0.4  # carried over from the instance it refined
    assert record.options.prompt == "thing" and record.review["edited_mask"] == "review/final-x.png"


def test_apply_review_marks_a_rejection():
    record = finish.RunRecord(input_uri="photo.png", options=pipeline.RunOptions(prompt="thing"))
    apply_review(record, _machine().answer(Answer(action="reject"), elapsed_s=1))
    assert record.rejected and record.status == "rejected" and record.review["outcome"] == "rejected"
    assert record.selected == 0 and len(record.seg.instances) == 2


# -- a video: the frames offered and the one shown ----------------------------------------------------------------
def _video_machine(seg: Segmentation = TWO) -> ReviewMachine:
    config = ReviewConfig("required", "review required", 0.5, 600.0, "fail")
    return ReviewMachine(config, seg=seg, selected=0, options=pipeline.RunOptions(prompt="thing"),
                         frames=(40, 12, 77), shown_frame=40)


def test_approving_another_offered_frame_carries_the_pick():
    machine = _video_machine()
    outcome = machine.answer(Answer(frame=77), elapsed_s=2)
    assert isinstance(outcome, ReviewOutcome) and (outcome.status, outcome.frame) == ("approved", 77)
    assert outcome.record["frame"] == 77 and outcome.record["rounds"][0]["frame"] == 77


def test_approving_the_shown_frame_is_a_plain_approval_that_records_the_frame():
    for answer in (Answer(), Answer(frame=40), Answer(frame=40, instance_index=1)):
        outcome = _video_machine().answer(answer, elapsed_s=1)
        assert isinstance(outcome, ReviewOutcome) and outcome.frame is None
        assert outcome.selected == (answer.instance_index or 0) and outcome.record["frame"] == 40


def test_a_frame_not_offered_is_refused_and_the_review_asks_again():
    machine = _video_machine()
    step = machine.answer(Answer(frame=41), elapsed_s=1)
    assert step == Ask(2, "frame 41 was not offered (frames: 40, 12, 77); still waiting")
    photo = _machine()  # a photo offers no frame at all
    assert photo.answer(Answer(frame=0), elapsed_s=1) == Ask(2, "frame 0 was not offered (frames: none: not a video); "
                                                                "still waiting")
    assert "outcome" not in machine.record and "outcome" not in photo.record


@pytest.mark.parametrize("answer", [Answer(frame=12, mask_key="review/final-a.png"),
                                    Answer(frame=12, instance_index=0)])
def test_an_edit_of_the_shown_frame_with_another_frame_is_refused(answer):
    machine = _video_machine()
    step = machine.answer(answer, elapsed_s=1)
    assert isinstance(step, Ask) and step.round_number == 2
    assert "applies to the shown frame 40 only" in step.note and "approve frame 12 as tracked" in step.note
    outcome = machine.answer(Answer(frame=12), elapsed_s=2)  # round 2: the pick alone is approved
    assert outcome.frame == 12 and [r["round"] for r in outcome.record["rounds"]] == [1, 2]


def test_a_reprompt_segments_the_shown_frame_and_then_offers_only_that_frame():
    """After a re-prompt the other frames' tracked masks belong to the earlier prompt: only the shown frame (with
    the new segmentation) is offered, so the run never reconstructs an old-prompt mask under the new prompt."""
    machine = _video_machine()
    step = machine.answer(Answer(action="reprompt", prompt="cup", frame=12), elapsed_s=1)
    assert isinstance(step, Ask) and "segments the shown frame 40 only" in step.note
    step = machine.answer(Answer(action="reprompt", prompt="cup"), elapsed_s=2)
    assert isinstance(step, Resegment) and step.options.prompt == "cup"
    machine.segmented(_seg(_instance(1, 1, 9, 9, 0.9)))
    assert machine.frames == (40,)
    step = machine.answer(Answer(frame=77), elapsed_s=3)
    assert isinstance(step, Ask) and "frame 77 was not offered (frames: 40)" in step.note
    outcome = machine.answer(Answer(frame=40), elapsed_s=4)
    assert outcome.frame is None and outcome.options.prompt == "cup" and outcome.record["frame"] == 40


def test_a_rejection_ignores_the_frame():
    outcome = _video_machine().answer(Answer(action="reject", frame=12), elapsed_s=1)
    assert outcome.status == "rejected" and outcome.frame is None and "frame" not in outcome.record
