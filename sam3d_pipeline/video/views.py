"""Best view: score every tracked frame, choose the one (or K) to reconstruct, and report what was tracked.

A frame's view score multiplies what makes a good single photo of the object:

- the tracker's mask score (confidence in [0, 1]);
- its area relative to the largest tracked area (a bigger view shows more), square-rooted;
- not touching the border: ``(1 - border share)²``, halved when any mask pixel lies on the frame's edge (the
  object is probably cut off);
- sharpness: the variance of the Laplacian inside the object's box, relative to the sharpest tracked frame
  (motion blur and defocus lower it), weighted ``0.25 + 0.75 x``.

A frame without the object scores 0. Ties go to the earlier frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from sam3d_pipeline.masks import box_from_mask, clip_box
from sam3d_pipeline.types import Instance, Segmentation, Track
from sam3d_pipeline.video.intake import LoadedVideo


@dataclass(frozen=True)
class FrameView:
    """How good one sampled frame is as the photo to reconstruct from.

    Attributes:
        position: the frame's place in the sample (``LoadedVideo.frames``).
        index: its index in the source; ``time_s`` its time.
        score: the tracker's mask score; ``area`` the mask's pixels.
        border: share of the mask's outline on the frame's edge, in [0, 1]; ``touches`` any pixel on it.
        sharpness: relative to the sharpest tracked frame, in [0, 1].
        view_score: the product described in the module docstring, in [0, 1].
    """

    position: int
    index: int
    time_s: float
    score: float
    area: int
    border: float
    touches: bool
    sharpness: float
    view_score: float

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "time_s": round(self.time_s, 3), "score": round(self.score, 4),
                "area": self.area, "border": round(self.border, 3), "touches_border": self.touches,
                "sharpness": round(self.sharpness, 3), "view_score": round(self.view_score, 4)}


def _sharpness(rgb: np.ndarray, mask: np.ndarray) -> float:
    x0, y0, x1, y1 = (int(round(v)) for v in clip_box(box_from_mask(mask), mask.shape[1], mask.shape[0]))
    gray = cv2.cvtColor(np.ascontiguousarray(rgb[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(gray.astype(np.float32), cv2.CV_32F).var()) if gray.size else 0.0


def _border(mask: np.ndarray) -> tuple[float, bool]:
    outline = mask & ~(cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
    edge = np.zeros_like(mask)
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    return float((outline & edge).sum() / max(1, outline.sum())), bool((mask & edge).any())


def score_views(video: LoadedVideo, track: Track) -> list[FrameView]:
    """One ``FrameView`` per sampled frame (see the module docstring for the score)."""
    raw = []
    for position, (frame, mask) in enumerate(zip(video.frames, track.masks, strict=True)):
        if mask.any():
            raw.append((position, int(mask.sum()), *_border(mask), _sharpness(frame.rgb, mask)))
        else:
            raw.append((position, 0, 0.0, False, 0.0))
    top_area = max((r[1] for r in raw), default=0) or 1
    top_sharp = max((r[4] for r in raw), default=0.0) or 1.0
    views = []
    for position, area, border, touches, sharp in raw:
        frame, score = video.frames[position], float(track.scores[position])
        sharpness = sharp / top_sharp
        view = 0.0
        if area:
            view = (score * np.sqrt(area / top_area) * (1.0 - border) ** 2 * (0.5 if touches else 1.0)
                    * (0.25 + 0.75 * sharpness))
        views.append(FrameView(position, frame.index, frame.time_s, score, area, border, touches, sharpness,
                               float(np.clip(view, 0.0, 1.0))))
    return views


def best_views(views: list[FrameView], count: int = 1) -> list[FrameView]:
    """The ``count`` best frames holding the object, best first (empty when no frame does)."""
    ranked = sorted((v for v in views if v.area > 0), key=lambda v: (-v.view_score, v.position))
    return ranked[:count]


@dataclass
class VideoRun:
    """A clip's track and the views chosen from it: what ``result.json``'s ``video`` section and the video output
    files are made from.

    Attributes:
        video: the decoded sample; ``track`` the tracker's masks; ``views`` one per sampled frame.
        candidates: the best views (``video_frames`` of them), best first; ``chosen`` the one reconstructed.
        chosen_by: who chose it: ``view_score`` (the best view), ``reconstructor_score`` (the best of the candidates
            the reconstructor tried) or ``reviewer`` (picked at review).
        stage: where the tracker ran (``worker``, ``model_load_s``, ``queue_wait_s``, ``run_s``).
        candidate_scores: the reconstructor's own score per candidate position, when it gives one.
    """

    video: LoadedVideo
    track: Track
    views: list[FrameView]
    candidates: list[FrameView]
    chosen: FrameView | None = None
    chosen_by: str = "view_score"
    stage: dict[str, Any] = field(default_factory=dict)
    candidate_scores: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.chosen is None and self.candidates:
            self.chosen = self.candidates[0]

    def view_at(self, index: int) -> FrameView:
        """The view of source frame ``index``.

        Raises:
            KeyError: no sampled frame has that index.
        """
        for view in self.views:
            if view.index == index:
                return view
        raise KeyError(f"frame {index} is not one of the {len(self.views)} sampled frames")

    def review_views(self, count: int) -> list[FrameView]:
        """The views a reviewer may pick from: the ``count`` best by view score, best first, the chosen one always
        among them (in its place, or last when it is not one of the best)."""
        views = best_views(self.views, count)
        if self.chosen is not None and self.chosen not in views:
            views = views[:max(count - 1, 0)] + [self.chosen]
        return views

    def view_segmentation(self, view: FrameView | None = None) -> Segmentation:
        """The tracked object in one frame (default: the chosen one) as a one-instance segmentation; no
        instance when the object was never found."""
        view = view or self.chosen
        track = self.track
        instances = []
        if view is not None:
            mask = track.masks[view.position]
            instances = [Instance(mask=mask, box=clip_box(box_from_mask(mask), mask.shape[1], mask.shape[0]),
                                  score=view.score)]
        return Segmentation(instances, track.backend, used_text_prompt=track.used_text_prompt,
                            messages=list(track.messages), stage=dict(self.stage))

    def section(self) -> dict[str, Any]:
        """``result.json``'s ``video`` section: frames read / sampled / tracked, the chosen frame, every score."""
        chosen = self.chosen
        return {
            **self.video.describe(),
            "frames_tracked": self.track.tracked,
            "found_at_index": self.video.frames[self.track.found_at].index if self.track.found_at is not None else None,
            "tracker": self.track.backend.key(),
            "chosen": ({"index": chosen.index, "time_s": round(chosen.time_s, 3), "view_score":
                        round(chosen.view_score, 4), "chosen_by": self.chosen_by} if chosen else None),
            "candidates": [v.as_dict() | ({"reconstructor_score": round(self.candidate_scores[v.position], 4)}
                                          if v.position in self.candidate_scores else {}) for v in self.candidates],
            "frames": [v.as_dict() for v in self.views],
        }
