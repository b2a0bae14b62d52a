"""Does an export keep the look? Render two meshes from the same cameras and compare the pictures.

The renderer is a small z-buffered rasteriser (orthographic, Gouraud-interpolated vertex colours, Lambert
shading with interpolated vertex normals), so a simplified mesh is drawn as a viewer draws it. The measure:
per view, the silhouette IoU and the mean absolute RGB difference (0-255) over the pixels either render covers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sam3d_pipeline.export.mesh import ExportMesh

VIEWS = ((0.0, 10.0), (-35.0, 20.0), (90.0, 10.0))  # (yaw, pitch) degrees: front, three-quarter, side
LIGHT = np.array([-0.4, 0.5, 0.77]) / np.linalg.norm([-0.4, 0.5, 0.77])


def _rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    yaw, pitch = np.radians(yaw_deg), np.radians(pitch_deg)
    ry = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    rx = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    return rx @ ry


def render(mesh: ExportMesh, *, yaw_deg: float, pitch_deg: float, size_px: int, centre: np.ndarray,
           radius: float) -> tuple[np.ndarray, np.ndarray]:
    """``(image (S, S, 3) uint8, coverage (S, S) bool)`` of ``mesh`` seen from ``(yaw, pitch)``; ``centre`` and
    ``radius`` (metres) frame the view, so two meshes rendered with the same values line up."""
    rot = _rotation(yaw_deg, pitch_deg)
    v = (mesh.vertices - centre) @ rot.T
    n = mesh.vertex_normals() @ rot.T
    scale = 0.45 * size_px / radius
    sx, sy = size_px / 2 + v[:, 0] * scale, size_px / 2 - v[:, 1] * scale
    shade = 0.35 + 0.65 * np.clip(n @ LIGHT, 0.0, 1.0)
    lit = mesh.colours.astype(np.float64) * shade[:, None]
    f = mesh.faces
    x, y, z = sx[f], sy[f], v[:, 2][f]  # (F, 3)
    x0, x1 = np.floor(x.min(1)).astype(np.int64), np.ceil(x.max(1)).astype(np.int64)
    y0, y1 = np.floor(y.min(1)).astype(np.int64), np.ceil(y.max(1)).astype(np.int64)
    x0, y0 = np.clip(x0, 0, size_px - 1), np.clip(y0, 0, size_px - 1)
    x1, y1 = np.clip(x1, 0, size_px - 1), np.clip(y1, 0, size_px - 1)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    keep = np.abs(area) > 1e-12
    counts = np.where(keep, w * h, 0)
    tri = np.repeat(np.arange(len(f)), counts)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    px = x0[tri] + local % w[tri]
    py = y0[tri] + local // w[tri]
    cx, cy = px + 0.5, py + 0.5
    xa, ya = x[tri], y[tri]
    a = area[tri]
    b1 = ((cx - xa[:, 0]) * (ya[:, 2] - ya[:, 0]) - (xa[:, 2] - xa[:, 0]) * (cy - ya[:, 0])) / a
    b2 = ((xa[:, 1] - xa[:, 0]) * (cy - ya[:, 0]) - (cx - xa[:, 0]) * (ya[:, 1] - ya[:, 0])) / a
    b0 = 1.0 - b1 - b2
    inside = (b0 >= -1e-9) & (b1 >= -1e-9) & (b2 >= -1e-9)
    tri, px, py, b = tri[inside], px[inside], py[inside], np.stack([b0, b1, b2], 1)[inside]
    depth = (b * z[tri]).sum(1)
    pixel = py * size_px + px
    order = np.lexsort((-depth, pixel))  # nearest (largest z) first per pixel
    first = order[np.unique(pixel[order], return_index=True)[1]]
    colour = np.einsum("pk,pkc->pc", b[first], lit[f[tri[first]]])
    image = np.full((size_px * size_px, 3), 255.0)
    image[pixel[first]] = colour
    coverage = np.zeros(size_px * size_px, bool)
    coverage[pixel[first]] = True
    shape = (size_px, size_px)
    return np.clip(np.round(image), 0, 255).astype(np.uint8).reshape(*shape, 3), coverage.reshape(shape)


def compare(reference: ExportMesh, candidate: ExportMesh, *, size_px: int = 256) -> dict[str, Any]:
    """How close ``candidate`` looks to ``reference`` over :data:`VIEWS`.

    Returns:
        ``{"silhouette_iou": worst view, "mean_abs_rgb": worst view (0-255), "views": [...]}``.
    """
    lo, hi = reference.bounds()
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
