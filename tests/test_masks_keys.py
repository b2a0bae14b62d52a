"""Masks (PNG round trip, boxes, IoU, overlay, selection) and deterministic output keys."""

from __future__ import annotations

import numpy as np
import pytest

from sam3d_pipeline.errors import InputError
from sam3d_pipeline.keys import image_stem, output_prefix_name, run_hash
from sam3d_pipeline.masks import box_from_mask, clip_box, iou, mask_from_png, mask_to_png, overlay, select_instance
from sam3d_pipeline.types import Instance


def _mask(h=30, w=40, box=(5, 6, 20, 25)):
    m = np.zeros((h, w), bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


def test_mask_png_round_trip_and_size_check():
    m = _mask()
    data = mask_to_png(m)
    assert np.array_equal(mask_from_png(data, size=(40, 30)), m)
    with pytest.raises(InputError, match="mask is 40x30, image is 50x30"):
        mask_from_png(data, size=(50, 30))
    with pytest.raises(InputError, match="mask is empty"):
        mask_from_png(mask_to_png(np.zeros((4, 4), bool)))


def test_box_from_mask_is_tight_xyxy():
    assert box_from_mask(_mask()) == (5.0, 6.0, 20.0, 25.0)
    with pytest.raises(ValueError):
        box_from_mask(np.zeros((3, 3), bool))
    assert clip_box((-5, -1, 50, 10), 40, 30) == (0.0, 0.0, 40.0, 10.0)


def test_iou():
    a = _mask(box=(0, 0, 10, 10))
    b = _mask(box=(5, 0, 15, 10))
    assert iou(a, a) == 1.0
    assert iou(a, b) == pytest.approx(50 / 150)
    assert iou(a, ~a) == 0.0


def test_overlay_tints_only_the_mask():
    rgb = np.full((30, 40, 3), 100, np.uint8)
    out = overlay(rgb, _mask(box=(10, 10, 30, 25)))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (100, 100, 100)
    assert tuple(out[17, 20]) != (100, 100, 100)
    assert np.array_equal(overlay(rgb, None), rgb)


def test_select_instance():
    insts = [Instance(_mask(), (0, 0, 1, 1), s) for s in (0.4, 0.9, 0.6)]
    assert select_instance(insts, None) == 1
    assert select_instance(insts, 2) == 2
    assert select_instance([], None) is None
    with pytest.raises(InputError, match="instance index 3 is out of range: 3 instance"):
        select_instance(insts, 3)


def test_image_stem_is_safe():
    assert image_stem("s3://b/photos/Red Chair.jpg") == "Red-Chair"
    assert image_stem("/x/y/été+photo.final.png") == "été-photo.final"
    assert "/" not in image_stem("a/b/../c.jpg") and image_stem("a/b/") == "b"
    assert image_stem(".hidden") == "hidden"


def test_run_hash_is_deterministic_and_sensitive():
    base = dict(content_id="sha256:abc", prompt="chair", options={"boxes": []}, backends={"segmenter": "lite@1"})
    h = run_hash(**base)
    assert h == run_hash(**base) and len(h) == 12
    assert run_hash(**(base | {"prompt": "  chair "})) == h  # surrounding whitespace is not meaning
    for change in (
        {"content_id": "sha256:abd"},
        {"prompt": "table"},
        {"options": {"boxes": [[0, 0, 1, 1]]}},
        {"backends": {"segmenter": "lite@2"}},
    ):
        assert run_hash(**(base | change)) != h, change
    assert output_prefix_name("photos/chair.jpg", **base) == f"chair-{h}"
