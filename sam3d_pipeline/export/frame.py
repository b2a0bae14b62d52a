"""Where an object sits: its reconstructor's frame → our world frame, in metres, resting on the floor.

World frame of every asset (glTF's): **Y up, the object's photographed side facing +Z** (towards the viewer of
the photo), X to the right, metres. Each asset is centred on X/Z and its lowest point rests on Y = 0.

- ``sam3d`` meshes come Y-up from SAM 3D Objects' GLB post-processing (its object frame is Z-up; the GLB turns
  ``(x, y, z)`` into ``(x, z, -y)``). The pose maps the Z-up object frame into the photo's camera frame in
  PyTorch3D's convention (+X left, +Y up, +Z away from the camera), row vectors: ``p_cam = (s * p) @ R(q) + t``.
  That frame turned 180° about Y is ours, so the object keeps the orientation and the metric size of the photo
  (``scale_source: "sam3d-pose"``). A tilted camera tilts the object by the same angle.
- ``lite`` meshes are already Y-up facing +Z, longest side 1.0, and carry no scale: the largest object of the
  photo gets ``SAM3D_EXPORT_DEFAULT_SIZE_M`` as its longest side, the others keep their size relative to it in
  the photo, and the scene places them side by side at their image positions (``scale_source: "default"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# SAM 3D Objects' GLB frame (Y-up) → its Z-up object frame, as a row-vector matrix: (x, y, z) → (x, -z, y).
GLB_TO_OBJECT = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
# PyTorch3D camera frame → ours (180° about Y), row vectors.
CAMERA_TO_WORLD = np.diag([-1.0, 1.0, -1.0])


@dataclass
class Placement:
    """How one object's mesh maps into the world frame.

    Attributes:
        matrix: ``(4, 4)`` column-vector transform, mesh coordinates → world (metres), as the scene places it.
        units: always ``"m"``.
        scale_source: ``"sam3d-pose"`` (the reconstructor's metric scale) or ``"default"``.
        layout: ``"reconstructor-pose"`` or ``"image-positions"`` (how the scene arranges objects).
    """

    matrix: np.ndarray
    units: str = "m"
    scale_source: str = "default"
    layout: str = "image-positions"
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"units": self.units, "scale_source": self.scale_source, "layout": self.layout,
                "matrix": [[round(float(v), 6) for v in row] for row in self.matrix]}


def quaternion_matrix(wxyz: list[float]) -> np.ndarray:
    """The ``(3, 3)`` rotation matrix of a unit quaternion ``w, x, y, z`` (PyTorch3D's ``quaternion_to_matrix``)."""
    w, x, y, z = (float(v) for v in wxyz)
    n = w * w + x * x + y * y + z * z
    s = 2.0 / n if n > 0 else 0.0
    return np.array([
        [1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)],
        [s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)],
        [s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)],
    ])


def pose_placement(pose: dict[str, list[float]]) -> Placement:
    """The placement of a SAM 3D Objects mesh from its pose (``rotation`` wxyz, ``translation``, ``scale``)."""
    rot = quaternion_matrix(pose["rotation"])
    scale = np.diag(np.asarray(pose["scale"], dtype=np.float64))
    linear_rows = GLB_TO_OBJECT @ scale @ rot @ CAMERA_TO_WORLD  # row-vector chain
    offset_row = np.asarray(pose["translation"], dtype=np.float64) @ CAMERA_TO_WORLD
    matrix = np.eye(4)
    matrix[:3, :3] = linear_rows.T
    matrix[:3, 3] = offset_row
    return Placement(matrix=matrix, scale_source="sam3d-pose", layout="reconstructor-pose")


def image_placement(box: tuple[float, float, float, float], image_size: tuple[int, int],
                    reference_px: float, default_size_m: float, mesh_size: float = 1.0) -> Placement:
    """The placement of a mesh without a pose (``lite``): sized and placed by its box in the photo.

    Args:
        box: the object's xyxy box in pixels.
        image_size: ``(width, height)`` of the photo.
        reference_px: the longest box side (pixels) among the photo's objects; that object gets ``default_size_m``.
        default_size_m: longest side of the largest object, metres.
        mesh_size: the mesh's own longest side in its units (``lite``: 1.0).
    """
    x0, y0, x1, y1 = box
    width, height = image_size
    metres_per_px = default_size_m / max(reference_px, 1.0)
    size = metres_per_px * max(x1 - x0, y1 - y0, 1.0) / max(mesh_size, 1e-12)
    matrix = np.diag([size, size, size, 1.0])
    matrix[:3, 3] = [((x0 + x1) / 2 - width / 2) * metres_per_px, (height / 2 - (y0 + y1) / 2) * metres_per_px, 0.0]
    return Placement(matrix=matrix)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(points, dtype=np.float64) @ matrix[:3, :3].T + matrix[:3, 3]


def on_floor(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``vertices`` moved so they are centred on X/Z and their lowest point is at Y = 0; and the offset added."""
    lo, hi = vertices.min(0), vertices.max(0)
    offset = np.array([-(lo[0] + hi[0]) / 2, -lo[1], -(lo[2] + hi[2]) / 2])
    return vertices + offset, offset


def asset_vertices(vertices: np.ndarray, placement: Placement) -> np.ndarray:
    """One object's own asset: its placement's rotation and scale (not its position), then onto the floor."""
    linear = placement.matrix.copy()
    linear[:3, 3] = 0.0
    return on_floor(transform_points(linear, vertices))[0]
