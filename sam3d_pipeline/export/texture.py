"""A mesh's colour baked into a texture over real UV charts: what textured formats carry (the ``store`` GLB, every
USDZ (AR Quick Look ignores vertex colours), OBJ + MTL).

1. UV unwrap with ``xatlas``: the surface is cut into charts along a few seams and flattened, so vertices are
   split only on the seams (about 0.55 vertices per triangle on a closed mesh, against 3 when every triangle is
   its own island); the charts are packed with ``PADDING_PX`` texels between them.
2. Bake: every triangle is rasterised in texture space and each texel takes the colour the triangle's vertex
   colours interpolate to there (what a vertex-colour viewer shows).
3. Dilation: every texel outside the charts takes the colour of the nearest chart texel, so bilinear filtering
   and coarser mip levels at a chart's edge mix in that chart's own colours, not the background or a neighbour.

The bake source is the reconstructor's per-vertex colour (``ExportMesh.colour_source`` says where it came from);
sampling SAM 3D Objects' Gaussian splat instead is not built.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from sam3d_pipeline.export.mesh import ExportMesh
from sam3d_pipeline.export.raster import rasterize

TEXTURE_NAME_OBJ = "texture.png"  # beside object.obj / object.mtl
PADDING_PX = 4  # texels between charts at the asked texture side
UNWRAP_SIZE = 100.0  # the mesh's longest side while unwrapping (see unwrap)
TEXELS_PER_TRIANGLE = 32  # texture area asked per triangle when choosing the side


@dataclass
class Textured:
    """A mesh cut along its UV seams, with its baked texture.

    Attributes:
        vertices: ``(V, 3)`` float64 metres (the source mesh's vertices, those on a seam repeated).
        faces: ``(F, 3)`` int64, the source mesh's triangles in the same order.
        normals: ``(V, 3)`` float64 unit normals of the source mesh (equal on both sides of a seam).
        uv: ``(V, 2)`` float32 texture coordinates, origin bottom-left (USD, OBJ; glTF flips ``v``).
        image: ``(T, T, 3)`` uint8 sRGB, row 0 at the top; ``T`` a power of two.
        source: what was baked (``ExportMesh.colour_source``).
        charts: number of UV charts.
        source_vertex: ``(V,)`` int64 index of each vertex in the source mesh.
    """

    vertices: np.ndarray
    faces: np.ndarray
    normals: np.ndarray
    uv: np.ndarray
    image: np.ndarray
    source: str
    charts: int
    source_vertex: np.ndarray

    @property
    def triangles(self) -> int:
        return int(len(self.faces))

    @property
    def side(self) -> int:
        return int(self.image.shape[0])


def texture_side(triangles: int, min_px: int, max_px: int) -> int:
    """The smallest power-of-two side in ``[min_px, max_px]`` giving every triangle about
    ``TEXELS_PER_TRIANGLE`` texels (``max_px`` when none does).

    Raises:
        ValueError: ``min_px`` or ``max_px`` not a power of two, or ``min_px > max_px``.
    """
    for name, v in (("min_px", min_px), ("max_px", max_px)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"texture {name} must be a power of two, got {v}")
    if min_px > max_px:
        raise ValueError(f"texture min_px {min_px} > max_px {max_px}")
    side = min_px
    while side < max_px and side * side < triangles * TEXELS_PER_TRIANGLE:
        side *= 2
    return side


def unwrap(mesh: ExportMesh, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """xatlas charts of ``mesh`` packed into a ``side`` texture.

    Returns:
        ``(source_vertex (V,), faces (F, 3), texel_xy (V, 2) float64 texel coordinates (x right, y down, in
        [0, side]), chart count)``; faces keep ``mesh``'s order.
    """
    import xatlas

    # xatlas compares lengths and areas with absolute epsilons: at a metre's scale a fine mesh's triangles look
    # degenerate to it (hundreds of tiny charts, several times slower). Charts do not depend on the scale, so
    # unwrap the mesh at UNWRAP_SIZE units across.
    lo, hi = mesh.vertices.min(0), mesh.vertices.max(0)
    points = (mesh.vertices - (lo + hi) / 2) * (UNWRAP_SIZE / max(float((hi - lo).max()), 1e-12))
    atlas = xatlas.Atlas()
    atlas.add_mesh(points.astype(np.float32), mesh.faces.astype(np.uint32))
    charts = xatlas.ChartOptions()
    charts.max_iterations = 0  # no chart-merging passes: fewer, larger charts, faster
    pack = xatlas.PackOptions()
    pack.resolution = side
    pack.padding = PADDING_PX
    pack.bilinear = True
    atlas.generate(charts, pack)
    if atlas.atlas_count != 1:
        raise ValueError(f"xatlas packed the charts into {atlas.atlas_count} atlases, expected 1")
    source_vertex, faces, uv = atlas[0]
    # xatlas may overshoot the asked resolution a little: scale the layout to fit the square, keeping its aspect.
    extent = np.array([atlas.width, atlas.height], np.float64)
    texel = uv.astype(np.float64) * extent * (side / extent.max())
    return (np.asarray(source_vertex, np.int64), np.asarray(faces, np.int64), texel, int(atlas.chart_count))


def bake(mesh: ExportMesh, side: int) -> Textured:
    """Unwrap ``mesh`` and bake its vertex colours into a ``side`` x ``side`` texture (see module docstring)."""
    from scipy import ndimage

    source_vertex, faces, texel, charts = unwrap(mesh, side)
    colours = mesh.colours.astype(np.float64)[source_vertex]
    frags = rasterize(texel, faces, (side, side))
    image = np.zeros((side * side, 3), np.float64)
    image[frags.pixel] = frags.interpolate(faces, colours)
    covered = frags.mask((side, side))
    if not covered.any():
        raise ValueError("the UV layout covers no texel centre")
    _, (rows, cols) = ndimage.distance_transform_edt(~covered, return_indices=True)
    image = image.reshape(side, side, 3)[rows, cols]
    uv = np.stack([texel[:, 0] / side, 1.0 - texel[:, 1] / side], axis=1).astype(np.float32)
    return Textured(vertices=mesh.vertices[source_vertex], faces=faces, normals=mesh.vertex_normals()[source_vertex],
                    uv=uv, image=np.clip(np.round(image), 0, 255).astype(np.uint8), source=mesh.colour_source,
                    charts=charts, source_vertex=source_vertex)


def cell_side(triangles: int, min_px: int, max_px: int) -> tuple[int, int]:
    """``(texture side, cell side)`` of :func:`bake_cells`: the smallest power-of-two side in ``[min_px, max_px]``
    holding every triangle in half of a 4-texel cell, or of a 2-texel cell when even ``max_px`` cannot.

    Raises:
        ValueError: too many triangles for a ``max_px`` texture even with 2-texel cells.
    """
    for cell in (4, 2):
        side = max(min_px, cell)
        while side <= max_px:
            if 2 * (side // cell) ** 2 >= triangles:
                return side, cell
            side *= 2
    raise ValueError(f"{triangles} triangles do not fit a {max_px}px texture (simplify first)")


def bake_cells(mesh: ExportMesh, min_px: int, max_px: int) -> Textured:
    """The fast bake, without an unwrap: every triangle gets half of a small square cell of the texture (two
    triangles per cell, laid out in face order), each texel the colour the triangle's vertex colours interpolate
    to there. Every triangle is its own chart (three vertices each), so coarse mip levels mix neighbouring cells:
    what the ``web`` and ``ar`` USDZ and OBJ carry (an xatlas unwrap takes tens of seconds at 100k triangles
    here: ``bench/export.py``); the ``store`` profile bakes over real charts (:func:`bake`)."""
    side, cell = cell_side(mesh.triangles, min_px, max_px)
    per_row, n = side // cell, mesh.triangles
    f = np.arange(n)
    upper = (f % 2).astype(bool)
    origin = np.stack([(f // 2 % per_row) * cell, (f // 2 // per_row) * cell], axis=1).astype(np.float64)
    c = float(cell)
    # Corner texel positions (x right, y down): lower triangle (0,0) (c,0) (0,c), upper (c,c) (0,c) (c,0).
    corners = np.where(upper[:, None, None], np.array([[c, c], [0.0, c], [c, 0.0]])[None],
                       np.array([[0.0, 0.0], [c, 0.0], [0.0, c]])[None]) + origin[:, None, :]
    t = (np.arange(cell) + 0.5) / cell
    tx, ty = np.meshgrid(t, t)  # (cell, cell): x across, y down
    colours = mesh.colours.astype(np.float32)[mesh.faces]  # (F, 3 corners, 3 rgb)
    tiles = np.zeros((per_row * per_row, cell, cell, 3), np.float32)
    for is_upper in (False, True):
        faces = f[upper == is_upper]
        u, v = (1.0 - tx, 1.0 - ty) if is_upper else (tx, ty)
        w = np.stack([1.0 - u - v, u, v], axis=-1).clip(0.0, 1.0)
        w /= w.sum(-1, keepdims=True)
        texels = np.einsum("hwk,fkc->fhwc", w, colours[faces])
        region = (tx + ty > 1.0) if is_upper else (tx + ty <= 1.0)
        if not is_upper:  # a cell without a second triangle repeats the first one's colours everywhere
            region = np.broadcast_to(region, (len(faces), cell, cell)).copy()
            region[faces + 1 >= n] = True
        tiles[faces // 2] = np.where(region[..., None], texels, tiles[faces // 2])
    image = tiles.reshape(per_row, per_row, cell, cell, 3).transpose(0, 2, 1, 3, 4).reshape(side, side, 3)
    corner_vertex = mesh.faces.reshape(-1).astype(np.int64)
    uv = np.stack([corners[..., 0] / side, 1.0 - corners[..., 1] / side], axis=-1).reshape(-1, 2)
    return Textured(vertices=mesh.vertices[corner_vertex], faces=np.arange(3 * n, dtype=np.int64).reshape(n, 3),
                    normals=mesh.vertex_normals()[corner_vertex], uv=uv.astype(np.float32),
                    image=np.clip(np.round(image), 0, 255).astype(np.uint8), source=mesh.colour_source, charts=n,
                    source_vertex=corner_vertex)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)  # optimize=True: ~6x the time for ~4% smaller
    return buf.getvalue()
