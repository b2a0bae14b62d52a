"""The ``lite`` reconstructor: silhouette inflation into a closed, vertex-coloured mesh, on the CPU.

The mask's distance transform gives a round height profile (a disc becomes a sphere at thickness 1.0);
the profile is mirrored front/back into a solid, whose surface is extracted with marching cubes from the
field ``height(x, y) - |z|`` (negative outside the mask), so the mesh is closed by construction. Vertex
colours are sampled from the photo. It guesses depth from the outline alone: no splat, no pose.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from sam3d_pipeline.errors import InputError
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import BackendInfo, Reconstruction

VERSION = "inflate-1"
LIMITS = (
    "shape is inflated from the outline only (no learned depth); front and back are mirror images",
    "the back repeats the photo's colours; no Gaussian splat (object.ply) and no pose",
)
PAD = 2



def describe(settings: Settings | None = None) -> BackendInfo:
    """This backend's ``BackendInfo`` (the same for every settings: a classical algorithm on the CPU)."""
    return BackendInfo(name="lite", version=VERSION, device="cpu", limits=LIMITS, weights="none")

class LiteReconstructor:
    """Silhouette-inflation reconstructor (see module docstring)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def info(self) -> BackendInfo:
        return describe(self.settings)

    def reconstruct(self, rgb: np.ndarray, mask: np.ndarray, *, seed: int = 0) -> Reconstruction:
        """Inflate the object under ``mask``.

        Args:
            rgb: ``(H, W, 3)`` uint8 photo.
            mask: ``(H, W)`` bool, same size.
            seed: unused (the algorithm is deterministic); accepted for interface parity.

        Returns:
            A ``Reconstruction`` whose mesh is watertight, y up, centred at the origin, longest side 1.0.

        Raises:
            InputError: empty or tiny mask, or a mask/image size mismatch.
        """
        import trimesh
        from skimage.measure import marching_cubes

        if mask.shape != rgb.shape[:2]:
            raise InputError(f"mask is {mask.shape[::-1]}, image is {rgb.shape[1::-1]} (width, height)")
        if not mask.any():
            raise InputError("mask is empty: nothing to reconstruct")
        grid, origin, cell = self._grid(mask)
        if grid.sum() < 4:
            raise InputError(f"mask is too small to reconstruct ({int(mask.sum())} pixels)")
        height = self._height_field(grid)
        zmax = int(np.ceil(max(height.max(), 1.0))) + PAD
        z = np.arange(-zmax, zmax + 1, dtype=np.float32)
        field = height[:, :, None] - np.abs(z)[None, None, :]
        verts, faces, _, _ = marching_cubes(field, level=0.0)
        rows, cols, zs = verts[:, 0], verts[:, 1], verts[:, 2] - zmax

        # Colours from the photo at each vertex's image position.
        img_y = np.clip(np.round(origin[0] + (rows - PAD + 0.5) * cell - 0.5), 0, rgb.shape[0] - 1).astype(int)
        img_x = np.clip(np.round(origin[1] + (cols - PAD + 0.5) * cell - 0.5), 0, rgb.shape[1] - 1).astype(int)
        colours = np.concatenate([rgb[img_y, img_x], np.full((len(verts), 1), 255, np.uint8)], axis=1)

        span = float(max(grid.shape) - 2 * PAD)
        xyz = np.stack([cols, -rows, zs], axis=1).astype(np.float64) / span
        xyz -= (xyz.max(0) + xyz.min(0)) / 2.0
        mesh = trimesh.Trimesh(vertices=xyz, faces=faces, vertex_colors=colours, process=True)
        if mesh.is_watertight and mesh.volume < 0:
            mesh.invert()
        stats = {
            "vertices": int(len(mesh.vertices)),
            "faces": int(len(mesh.faces)),
            "watertight": bool(mesh.is_watertight),
            "grid_cell_px": round(float(cell), 3),
            "extent": [round(float(v), 4) for v in mesh.extents],
        }
        return Reconstruction(mesh=mesh, backend=self.info(), splat_ply=None, pose=None, stats=stats)

    def _grid(self, mask: np.ndarray) -> tuple[np.ndarray, tuple[float, float], float]:
        """Crop to the mask, resample so the long side has ``lite_mesh_resolution`` cells, pad with background.

        Returns:
            ``(grid, (y0, x0), cell)``: bool grid, image position of the first unpadded cell's corner,
            and the cell size in image pixels.
        """
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        crop = mask[y0:y1, x0:x1].astype(np.float32)
        cell = max(1.0, max(crop.shape) / self.settings.lite_mesh_resolution)
        size = (max(1, round(crop.shape[1] / cell)), max(1, round(crop.shape[0] / cell)))
        small = cv2.resize(crop, size, interpolation=cv2.INTER_AREA) >= 0.5
        cell_y, cell_x = crop.shape[0] / size[1], crop.shape[1] / size[0]
        return np.pad(small, PAD), (float(y0), float(x0)), float((cell_x + cell_y) / 2)

    def _height_field(self, grid: np.ndarray) -> np.ndarray:
        """Signed height: a round inflation profile inside the mask, minus the distance outside it."""
        inside = ndimage.distance_transform_edt(grid) - 0.5
        outside = ndimage.distance_transform_edt(~grid) - 0.5
        radius = float(inside.max())
        d = np.clip(inside, 0.0, None)
        profile = self.settings.lite_thickness * np.sqrt(np.clip(d * (2.0 * radius - d), 0.0, None))
        return np.where(grid, np.maximum(profile, 0.5), -outside).astype(np.float32)
