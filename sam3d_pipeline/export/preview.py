"""A software-rendered preview of a mesh (no OpenGL needed): a shaded three-quarter view with a label."""

from __future__ import annotations

import numpy as np

from sam3d_pipeline.images import draw_label

BACKGROUND_TOP = np.array([236, 239, 243], np.float32)
BACKGROUND_BOTTOM = np.array([200, 205, 212], np.float32)


def _rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    yaw, pitch = np.radians(yaw_deg), np.radians(pitch_deg)
    ry = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    rx = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    return rx @ ry


def render_preview(mesh, *, size_px: int = 512, yaw_deg: float = -30.0, pitch_deg: float = 20.0,
                   label: str | None = None) -> np.ndarray:
    """Render ``mesh`` (a ``trimesh.Trimesh`` with vertex colours) from a three-quarter view.

    Each face is sampled at its centroid and at points towards its corners, depth-tested per pixel and
    Lambert-shaded with its face normal. Orthographic projection; the mesh fills ~80% of the frame.

    Returns:
        ``(size_px, size_px, 3)`` uint8 image.
    """
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces)
    colours = np.asarray(mesh.visual.vertex_colors)[:, :3].astype(np.float32)
    rot = _rotation(yaw_deg, pitch_deg)
    v = (verts - verts.mean(0)) @ rot.T
    normals = np.asarray(mesh.face_normals) @ rot.T

    tri = v[faces]  # (F, 3, 3)
    centroid = tri.mean(1)
    weights = (0.0, 0.35, 0.7)
    samples = [centroid] + [centroid + w * (tri[:, k] - centroid) for w in weights[1:] for k in range(3)]
    pts = np.concatenate(samples)
    face_colour = colours[faces].mean(1)
    col = np.tile(face_colour, (len(samples), 1))
    nrm = np.tile(normals, (len(samples), 1))

    extent = float(np.abs(v[:, :2]).max()) or 1.0
    scale = 0.4 * size_px / extent
    px = np.round(size_px / 2 + pts[:, 0] * scale).astype(np.int64)
    py = np.round(size_px / 2 - pts[:, 1] * scale).astype(np.int64)
    depth = pts[:, 2]
    light = np.array([-0.4, 0.5, 0.77])
    light /= np.linalg.norm(light)
    shade = 0.35 + 0.65 * np.clip(nrm @ light, 0.0, 1.0)
    shaded = np.clip(col * shade[:, None], 0, 255)

    ramp = np.linspace(0.0, 1.0, size_px, dtype=np.float32)[:, None, None]
    image = (BACKGROUND_TOP * (1 - ramp) + BACKGROUND_BOTTOM * ramp) * np.ones((1, size_px, 1), np.float32)
    # Each sample covers a 2x2 block of pixels. Per pixel the nearest sample wins (a z-buffer of maxima); among
    # equally near ones, the first in sample order (so for equal depth the earlier offset of the block).
    offsets = ((0, 0), (1, 0), (0, 1), (1, 1))
    x = np.concatenate([px + dx for dx, _ in offsets])
    y = np.concatenate([py + dy for _, dy in offsets])
    ok = np.flatnonzero((x >= 0) & (x < size_px) & (y >= 0) & (y < size_px))
    idx = y[ok] * size_px + x[ok]
    d = np.tile(depth, len(offsets))[ok]
    zbuf = np.full(size_px * size_px, -np.inf)
    np.maximum.at(zbuf, idx, d)
    nearest = np.flatnonzero(d == zbuf[idx])
    pixels, first = np.unique(idx[nearest], return_index=True)
    image.reshape(-1, 3)[pixels] = shaded[ok[nearest[first]] % len(pts)]
    out = np.clip(image, 0, 255).astype(np.uint8)
    return draw_label(out, label) if label else out
