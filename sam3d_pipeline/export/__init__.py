"""Assets people can ship: placement (Y up, facing +Z, on the floor, metres), triangle and byte budgets,
GLB (quantised for the web), USDZ (ARKit), OBJ + MTL, scenes of several objects. Pure: no Prefect, no torch.

- ``frame``: reconstructor frame → world frame (pose or image position), floor and scale.
- ``simplify``: decimation to a triangle budget, vertex colours kept.
- ``raster``: the one software rasteriser (preview, look measure, texture baking).
- ``texture``: xatlas UV charts and the colour baked into a padded power-of-two texture.
- ``gltf``: GLB writer (plain or ``KHR_mesh_quantization``; vertex-coloured or textured PBR) and reader.
- ``usdz``: USDZ writer and USD's ARKit compliance check.
- ``obj``: OBJ + MTL + texture.
- ``checks``: per-rule checks of the written files against a profile's targets (the marketplaces' for ``store``).
- ``assets``: profiles (web / ar / raw / store), budgets, one asset's files and report.
- ``look``: a z-buffered render of a mesh, and how much two renders differ (does an export keep the look?).
- ``preview``: the preview image of a run.
"""

from sam3d_pipeline.export.assets import (
    DEFAULT_FORMATS,
    FORMATS,
    PROFILE_SPECS,
    PROFILES,
    Asset,
    Budgets,
    Profile,
    ProfileName,
    export_asset,
    profile_spec,
    quantized,
)
from sam3d_pipeline.export.frame import (
    Placement,
    asset_vertices,
    image_placement,
    on_floor,
    pose_placement,
    transform_points,
)
from sam3d_pipeline.export.gltf import Part, read_glb, read_textured_glb, write_glb
from sam3d_pipeline.export.mesh import ExportMesh
from sam3d_pipeline.export.texture import Textured

__all__ = [
    "DEFAULT_FORMATS", "FORMATS", "PROFILES", "PROFILE_SPECS", "Asset", "Budgets", "ExportMesh", "Part", "Placement",
    "Profile", "ProfileName", "Textured", "asset_vertices", "export_asset", "image_placement", "on_floor",
    "pose_placement", "profile_spec", "quantized", "read_glb", "read_textured_glb", "transform_points", "write_glb",
]
