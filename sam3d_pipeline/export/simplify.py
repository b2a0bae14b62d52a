"""Triangle budgets: quadric decimation (``fast-simplification``) that keeps the vertex colours.

The decimator moves and merges vertices but knows nothing of colours, so each kept vertex takes the colour of
the nearest vertex of the original mesh (a k-d tree query; the surface moves by far less than an edge).
"""

from __future__ import annotations

import numpy as np

from sam3d_pipeline.export.mesh import ExportMesh


def simplify(mesh: ExportMesh, max_triangles: int) -> ExportMesh:
    """``mesh`` with at most ``max_triangles`` triangles (itself when it already fits).

    Raises:
        ValueError: ``max_triangles`` < 4.
    """
    if max_triangles < 4:
        raise ValueError(f"max_triangles must be at least 4, got {max_triangles}")
    if len(mesh.faces) <= max_triangles:
        return mesh
    import fast_simplification
    from scipy.spatial import cKDTree

    # The decimator stops a little above or below the asked ratio: aim low and check.
    target = max_triangles
    for _ in range(4):
        reduction = 1.0 - target / len(mesh.faces)
        points, faces = fast_simplification.simplify(mesh.vertices.astype(np.float32), mesh.faces.astype(np.int32),
                                                     target_reduction=float(np.clip(reduction, 0.0, 0.999)))
        if len(faces) <= max_triangles:
            break
        target = int(target * max_triangles / len(faces) * 0.98)
    points = np.asarray(points, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    used = np.unique(faces)
    remap = np.full(len(points), -1, np.int64)
    remap[used] = np.arange(len(used))
    points, faces = points[used], remap[faces]
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    _, nearest = cKDTree(mesh.vertices).query(points)
    return ExportMesh(vertices=points, faces=faces, colours=mesh.colours[nearest], colour_source=mesh.colour_source)
