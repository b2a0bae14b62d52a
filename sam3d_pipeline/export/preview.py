"""A software-rendered preview of a mesh (no OpenGL needed): a shaded three-quarter view on a soft backdrop, with
a label. Drawn by the look measure's renderer (``look.draw``)."""

from __future__ import annotations

import numpy as np

from sam3d_pipeline.export.look import draw
from sam3d_pipeline.export.mesh import ExportMesh
from sam3d_pipeline.export.raster import rotation
from sam3d_pipeline.images import draw_label

BACKGROUND_TOP = np.array([236, 239, 243], np.float32)
BACKGROUND_BOTTOM = np.array([200, 205, 212], np.float32)


def render_preview(mesh, *, size_px: int = 512, yaw_deg: float = -30.0, pitch_deg: float = 20.0,
                   label: str | None = None) -> np.ndarray:
    """Render ``mesh`` (a ``trimesh.Trimesh`` with vertex colours) from a three-quarter view.

    Orthographic, z-buffered, vertex colours and normals interpolated per pixel; the mesh's centre of mass of
    vertices sits at the image centre and it fills ~80% of the frame.

    Returns:
        ``(size_px, size_px, 3)`` uint8 image.
    """
    surface = ExportMesh.from_trimesh(mesh)
    rot = rotation(yaw_deg, pitch_deg)
    centre = surface.vertices.mean(0)
    extent = float(np.abs(((surface.vertices - centre) @ rot.T)[:, :2]).max()) or 1.0
    pixel, rgb = draw(surface, rot, size_px=size_px, centre=centre, scale=0.4 * size_px / extent)
    ramp = np.linspace(0.0, 1.0, size_px, dtype=np.float32)[:, None, None]
    image = (BACKGROUND_TOP * (1 - ramp) + BACKGROUND_BOTTOM * ramp) * np.ones((1, size_px, 1), np.float32)
    image.reshape(-1, 3)[pixel] = rgb
    out = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return draw_label(out, label) if label else out
