"""Binary glTF (GLB) of a ``trimesh.Trimesh``, and back: how the reconstruct stage hands its mesh over
(``stages/reconstruct/object.glb``). The published assets are written by ``sam3d_pipeline.export``."""

from __future__ import annotations

import io
from typing import Any


def mesh_to_glb(mesh: Any, **extras: str) -> bytes:
    """GLB bytes of a ``trimesh.Trimesh`` with its vertex colours; ``extras`` (e.g. ``segmenter="sam3@…"``,
    ``reconstructor="lite@…"``) land in ``scenes[0].extras`` beside ``generator: sam3d-pipeline``."""
    import trimesh

    scene = trimesh.Scene(mesh)
    scene.metadata.update({"generator": "sam3d-pipeline", **extras})
    return trimesh.exchange.gltf.export_glb(scene)


def glb_to_mesh(data: bytes) -> Any:
    """The single mesh in a GLB as a ``trimesh.Trimesh`` (scene graph transforms applied)."""
    import trimesh

    loaded = trimesh.load(io.BytesIO(data), file_type="glb", process=False)
    if isinstance(loaded, trimesh.Scene):
        loaded = loaded.to_geometry() if hasattr(loaded, "to_geometry") else loaded.dump(concatenate=True)
    return loaded
