"""Persist each review round's segmentation under the run's prefix, so a suspended run that is resumed
(and re-executed from the top) reuses it instead of segmenting again."""

from __future__ import annotations

import json
from typing import Any

from sam3d_pipeline.errors import InputError, InputNotFoundError
from sam3d_pipeline.keys import RunKeys
from sam3d_pipeline.masks import box_from_mask, mask_from_png, mask_to_png
from sam3d_pipeline.storage import Storage
from sam3d_pipeline.types import BackendInfo, Instance, Segmentation


def round_key(prefix: str, round_number: int, name: str) -> str:
    """``<prefix>/review/r<round>-<name>``: one file of a persisted round."""
    return RunKeys(prefix).review_round(round_number, name)


def save_round(storage: Storage, prefix: str, round_number: int, seg: Segmentation, request: dict[str, Any]) -> None:
    """Write the round's masks (``r<n>-mask-<i>.png``) and then its index (``r<n>-instances.json``, last)."""
    for i, inst in enumerate(seg.instances):
        storage.write_bytes(round_key(prefix, round_number, f"mask-{i}.png"), mask_to_png(inst.mask),
                            content_type="image/png")
    index = {
        "request": request,
        "backend": seg.backend.key(),
        "used_text_prompt": seg.used_text_prompt,
        "messages": seg.messages,
        "instances": [{"score": inst.score, "box": list(inst.box)} for inst in seg.instances],
    }
    storage.write_bytes(round_key(prefix, round_number, "instances.json"), json.dumps(index).encode(),
                        content_type="application/json")


def load_round(storage: Storage, prefix: str, round_number: int, request: dict[str, Any], backend: BackendInfo,
               size: tuple[int, int]) -> Segmentation | None:
    """The persisted segmentation of a round, if it was made for the same request by the same backend."""
    try:
        index = json.loads(storage.read_bytes(round_key(prefix, round_number, "instances.json")))
    except (InputNotFoundError, ValueError):
        return None
    if index.get("request") != request or index.get("backend") != backend.key():
        return None
    instances = []
    try:
        for i, item in enumerate(index["instances"]):
            mask = mask_from_png(storage.read_bytes(round_key(prefix, round_number, f"mask-{i}.png")), size=size)
            instances.append(Instance(mask=mask, box=tuple(item.get("box") or box_from_mask(mask)),
                                      score=float(item["score"])))
    except (InputNotFoundError, InputError, KeyError):
        return None
    messages = list(index.get("messages", [])) + [f"reused the persisted segmentation of review round {round_number}"]
    return Segmentation(instances, backend, used_text_prompt=bool(index.get("used_text_prompt")), messages=messages)
