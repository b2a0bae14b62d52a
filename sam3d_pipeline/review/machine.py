"""The decisions of a review, as a state machine: a person's answer (or a timeout) → the next step.

One :class:`ReviewMachine` follows one review from its first round to its outcome. It holds the round's
segmentation, selected instance and options (for a video: the frames offered and the one shown), and writes
every round into ``record`` (the ``review`` section of ``result.json``). It reads no storage, runs no model and
knows no clock: the caller performs the steps it returns and reports back::

    Ask(round_number, note)        publish round ``round_number`` (with ``note``) and wait for an answer:
                                   ``answer(...)``, or ``timeout(...)`` when none came in time
    Resegment(options, ...)        segment again, for round ``round_number``: ``segmented(seg)``, or
                                   ``segment_refused(error)`` when the request was refused (``InputError``)
    ReadMask(key)                  read the reviewer's mask ``key`` (relative to the run's prefix):
                                   ``mask_read(mask)``, or ``mask_refused(error)``
    ReviewFailed(reason)           the review timed out and the policy says fail
    ReviewOutcome                  approved or rejected: the review is over

The Prefect side (pause, suspend, the round's files) lives in ``tasks/review_pause.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from sam3d_pipeline.masks import box_from_mask, select_instance
from sam3d_pipeline.review.policy import TimeoutPolicy, edited_instance, timeout_action
from sam3d_pipeline.run.pipeline import RunOptions, pick_view
from sam3d_pipeline.types import Point, Segmentation

Action = Literal["approve", "reject", "reprompt"]
XYXY = tuple[float, float, float, float]


@dataclass
class ReviewConfig:
    """How this run's review goes: ``mode`` and ``reason`` (from ``policy.needs_review``), the auto-approve
    score, the total wait in seconds and what a timeout does."""

    mode: str
    reason: str
    auto_approve_score: float
    timeout_s: float
    on_timeout: TimeoutPolicy


@dataclass
class ReviewOutcome:
    """What the review decided: status ``approved`` or ``rejected``, and the (possibly new) masks.

    Attributes:
        seg: the segmentation of the last round.
        selected: the chosen instance (an approved edited mask refines this one), or None.
        options: the options of the last round's segmentation (``instance_index`` None after a re-prompt).
        edited_mask: the reviewer's own mask, ``(H, W)`` bool at image size, when one was approved.
        record: the ``review`` section of ``result.json``.
        frame: a video's source frame index the reviewer picked to reconstruct from, when it is not the shown one
            (``apply_review`` then makes it the run's photo, with its tracked mask).
    """

    status: str
    seg: Segmentation
    selected: int | None
    options: RunOptions
    edited_mask: np.ndarray | None = None
    record: dict[str, Any] = field(default_factory=dict)
    frame: int | None = None


@dataclass(frozen=True)
class Answer:
    """A person's answer to one round (the fields of the pause form; pixels on the photo's grid).

    Attributes:
        action: ``approve``, ``reject`` or ``reprompt``.
        instance_index: the instance to approve (None: the selected one).
        prompt: a new text prompt (reprompt).
        boxes: new xyxy box prompts (reprompt).
        points: new click prompts (reprompt).
        score_threshold: a new score threshold in [0, 1] for the re-segmentation (reprompt).
        mask_key: a mask PNG the review page uploaded, relative to the run's prefix (approve).
        comment: free text, recorded only.
        frame: a video's source frame index (``FrameView.index``) to reconstruct from, one of the frames the round
            offered (approve; None: the shown frame). An edited mask or instance applies to the shown frame only.
    """

    action: Action = "approve"
    instance_index: int | None = None
    prompt: str | None = None
    boxes: tuple[XYXY, ...] = ()
    points: tuple[Point, ...] = ()
    score_threshold: float | None = None
    mask_key: str | None = None
    comment: str | None = None
    frame: int | None = None

    @classmethod
    def from_form(cls, form: Mapping[str, Any]) -> Answer:
        """From the answer as JSON (``{"points": [{"x": .., "y": .., "label": ..}], "boxes": [[x0, y0, x1, y1]]}``)."""
        return cls(
            action=form.get("action", "approve"),
            instance_index=form.get("instance_index"),
            prompt=form.get("prompt"),
            boxes=tuple(tuple(b) for b in form.get("boxes") or ()),
            points=tuple(Point(**p) for p in form.get("points") or ()),
            score_threshold=form.get("score_threshold"),
            mask_key=form.get("mask_key"),
            comment=form.get("comment"),
            frame=form.get("frame"),
        )

    def entry(self) -> dict[str, Any]:
        """The answer as ``result.json`` records it: JSON values, fields that are None left out."""
        values = {
            "action": self.action, "instance_index": self.instance_index, "prompt": self.prompt,
            "boxes": [list(b) for b in self.boxes], "points": [p.as_dict() for p in self.points],
            "score_threshold": self.score_threshold, "mask_key": self.mask_key, "comment": self.comment,
            "frame": self.frame,
        }
        return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class Ask:
    """Publish round ``round_number`` and wait for an answer; ``note`` says why the review asks again."""

    round_number: int
    note: str | None = None


@dataclass(frozen=True)
class Resegment:
    """Segment again with ``options`` (and ``score_threshold`` instead of the configured one, when set);
    the result is round ``round_number``'s segmentation."""

    options: RunOptions
    score_threshold: float | None
    round_number: int


