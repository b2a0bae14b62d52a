"""Review policy: when a run waits for a person, what a timeout does, and what the person sees.

Pure logic; what each answer leads to is ``machine.py``, the pause itself ``tasks/review_pause.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from sam3d_pipeline.masks import box_from_mask
from sam3d_pipeline.types import Instance

CONTEXT_KEY = "review-context"

ReviewMode = Literal["none", "auto", "required"]
TimeoutPolicy = Literal["fail", "approve_if_confident"]


class ReviewContext(BaseModel):
    """What the review page needs to show a paused run (stored as a flow run input, one per round).

    Files live under ``<output_root>/<prefix>/review/``: ``image.jpg`` (the EXIF-corrected photo),
    ``overlay-r<round>.png`` and ``r<round>-mask-<i>.png`` (one per instance, same size as the photo); for a
    video, ``image.jpg`` is the shown frame and ``frame-<index>.png`` each frame offered to pick from.
    """

    output_root: str
    prefix: str
    round: int
    input_uri: str
    prompt: str
    width: int
    height: int
    instances: list[dict[str, Any]]
    selected: int | None
    segmenter: str
    # The in-browser click decoder's files (``clickdecoder.publish_review_assets``), keys relative to
    # ``output_root``; None when the segmenter has no click decoder (the page then refines on the server).
    embeddings_key: str | None = None
    decoder_key: str | None = None
    # A video's best tracked frames, best view first, the reviewer may pick from (empty for a photo): each
    # {"index" (source frame), "time_s", "score" (mask), "view_score", "overlay_key" (the frame with its mask,
    # small; relative to ``output_root``), "chosen" (the frame shown, which ``instances`` were made on)}.
    frames: list[dict[str, Any]] = []


def needs_review(mode: ReviewMode, instances: list[Instance], auto_approve_score: float) -> tuple[bool, str]:
    """Whether to wait for a person, and why (recorded in ``result.json``).

    ``required`` always waits; ``auto`` waits when the best score is below ``auto_approve_score``
    (or nothing was found: a person may re-prompt); ``none`` never waits.
    """
    if mode == "none":
        return False, "review not requested"
    best = max((inst.score for inst in instances), default=0.0)
    if mode == "required":
        return True, "review required"
    if best < auto_approve_score:
        return True, f"best score {best:.2f} is below the auto-approve threshold {auto_approve_score:.2f}"
    return False, f"auto-approved: best score {best:.2f} >= {auto_approve_score:.2f}"


def timeout_action(policy: TimeoutPolicy, instances: list[Instance], auto_approve_score: float) -> tuple[str, str]:
    """What a review timeout does: ``("approve", why)`` or ``("fail", why)``."""
    best = max((inst.score for inst in instances), default=0.0)
    if policy == "approve_if_confident" and instances and best >= auto_approve_score:
        return "approve", f"review timed out; approved because best score {best:.2f} >= {auto_approve_score:.2f}"
    if policy == "approve_if_confident":
        return "fail", f"review timed out and best score {best:.2f} < {auto_approve_score:.2f}: not approved"
    return "fail", "review timed out (policy: fail)"


def review_markdown(
    *,
    input_uri: str,
    prompt: str,
    instances: list[dict[str, Any]],
    selected: int | None,
    overlay_link: str | None,
    page_link: str | None,
    round_number: int,
    reason: str,
    note: str | None = None,
    frames: list[dict[str, Any]] | None = None,
) -> str:
    """The description shown with the paused run in the Prefect UI."""
    lines = [
        f"### Review the mask (round {round_number})",
        f"Input `{input_uri}`, prompt `{prompt}`. Waiting because: {reason}.",
    ]
    if note:
        lines.append(f"> {note}")
    if overlay_link:
        lines.append(f"![overlay]({overlay_link})")
    if page_link:
        lines.append(f"Refine with clicks on the [review page]({page_link}).")
    if instances:
        lines += ["", "| instance | score | box (xyxy px) | area (px) |", "|---|---|---|---|"]
        for inst in instances:
            mark = " (selected)" if inst["index"] == selected else ""
            lines.append(f"| {inst['index']}{mark} | {inst['score']:.2f} | {inst['box']} | {inst['area']:,} |")
    else:
        lines.append("No instances found: re-prompt (new prompt, boxes or clicks) or reject.")
    if frames:
        lines += ["", "Video: the masks above are on the shown frame; approve with `frame` to reconstruct from "
                  "another of these tracked frames (as tracked).", "",
                  "| frame | time (s) | mask score | view score |", "|---|---|---|---|"]
        for f in frames:
            mark = " (shown)" if f["chosen"] else ""
            lines.append(f"| {f['index']}{mark} | {f['time_s']:.2f} | {f['score']:.2f} | {f['view_score']:.3f} |")
    lines += [
        "",
        "Choose **approve** (optionally another `instance_index`), **reject**, or **reprompt** with a new "
        "`prompt`, `boxes` (xyxy pixels), `points` (x, y, label 1/0) or `score_threshold`.",
    ]
    return "\n".join(lines)


def edited_instance(mask: Any, base: Instance | None) -> Instance:
    """The reviewer's mask (``(H, W)`` bool) as an instance; the score is carried over from the instance
    it refined, else 1.0."""
    return Instance(mask=mask, box=box_from_mask(mask), score=base.score if base else 1.0)
