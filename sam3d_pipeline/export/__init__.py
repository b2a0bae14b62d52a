"""Assets people can ship: placement (Y up, facing +Z, on the floor, metres), triangle and byte budgets,
GLB (quantised for the web), USDZ (ARKit), OBJ + MTL, scenes of several objects. Pure: no Prefect, no torch.

- ``frame``: reconstructor frame → world frame (pose or image position), floor and scale.
- ``simplify``: decimation to a triangle budget, vertex colours kept.
- ``gltf``: GLB writer (plain or ``KHR_mesh_quantization``) and reader.
- ``texture``: vertex colours baked into a texture (USDZ, OBJ).
- ``usdz``: USDZ writer and USD's ARKit compliance check.
- ``obj``: OBJ + MTL + texture.
- ``assets``: profiles (web / ar / raw), budgets, one asset's files and report.
- ``look``: a z-buffered render of a mesh, and how much two renders differ (does an export keep the look?).
"""

from sam3d_pipeline.export.assets import DEFAULT_FORMATS, FORMATS, PROFILES, Asset, Budgets, export_asset, quantized
from sam3d_pipeline.export.frame import (
    Placement,
    asset_vertices,
    image_placement,
    on_floor,
    pose_placement,
    transform_points,
)
from sam3d_pipeline.export.gltf import Part, read_glb, write_glb
from sam3d_pipeline.export.mesh import ExportMesh

__all__ = [
    "DEFAULT_FORMATS", "FORMATS", "PROFILES", "Asset", "Budgets", "ExportMesh", "Part", "Placement",
    "asset_vertices", "export_asset", "image_placement", "on_floor", "pose_placement", "quantized", "read_glb",
    "transform_points", "write_glb",
]
