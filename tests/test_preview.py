"""The software preview renderer: the nearest surface wins each pixel, whatever the face order."""

from __future__ import annotations

import numpy as np
import trimesh

from sam3d_pipeline.export.preview import BACKGROUND_BOTTOM, BACKGROUND_TOP, render_preview


def _two_boxes(front_first: bool) -> trimesh.Trimesh:
    """A red box in front of (larger z, towards the viewer) a blue one of the same footprint, seen head-on."""
    # Dense, as reconstructed meshes are: the renderer samples points on each face.
    front = trimesh.creation.box(extents=(1.0, 1.0, 0.2)).subdivide_to_size(0.03)
    front.apply_translation((0, 0, 0.5))
    back = trimesh.creation.box(extents=(1.0, 1.0, 0.2)).subdivide_to_size(0.03)
    front.visual.vertex_colors = [255, 0, 0, 255]
    back.visual.vertex_colors = [0, 0, 255, 255]
    return trimesh.util.concatenate([front, back] if front_first else [back, front])


def test_the_nearest_surface_wins_each_pixel_in_either_face_order():
    for front_first in (True, False):
        image = render_preview(_two_boxes(front_first), size_px=128, yaw_deg=0.0, pitch_deg=0.0)
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        centre = image[54:74, 54:74].reshape(-1, 3).astype(int)
        assert (centre[:, 0] > 60).all() and (centre[:, 2] == 0).all()  # red and shaded, never the blue box behind
        assert np.abs(image[0, 0].astype(float) - BACKGROUND_TOP).max() <= 1  # the backdrop's gradient
        assert np.abs(image[-1, 0].astype(float) - BACKGROUND_BOTTOM).max() <= 2


def test_a_rendered_object_covers_its_middle_without_holes():
    sphere = trimesh.creation.icosphere(subdivisions=4)
    sphere.visual.vertex_colors = [200, 180, 40, 255]
    image = render_preview(sphere, size_px=96)
    middle = image[30:66, 30:66].reshape(-1, 3).astype(int)
    background = np.abs(middle - BACKGROUND_TOP.astype(int)).max(1) < 20
    assert not background.any()  # every pixel of the object's middle is covered by a face


def test_the_rasterizer_keeps_the_nearest_fragment_and_of_equal_depths_the_first_triangle():
    from sam3d_pipeline.export.raster import rasterize

    # Two squares over the same pixels, each of two triangles: the far one (depth 0) first, then the near one
    # (depth 1); then the same two squares at equal depth.
    square = np.array([[0.0, 0.0], [8.0, 0.0], [8.0, 8.0], [0.0, 8.0]])
    xy = np.concatenate([square, square])
    faces = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    near = rasterize(xy, faces, (8, 8), depth=np.array([0.0] * 4 + [1.0] * 4))
    assert len(near.pixel) == 64 and set(near.face.tolist()) == {2, 3}
    tied = rasterize(xy, faces, (8, 8), depth=np.zeros(8))
    assert len(tied.pixel) == 64 and set(tied.face.tolist()) == {0, 1}
    np.testing.assert_allclose(near.bary.sum(1), 1.0)
    np.testing.assert_array_equal(near.bary, tied.bary)  # the same corners' weights, whichever square won
