"""The mesh every exporter takes: plain arrays, no vendor objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Where an ExportMesh's colours came from: the reconstructor's vertex colours (lite, SAM 3D Objects' GLB), a
# textured mesh's texture sampled at its vertices, or nothing (uniform grey).
COLOUR_SOURCES = ("vertex-colours", "mesh-texture-at-vertices", "none-grey")


@dataclass
class ExportMesh:
    """A triangle mesh with one sRGB colour per vertex.

    Attributes:
        vertices: ``(N, 3)`` float64, metres in the world frame (Y up, facing +Z) once placed.
        faces: ``(F, 3)`` int64 vertex indices, counter-clockwise seen from outside.
        colours: ``(N, 3)`` uint8 sRGB.
        colour_source: where the colours came from (``COLOUR_SOURCES``); a baked texture reports it.
    """

    vertices: np.ndarray
    faces: np.ndarray
    colours: np.ndarray
    colour_source: str = "vertex-colours"

    @classmethod
    def from_trimesh(cls, mesh: Any) -> ExportMesh:
        """From a ``trimesh.Trimesh`` with vertex colours (grey when it has none)."""
        vertices = np.asarray(mesh.vertices, dtype=np.float64)
        colours, source = None, "vertex-colours"
        visual = getattr(mesh, "visual", None)
        if visual is not None and getattr(visual, "kind", None) == "vertex":
            colours = np.asarray(visual.vertex_colors)[:, :3]
        elif visual is not None and getattr(visual, "kind", None) is not None:
            colours, source = np.asarray(visual.to_color().vertex_colors)[:, :3], "mesh-texture-at-vertices"
        if colours is None or len(colours) != len(vertices):
            colours, source = np.full((len(vertices), 3), 180, np.uint8), "none-grey"
        return cls(vertices=vertices, faces=np.asarray(mesh.faces, dtype=np.int64),
                   colours=np.ascontiguousarray(colours, dtype=np.uint8), colour_source=source)

    def with_vertices(self, vertices: np.ndarray) -> ExportMesh:
        return ExportMesh(vertices=np.asarray(vertices, dtype=np.float64), faces=self.faces, colours=self.colours,
                          colour_source=self.colour_source)

    @property
    def triangles(self) -> int:
        return int(len(self.faces))

    def vertex_normals(self) -> np.ndarray:
        """``(N, 3)`` unit normals: the area-weighted mean of the adjacent faces' normals."""
        tri = self.vertices[self.faces]
        face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 x area
        normals = np.zeros_like(self.vertices)
        for k in range(3):
            np.add.at(normals, self.faces[:, k], face_n)
        length = np.linalg.norm(normals, axis=1, keepdims=True)
        fallback = np.array([0.0, 1.0, 0.0])
        return np.where(length > 1e-20, normals / np.maximum(length, 1e-20), fallback)

    def bounds(self) -> np.ndarray:
        """``(2, 3)``: min and max corner."""
        return np.stack([self.vertices.min(0), self.vertices.max(0)])


def srgb_to_linear(srgb_u8: np.ndarray) -> np.ndarray:
    """uint8 sRGB → float linear in [0, 1] (glTF's COLOR_0 is linear)."""
    c = np.asarray(srgb_u8, dtype=np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    """float linear in [0, 1] → uint8 sRGB."""
    c = np.clip(np.asarray(linear, dtype=np.float64), 0.0, 1.0)
    s = np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)
    return np.clip(np.round(s * 255.0), 0, 255).astype(np.uint8)
