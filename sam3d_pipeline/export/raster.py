"""The one software rasteriser (no OpenGL): triangles → the visible fragment of every pixel, with barycentric
weights to interpolate any per-vertex value (colour, normal, texture coordinate) across each triangle.

Used for the mesh preview (``preview``), the look measure (``look``) and baking vertex colours into a texture
(``texture``, rasterising in texture space). Conventions: pixel ``(col, row)`` covers ``[col, col + 1) x
[row, row + 1)`` with its centre at ``+0.5``; ``x`` runs right, ``y`` down; with a depth, the largest value (the
nearest to the viewer) wins each pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAGMENTS_PER_CHUNK = 2_000_000  # candidate pixels examined at once (bounds the memory of a large raster)
LIGHT = np.array([-0.4, 0.5, 0.77]) / np.linalg.norm([-0.4, 0.5, 0.77])  # towards the light, view frame


def rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """``(3, 3)`` world → view rotation: turn by ``yaw`` about Y, then tilt by ``pitch`` about X (degrees)."""
    yaw, pitch = np.radians(yaw_deg), np.radians(pitch_deg)
    ry = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    rx = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    return rx @ ry


def lambert(normals: np.ndarray) -> np.ndarray:
    """``(P,)`` shade factor in [0.35, 1] of view-frame ``normals`` ``(P, 3)`` (renormalised): the one lighting of
    every render."""
    n = normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    return 0.35 + 0.65 * np.clip(n @ LIGHT, 0.0, 1.0)


@dataclass
class Fragments:
    """The visible fragment of each covered pixel.

    Attributes:
        pixel: ``(P,)`` int64 flat pixel index (``row * width + col``), each at most once.
        face: ``(P,)`` int64 triangle drawn there.
        bary: ``(P, 3)`` float64 barycentric weights of the triangle's corners at the pixel centre.
    """

    pixel: np.ndarray
    face: np.ndarray
    bary: np.ndarray

    def interpolate(self, faces: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``(P, C)``: per-vertex ``values`` ``(N, C)`` interpolated at every fragment (``faces`` ``(F, 3)``)."""
        return np.einsum("pk,pkc->pc", self.bary, np.asarray(values, dtype=np.float64)[faces[self.face]])

    def mask(self, size: tuple[int, int]) -> np.ndarray:
        """``(H, W)`` bool: the covered pixels."""
        out = np.zeros(size[0] * size[1], bool)
        out[self.pixel] = True
        return out.reshape(size)


