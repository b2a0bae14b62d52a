"""USDZ for iOS AR Quick Look, through Pixar's ``usd-core``, checked by USD's own compliance checker (ARKit).

The stage is one ``Mesh`` under an ``Xform`` default prim, Y up, ``metersPerUnit = 1``, with a
``UsdPreviewSurface`` material whose diffuse colour reads the baked texture (AR Quick Look ignores vertex
colours). The root layer is binary ``usdc`` and the texture PNG sits in the package, as ARKit requires.
``usd-core`` is pinned at 26.5, the last release that ships ``UsdUtils.ComplianceChecker`` (``usdchecker
--arkit``); later releases moved ``usdchecker`` to the validation framework and dropped the ARKit rules.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from sam3d_pipeline.export.texture import Textured, png_bytes

TEXTURE_NAME = "texture.png"


def _layout(mesh: Textured) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """(points, normals, face vertex indices, st values, st interpolation), the smaller of two layouts:

    - ``vertex``: the cut mesh as it is (a point per UV-chart vertex, ``st`` per point): small when the charts are
      real (about 0.6 vertices a triangle);
    - ``faceVarying``: the source mesh's shared points and ``st`` per face corner: small when every triangle is
      its own chart (three cut vertices a triangle, ``texture.bake_cells``).
    """
    shared, first, inverse = np.unique(mesh.source_vertex, return_index=True, return_inverse=True)
    per_vertex = len(mesh.vertices) * 32
    face_varying = len(shared) * 24 + mesh.triangles * 3 * 8
    if per_vertex <= face_varying:
        return (mesh.vertices.astype(np.float32), mesh.normals.astype(np.float32),
                mesh.faces.reshape(-1).astype(np.int32), mesh.uv.astype(np.float32), "vertex")
    return (mesh.vertices[first].astype(np.float32), mesh.normals[first].astype(np.float32),
            inverse[mesh.faces].reshape(-1).astype(np.int32), mesh.uv[mesh.faces].reshape(-1, 2).astype(np.float32),
            "faceVarying")


def write_usdz(mesh: Textured, *, name: str = "object", roughness: float = 0.85) -> bytes:
    """USDZ bytes of ``mesh`` with its baked texture (vertices in metres, Y up), in the smaller layout
    (:func:`_layout`)."""
    from pxr import Gf, Kind, Sdf, Usd, UsdGeom, UsdShade, Vt

    with tempfile.TemporaryDirectory(prefix="sam3d-usdz-") as tmp:
        folder = Path(tmp)
        (folder / TEXTURE_NAME).write_bytes(png_bytes(mesh.image))
        layer_path = folder / f"{name}.usdc"
        stage = Usd.Stage.CreateNew(str(layer_path))
        UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.y)
        UsdGeom.SetStageMetersPerUnit(stage, 1.0)
        root = UsdGeom.Xform.Define(stage, "/Object")
        Usd.ModelAPI(root.GetPrim()).SetKind(Kind.Tokens.component)
        stage.SetDefaultPrim(root.GetPrim())

        geom = UsdGeom.Mesh.Define(stage, "/Object/Mesh")
        points, normals, faces, st_values, st_mode = _layout(mesh)
        geom.CreatePointsAttr(Vt.Vec3fArray.FromNumpy(points))
        geom.CreateFaceVertexCountsAttr(Vt.IntArray.FromNumpy(np.full(mesh.triangles, 3, np.int32)))
        geom.CreateFaceVertexIndicesAttr(Vt.IntArray.FromNumpy(faces))
        geom.CreateSubdivisionSchemeAttr(UsdGeom.Tokens.none)
        geom.CreateDoubleSidedAttr(True)
        geom.CreateNormalsAttr(Vt.Vec3fArray.FromNumpy(normals))
        geom.SetNormalsInterpolation(UsdGeom.Tokens.vertex)
        lo, hi = points.min(0), points.max(0)
        geom.CreateExtentAttr(Vt.Vec3fArray([Gf.Vec3f(*map(float, lo)), Gf.Vec3f(*map(float, hi))]))
        st = UsdGeom.PrimvarsAPI(geom).CreatePrimvar("st", Sdf.ValueTypeNames.TexCoord2fArray, st_mode)
        st.Set(Vt.Vec2fArray.FromNumpy(st_values))

        material = UsdShade.Material.Define(stage, "/Object/Material")
        surface = UsdShade.Shader.Define(stage, "/Object/Material/Surface")
        surface.CreateIdAttr("UsdPreviewSurface")
        surface.CreateInput("roughness", Sdf.ValueTypeNames.Float).Set(float(roughness))
        surface.CreateInput("metallic", Sdf.ValueTypeNames.Float).Set(0.0)
        reader = UsdShade.Shader.Define(stage, "/Object/Material/ST")
        reader.CreateIdAttr("UsdPrimvarReader_float2")
        reader.CreateInput("varname", Sdf.ValueTypeNames.String).Set("st")
        reader.CreateOutput("result", Sdf.ValueTypeNames.Float2)
        tex = UsdShade.Shader.Define(stage, "/Object/Material/Texture")
        tex.CreateIdAttr("UsdUVTexture")
        tex.CreateInput("file", Sdf.ValueTypeNames.Asset).Set(TEXTURE_NAME)
        tex.CreateInput("sourceColorSpace", Sdf.ValueTypeNames.Token).Set("sRGB")
        tex.CreateInput("wrapS", Sdf.ValueTypeNames.Token).Set("clamp")
        tex.CreateInput("wrapT", Sdf.ValueTypeNames.Token).Set("clamp")
        tex.CreateInput("st", Sdf.ValueTypeNames.Float2).ConnectToSource(reader.ConnectableAPI(), "result")
        tex.CreateOutput("rgb", Sdf.ValueTypeNames.Float3)
        surface.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f).ConnectToSource(tex.ConnectableAPI(), "rgb")
        material.CreateSurfaceOutput().ConnectToSource(surface.ConnectableAPI(), "surface")
        UsdShade.MaterialBindingAPI.Apply(geom.GetPrim()).Bind(material)
        stage.GetRootLayer().Save()
        del stage

        # The root layer is one usdc without composition arcs and its one texture sits beside it: USD's own zip
        # writer packs them as they are (uncompressed, 64-byte aligned, root layer first), as ARKit wants.
        out = folder / f"{name}.usdz"
        writer = Sdf.ZipFileWriter.CreateNew(str(out))
        writer.AddFile(str(layer_path), layer_path.name)
        writer.AddFile(str(folder / TEXTURE_NAME), TEXTURE_NAME)
        writer.Save()
        return out.read_bytes()


def arkit_check(data: bytes) -> dict[str, Any]:
    """USD's compliance checker in ARKit mode (what ``usdchecker --arkit`` runs) on USDZ bytes.

    Returns:
        ``{"errors": [...], "failed_checks": [...], "warnings": [...], "passed": bool}``.
    """
    from pxr import UsdUtils

    with tempfile.TemporaryDirectory(prefix="sam3d-usdz-check-") as tmp:
        path = Path(tmp) / "check.usdz"
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            checker = UsdUtils.ComplianceChecker(arkit=True, skipARKitRootLayerCheck=False, rootPackageOnly=False,
                                                 skipVariants=False, verbose=False)
        checker.CheckCompliance(str(path))
        errors, failed, warned = (list(checker.GetErrors()), list(checker.GetFailedChecks()),
                                  list(checker.GetWarnings()))
    return {"errors": errors, "failed_checks": failed, "warnings": warned, "passed": not errors and not failed}
