"""Wavefront OBJ with its MTL and the baked texture (``texture.png``): the colours every OBJ reader understands."""

from __future__ import annotations

import io

import numpy as np

from sam3d_pipeline.export.texture import TEXTURE_NAME_OBJ, Textured, png_bytes


def write_obj(mesh: Textured, *, name: str = "object") -> dict[str, bytes]:
    """``{"<name>.obj", "<name>.mtl", "texture.png"}`` bytes; the OBJ names the MTL, the MTL the texture.

    Positions and normals are written once per source vertex and texture coordinates once per vertex of the cut
    mesh, so a reader that welds by position sees the surface whole across the UV seams.
    """
    out = io.StringIO()
    out.write(f"# sam3d-pipeline\nmtllib {name}.mtl\no {name}\n")
    source = mesh.source_vertex
    count = int(source.max()) + 1
    positions = np.zeros((count, 3))
    normals = np.zeros((count, 3))
    positions[source], normals[source] = mesh.vertices, mesh.normals
    np.savetxt(out, positions, fmt="v %.6f %.6f %.6f")
    np.savetxt(out, mesh.uv, fmt="vt %.6f %.6f")
    np.savetxt(out, normals, fmt="vn %.5f %.5f %.5f")
    out.write("usemtl material\n")
    v = source[mesh.faces] + 1
    t = mesh.faces + 1
    rows = np.stack([v[:, 0], t[:, 0], v[:, 0], v[:, 1], t[:, 1], v[:, 1], v[:, 2], t[:, 2], v[:, 2]], axis=1)
    np.savetxt(out, rows, fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
    mtl = ("# sam3d-pipeline\nnewmtl material\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nNs 10\nd 1\nillum 1\n"
           f"map_Kd {TEXTURE_NAME_OBJ}\n")
    return {f"{name}.obj": out.getvalue().encode(), f"{name}.mtl": mtl.encode(),
            TEXTURE_NAME_OBJ: png_bytes(mesh.image)}
