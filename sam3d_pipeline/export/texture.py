"""Vertex colours baked into a texture, for formats whose viewers ignore vertex colours (USDZ in AR Quick Look,
OBJ + MTL).

Every triangle gets half of a small square cell of the atlas (two triangles per cell, ``cell`` texels a side);
each texel holds the colour the triangle's vertex colours interpolate to at that point, so the texture shows
exactly the Gouraud shading a vertex-colour viewer would. Cells are laid out in face order (reconstructors emit
neighbouring faces together, so a coarser mip level mixes mostly neighbouring colours).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sam3d_pipeline.export.mesh import ExportMesh

TEXTURE_NAME_OBJ = "texture.png"  # beside object.obj / object.mtl


@dataclass
class Baked:
    """A baked texture and where each face corner samples it.

    Attributes:
        image: ``(T, T, 3)`` uint8 sRGB, row 0 at the top.
        uv: ``(F, 3, 2)`` float32 texture coordinates of each face's corners (origin bottom-left, as USD, OBJ).
        cell: texels per cell side.
    """

    image: np.ndarray
    uv: np.ndarray
    cell: int


def atlas_size(triangles: int, max_px: int) -> tuple[int, int]:
    """``(texture side, cell side)``: the smallest power-of-two texture (>= 64) holding every triangle with
    4-texel cells, or 2-texel cells when even ``max_px`` cannot hold them at 4.

    Raises:
        ValueError: too many triangles for a ``max_px`` texture even with 2-texel cells.
    """
    for cell in (4, 2):
        side = 64
        while side <= max_px:
            if 2 * (side // cell) ** 2 >= triangles:
                return side, cell
            side *= 2
    raise ValueError(f"{triangles} triangles do not fit a {max_px}px texture (simplify first)")


def bake(mesh: ExportMesh, max_px: int = 2048) -> Baked:
    """Bake ``mesh``'s vertex colours (see module docstring)."""
    side, cell = atlas_size(mesh.triangles, max_px)
    per_row = side // cell
    f = np.arange(mesh.triangles)
    slot, upper = f // 2, (f % 2).astype(bool)
    cx, cy = (slot % per_row) * cell, (slot // per_row) * cell
    # Corner texel positions in the image (x right, y down): lower triangle (0,0) (c,0) (0,c), upper (c,c) (0,c) (c,0).
    c = float(cell)
    lower = np.array([[0.0, 0.0], [c, 0.0], [0.0, c]])
    upper_corners = np.array([[c, c], [0.0, c], [c, 0.0]])
    corners = np.where(upper[:, None, None], upper_corners[None], lower[None])
    corners = corners + np.stack([cx, cy], axis=1)[:, None, :].astype(np.float64)
    uv = np.empty((mesh.triangles, 3, 2), np.float32)
    uv[..., 0] = corners[..., 0] / side
    uv[..., 1] = 1.0 - corners[..., 1] / side

    # Texel colours: barycentric interpolation inside each cell.
    t = (np.arange(cell) + 0.5) / cell
    tx, ty = np.meshgrid(t, t)  # (cell, cell): x across, y down
    in_upper = tx + ty > 1.0
    colours = mesh.colours.astype(np.float32)[mesh.faces]  # (F, 3 corners, 3 rgb)
    slots = int(np.ceil(mesh.triangles / 2))
    tiles = np.zeros((slots, cell, cell, 3), np.float32)
    for is_upper in (False, True):
        faces = f[upper == is_upper]
        if len(faces) == 0:
            continue
        u, v = (1.0 - tx, 1.0 - ty) if is_upper else (tx, ty)
        w = np.stack([1.0 - u - v, u, v], axis=-1).clip(0.0, 1.0)
        w /= w.sum(-1, keepdims=True)
        texels = np.einsum("hwk,fkc->fhwc", w, colours[faces])
        region = in_upper if is_upper else ~in_upper
        tiles[faces // 2] = np.where(region[None, :, :, None], texels, tiles[faces // 2])
    # Texels of a cell whose second triangle does not exist repeat the first one's colours.
    if mesh.triangles % 2:
        last = mesh.triangles - 1
        u, v = tx, ty
        w = np.stack([1.0 - u - v, u, v], axis=-1).clip(0.0, 1.0)
        w /= w.sum(-1, keepdims=True)
        tiles[last // 2] = np.einsum("hwk,kc->hwc", w, colours[last])
    rows = np.zeros((per_row * per_row, cell, cell, 3), np.float32)
    rows[:slots] = tiles
    image = rows.reshape(per_row, per_row, cell, cell, 3).transpose(0, 2, 1, 3, 4).reshape(side, side, 3)
    return Baked(image=np.clip(np.round(image), 0, 255).astype(np.uint8), uv=uv, cell=cell)


def png_bytes(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)  # optimize=True: ~6x the time for ~4% smaller
    return buf.getvalue()
