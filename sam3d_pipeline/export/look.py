"""Does an export keep the look? Render two meshes from the same cameras and compare the pictures.

The renderer is ``raster``'s (orthographic, z-buffered): per pixel the colour is the interpolated vertex colour,
or for a textured mesh its texture sampled bilinearly at the interpolated texture coordinates, Lambert-shaded
with the interpolated normal; so a simplified or textured mesh is drawn as a viewer draws it. The measure: per
view, the silhouette IoU and the mean absolute RGB difference (0-255) over the pixels either render covers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sam3d_pipeline.export.mesh import ExportMesh
from sam3d_pipeline.export.raster import lambert, rasterize, rotation, sample
from sam3d_pipeline.export.texture import Textured

VIEWS = ((0.0, 10.0), (-35.0, 20.0), (90.0, 10.0))  # (yaw, pitch) degrees: front, three-quarter, side
Surface = ExportMesh | Textured


def draw(surface: Surface, rot: np.ndarray, *, size_px: int, centre: np.ndarray,
         scale: float) -> tuple[np.ndarray, np.ndarray]:
    """``(pixel (P,) flat indices, rgb (P, 3) float 0-255)`` of the visible, shaded surface: view rotation
    ``rot``, ``centre`` (metres) at the image centre, ``scale`` pixels per metre."""
    normals = surface.normals if isinstance(surface, Textured) else surface.vertex_normals()
    v = (surface.vertices - centre) @ rot.T
    xy = np.stack([size_px / 2 + v[:, 0] * scale, size_px / 2 - v[:, 1] * scale], axis=1)
    frags = rasterize(xy, surface.faces, (size_px, size_px), depth=v[:, 2])
    if isinstance(surface, Textured):
        colour = sample(surface.image, frags.interpolate(surface.faces, surface.uv))
    else:
        colour = frags.interpolate(surface.faces, surface.colours)
    shade = lambert(frags.interpolate(surface.faces, normals @ rot.T))
    return frags.pixel, colour * shade[:, None]


def render(surface: Surface, *, yaw_deg: float, pitch_deg: float, size_px: int, centre: np.ndarray,
           radius: float) -> tuple[np.ndarray, np.ndarray]:
    """``(image (S, S, 3) uint8 on white, coverage (S, S) bool)`` of ``surface`` seen from ``(yaw, pitch)``;
    ``centre`` and ``radius`` (metres) frame the view, so two meshes rendered with the same values line up."""
    pixel, rgb = draw(surface, rotation(yaw_deg, pitch_deg), size_px=size_px, centre=centre,
                      scale=0.45 * size_px / radius)
    image = np.full((size_px * size_px, 3), 255.0)
    image[pixel] = rgb
    coverage = np.zeros(size_px * size_px, bool)
    coverage[pixel] = True
    shape = (size_px, size_px)
    return np.clip(np.round(image), 0, 255).astype(np.uint8).reshape(*shape, 3), coverage.reshape(shape)


def compare(reference: Surface, candidate: Surface, *, size_px: int = 256) -> dict[str, Any]:
    """How close ``candidate`` looks to ``reference`` over :data:`VIEWS`.

    Returns:
        ``{"silhouette_iou": worst view, "mean_abs_rgb": worst view (0-255), "views": [...]}``.
    """
    lo, hi = reference.vertices.min(0), reference.vertices.max(0)
    centre = (lo + hi) / 2
    radius = float(np.linalg.norm(hi - lo) / 2) or 1.0
    views = []
    for yaw, pitch in VIEWS:
        a, ca = render(reference, yaw_deg=yaw, pitch_deg=pitch, size_px=size_px, centre=centre, radius=radius)
        b, cb = render(candidate, yaw_deg=yaw, pitch_deg=pitch, size_px=size_px, centre=centre, radius=radius)
        union = ca | cb
        iou = float((ca & cb).sum() / max(union.sum(), 1))
        diff = float(np.abs(a.astype(np.int16) - b.astype(np.int16))[union].mean()) if union.any() else 0.0
        views.append({"yaw": yaw, "pitch": pitch, "silhouette_iou": round(iou, 4), "mean_abs_rgb": round(diff, 2)})
    return {"silhouette_iou": min(v["silhouette_iou"] for v in views),
            "mean_abs_rgb": max(v["mean_abs_rgb"] for v in views), "views": views}