def rasterize(xy: np.ndarray, faces: np.ndarray, size: tuple[int, int], depth: np.ndarray | None = None) -> Fragments:
    """Rasterise triangles ``faces`` ``(F, 3)`` over vertices at pixel positions ``xy`` ``(N, 2)``.

    Args:
        xy: ``(N, 2)`` pixel coordinates (x right, y down).
        faces: ``(F, 3)`` vertex indices; either winding (no culling).
        size: ``(height, width)`` in pixels.
        depth: ``(N,)`` per-vertex depth, larger = nearer; without it a pixel covered by two triangles (only
            where they share an edge, as in a texture atlas) keeps either one.

    Returns:
        The visible fragment of every pixel whose centre lies inside (or on the edge of) a triangle.
    """
    height, width = size
    xy = np.asarray(xy, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    x, y = xy[faces, 0], xy[faces, 1]  # (F, 3)
    x0 = np.clip(np.floor(x.min(1) - 0.5), 0, width - 1).astype(np.int64)
    x1 = np.clip(np.ceil(x.max(1) - 0.5), 0, width - 1).astype(np.int64)
    y0 = np.clip(np.floor(y.min(1) - 0.5), 0, height - 1).astype(np.int64)
    y1 = np.clip(np.ceil(y.max(1) - 0.5), 0, height - 1).astype(np.int64)
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    offscreen = (x.max(1) < 0) | (y.max(1) < 0) | (x.min(1) > width) | (y.min(1) > height)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    counts = np.where((np.abs(area) > 1e-12) & ~offscreen, w * h, 0)
    zbuf = np.full(height * width, -np.inf)
    face_of = np.full(height * width, -1, np.int64)
    bary_of = np.zeros((height * width, 3), np.float64)
    ends = np.cumsum(counts)
    # Per triangle: corner 0 and the edges 0→2 (y, x) and 0→1 (x, y), for the barycentric weights.
    edges = (x[:, 0], y[:, 0], y[:, 2] - y[:, 0], x[:, 2] - x[:, 0], x[:, 1] - x[:, 0], y[:, 1] - y[:, 0])
    z = None if depth is None else np.asarray(depth, dtype=np.float64)[faces]
    start = 0
    while start < len(faces):
        # Triangles whose candidate pixels fit one chunk (at least one triangle per chunk).
        stop = max(start + 1, int(np.searchsorted(ends, (ends[start - 1] if start else 0) + FRAGMENTS_PER_CHUNK,
                                                  side="right")))
        _chunk(np.arange(start, min(stop, len(faces))), counts, x0, y0, w, edges, area, z, width, zbuf, face_of,
               bary_of)
        start = stop
    pixel = np.flatnonzero(face_of >= 0)
    return Fragments(pixel=pixel, face=face_of[pixel], bary=bary_of[pixel])


def _chunk(tris: np.ndarray, counts: np.ndarray, x0: np.ndarray, y0: np.ndarray, w: np.ndarray,
           edges: tuple[np.ndarray, ...], area: np.ndarray, z: np.ndarray | None, width: int, zbuf: np.ndarray,
           face_of: np.ndarray, bary_of: np.ndarray) -> None:
    c = counts[tris]
    tri = np.repeat(tris, c)
    if len(tri) == 0:
        return
    local = np.arange(len(tri)) - np.repeat(np.cumsum(c) - c, c)
    row, col = np.divmod(local, w[tri])
    px, py = x0[tri] + col, y0[tri] + row
    # Pixel centre relative to corner 0, and the triangle's edges from corner 0 (gathered per fragment).
    dx, dy = px + 0.5 - edges[0][tri], py + 0.5 - edges[1][tri]
    a = area[tri]
    b1 = (dx * edges[2][tri] - edges[3][tri] * dy) / a
    b2 = (edges[4][tri] * dy - dx * edges[5][tri]) / a
    b0 = 1.0 - b1 - b2
    inside = np.flatnonzero((b0 >= -1e-9) & (b1 >= -1e-9) & (b2 >= -1e-9))
    tri, pixel = tri[inside], py[inside] * width + px[inside]
    bary = np.stack([b0[inside], b1[inside], b2[inside]], 1)
    if z is None:
        face_of[pixel] = tri
        bary_of[pixel] = bary
        return
    d = (bary * z[tri]).sum(1)
    # Per pixel, the nearest fragment (of equal depths the first, i.e. the lowest triangle index): a scatter
    # maximum of the depth, then the lowest fragment index among those at it.
    nearest = np.full(len(zbuf), -np.inf)
    np.maximum.at(nearest, pixel, d)
    at_nearest = np.flatnonzero(d == nearest[pixel])
    first_of = np.full(len(zbuf), len(d), np.int64)
    np.minimum.at(first_of, pixel[at_nearest], at_nearest)
    first = first_of[first_of < len(d)]
    pixel, d = pixel[first], d[first]
    nearer = d > zbuf[pixel]
    pixel = pixel[nearer]
    zbuf[pixel] = d[nearer]
    face_of[pixel] = tri[first][nearer]
    bary_of[pixel] = bary[first][nearer]


def sample(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """``(P, C)`` float: ``image`` ``(T, T, C)`` (row 0 at the top) sampled bilinearly at texture coordinates
    ``uv`` ``(P, 2)`` (origin bottom-left, as USD and OBJ; clamped to the edge)."""
    h, w = image.shape[:2]
    fx = np.clip(uv[:, 0] * w - 0.5, 0, w - 1)
    fy = np.clip((1.0 - uv[:, 1]) * h - 0.5, 0, h - 1)
    ix, iy = np.minimum(fx.astype(np.int64), w - 2 if w > 1 else 0), np.minimum(fy.astype(np.int64),
                                                                                  h - 2 if h > 1 else 0)
    tx, ty = (fx - ix)[:, None], (fy - iy)[:, None]
    img = image.astype(np.float64)
    ix1, iy1 = np.minimum(ix + 1, w - 1), np.minimum(iy + 1, h - 1)
    top = img[iy, ix] * (1 - tx) + img[iy, ix1] * tx
    bottom = img[iy1, ix] * (1 - tx) + img[iy1, ix1] * tx
    return top * (1 - ty) + bottom * ty