@dataclass(frozen=True)
class ReadMask:
    """Read the reviewer's mask ``key`` (relative to the run's prefix) at the photo's size."""

    key: str


@dataclass(frozen=True)
class ReviewFailed:
    """The review timed out and the policy says fail; ``reason`` is the run's failure message."""

    reason: str


Step = Ask | Resegment | ReadMask | ReviewFailed | ReviewOutcome


class ReviewMachine:
    """The state of one review and its transitions.

    Args:
        config: how this review goes.
        seg: the segmentation the first round shows.
        selected: the instance selected in it, or None when nothing was found.
        options: the options ``seg`` was made for.
        frames: a video's source frame indices the reviewer may pick from (empty for a photo).
        shown_frame: the video's frame ``seg`` was made on (None for a photo).
    """

    def __init__(self, config: ReviewConfig, *, seg: Segmentation, selected: int | None, options: RunOptions,
                 frames: tuple[int, ...] = (), shown_frame: int | None = None):
        self.config = config
        self.frames, self.shown_frame = tuple(frames), shown_frame
        self.seg = seg
        self.selected = selected
        self.options = options
        self.round_number = 1
        self.record: dict[str, Any] = {"mode": config.mode, "reason": config.reason,
                                       "on_timeout": config.on_timeout, "timeout_s": config.timeout_s, "rounds": []}
        self._approval: Answer | None = None  # an approval waiting for its edited mask
        self._resegment: Resegment | None = None  # a re-prompt waiting for its segmentation
        self._answered_s = 0.0

    def start(self) -> Ask:
        """The first step: ask in round 1."""
        return Ask(self.round_number)

    def wait_s(self, elapsed_s: float) -> float:
        """How long the current round may wait, in seconds (at least 1), after ``elapsed_s`` of review."""
        return max(1.0, self.config.timeout_s - elapsed_s)

    def answer(self, answer: Answer, elapsed_s: float) -> Step:
        """The step after a person's answer, ``elapsed_s`` seconds after the review began."""
        self.record["rounds"].append({"round": self.round_number, "by": "person"} | answer.entry())
        self._answered_s = elapsed_s
        if answer.action == "reject":
            return self._done("rejected", self.selected)
        picked = answer.frame if answer.frame is not None and answer.frame != self.shown_frame else None
        if picked is not None and picked not in self.frames:
            offered = ", ".join(map(str, self.frames)) or "none: not a video"
            return self._ask(f"frame {picked} was not offered (frames: {offered}); still waiting")
        if answer.action == "reprompt":
            if picked is not None:
                return self._ask(f"a re-prompt segments the shown frame {self.shown_frame} only, not frame {picked}; "
                                 "still waiting")
            return self._reprompt(answer)
        if picked is not None:
            if answer.mask_key or answer.instance_index is not None:
                return self._ask(f"an edited mask or instance applies to the shown frame {self.shown_frame} only: "
                                 f"approve frame {picked} as tracked, or edit frame {self.shown_frame}; still waiting")
            return self._done("approved", None, {"frame": picked}, frame=picked)
        if answer.mask_key:
            self._approval = answer
            return ReadMask(answer.mask_key)
        chosen = answer.instance_index if answer.instance_index is not None else self.selected
        if chosen is None:
            return self._ask("nothing to approve: no instance found; re-prompt or reject")
        return self._done("approved", chosen, self._frame_entry())

    def timeout(self, elapsed_s: float) -> ReviewOutcome | ReviewFailed:
        """The step when no answer came in time: approve or fail, as ``config.on_timeout`` says.

        ``record["detail"]`` then says why (also the message a run that waited for it should carry).
        """
        action, why = timeout_action(self.config.on_timeout, self.seg.instances, self.config.auto_approve_score)
        self.record["rounds"].append({"round": self.round_number, "action": f"timeout-{action}", "by": "policy"})
        self.record |= {"outcome": f"timeout-{action}", "detail": why, "waited_s": round(elapsed_s, 1)}
        if action == "fail" or self.selected is None:
            return ReviewFailed(why)
        return ReviewOutcome("approved", self.seg, self.selected, self.options, record=self.record)

    def segmented(self, seg: Segmentation) -> Ask:
        """The re-segmentation asked for gave ``seg``: show it, with the new options, in the next round."""
        step, self._resegment = self._resegment, None
        if step is None:
            raise RuntimeError("segmented() without a re-prompt that asked for it")
        self.seg, self.options = seg, step.options
        self.selected = select_instance(seg.instances, None)
        if self.shown_frame is not None:  # the other frames' tracked masks were made for the earlier prompt
            self.frames = (self.shown_frame,)
        return self._ask(f"re-segmented for prompt {self.options.prompt!r}: {len(seg.instances)} instance(s)")

    def segment_refused(self, error: Exception) -> Ask:
        """The re-segmentation was refused (``InputError``): keep this round's masks and options, ask again."""
        self._resegment = None
        return self._ask(f"re-prompt refused: {error}; still waiting")

    def mask_read(self, mask: np.ndarray) -> ReviewOutcome:
        """The pending approval's edited mask (``(H, W)`` bool at image size) was read: approve it."""
        answer, self._approval = self._approval, None
        if answer is None:
            raise RuntimeError("mask_read() without an approval that asked for a mask")
        base = answer.instance_index if answer.instance_index is not None else self.selected
        return self._done("approved", base, {"edited_mask": answer.mask_key, "edited_mask_box":
                                             list(box_from_mask(mask))} | self._frame_entry(), edited_mask=mask)

    def mask_refused(self, error: Exception) -> Ask:
        """The edited mask could not be read, or does not fit the photo: ask again."""
        self._approval = None
        return self._ask(f"approval refused: {error}; still waiting")

    def _reprompt(self, answer: Answer) -> Resegment | Ask:
        updates: dict[str, Any] = {}
        if answer.prompt and answer.prompt.strip():
            updates["prompt"] = answer.prompt.strip()
        if answer.boxes:
            updates["boxes"] = list(answer.boxes)
        if answer.points:
            updates["points"] = list(answer.points)
        if not updates and answer.score_threshold is None:
            return self._ask("re-prompt needs a new prompt, boxes, points or score_threshold; still waiting")
        options = self.options.model_copy(update=updates | {"instance_index": None})
        self._resegment = Resegment(options, answer.score_threshold, self.round_number + 1)
        return self._resegment

    def _frame_entry(self) -> dict[str, Any]:
        """A video's approval of the shown frame records it (``frame``); a photo's records nothing."""
        return {"frame": self.shown_frame} if self.shown_frame is not None else {}

    def _ask(self, note: str) -> Ask:
        self.round_number += 1
        return Ask(self.round_number, note)

    def _done(self, status: str, selected: int | None, extra: dict[str, Any] | None = None,
              edited_mask: np.ndarray | None = None, frame: int | None = None) -> ReviewOutcome:
        self.record |= {"outcome": status, **(extra or {}), "waited_s": round(self._answered_s, 1)}
        return ReviewOutcome(status, self.seg, selected, self.options, edited_mask=edited_mask, record=self.record,
                             frame=frame)


def apply_review(record: Any, outcome: ReviewOutcome) -> None:
    """Carry a review's decision into the run's ``finish.RunRecord``: the last round's segmentation and options,
    the chosen instance (a reviewer's edited mask becomes a new instance, selected), the review record; a video
    frame the reviewer picked becomes the run's photo, with its tracked mask (``pipeline.pick_view``)."""
    record.seg, record.selected, record.options = outcome.seg, outcome.selected, outcome.options
    record.review = outcome.record
    record.rejected = outcome.status == "rejected"
    if outcome.frame is not None and not record.rejected:
        pick_view(record, outcome.frame)
        return
    if outcome.edited_mask is not None:
        base = record.seg.instances[record.selected] if record.selected is not None else None
        record.seg.instances.append(edited_instance(outcome.edited_mask, base))
        record.selected = len(record.seg.instances) - 1
