"""Per-rule checks of exported files against the profile's targets: read back from the bytes written, not from
what the exporter meant to write, so a wrong file fails its rule.

Every result is ``{"rule", "limit", "value", "pass", "by"}`` (``by``: whose rule it is). All profiles: the
triangle and byte budgets, and for a USDZ USD's ARKit check and AR Quick Look's texture limit. The ``store``
profile adds the marketplaces' published rules (late 2026):

- Amazon: metallic-roughness PBR; square, power-of-two PNG or JPEG textures; only listed glTF extensions
  (``KHR_draco_mesh_compression`` is listed; meshopt and ``KHR_mesh_quantization`` are not); ≤ 200k triangles.
- Shopify: base colour texture (normal and packed occlusion/roughness/metallic maps are expected too: not made
  here, the material uses constant roughness and metallic factors); ~4 MB typical, over 15 MB re-optimised.
- Google Merchant: GLB ≤ 15 MB, 10 MB recommended.
- Apple AR Quick Look: ≤ 100k polygons, textures up to 2048².
- No dependence on vertex colours (the GLB has no ``COLOR_0``).
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam3d_pipeline.export.gltf import image_bytes, unpack

STORE_EXTENSIONS = ("KHR_draco_mesh_compression",)  # glTF extensions every store target accepts
TEXTURE_FORMATS = ("PNG", "JPEG")
AR_QUICK_LOOK_TEXTURE_PX = 2048


@dataclass(frozen=True)
class Limits:
    """What one asset is checked against."""

    max_triangles: int
    max_bytes: int
    store: bool = False
    texture_min_px: int = 1024
    texture_max_px: int = 2048


def _rule(rule: str, limit: Any, value: Any, ok: bool, by: str) -> dict[str, Any]:
    return {"rule": rule, "limit": limit, "value": value, "pass": bool(ok), "by": by}


def _image_facts(data: bytes) -> tuple[int, int, str]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.width, img.height, str(img.format)


def glb_facts(data: bytes) -> dict[str, Any]:
    """What a GLB holds: ``triangles``, ``extensions`` (used), ``vertex_colours`` (primitives with ``COLOR_0``),
    ``primitives``, ``textured_pbr`` (primitives whose material is metallic-roughness with a base colour
    texture), ``textures`` (``(width, height, format)`` of each image)."""
    gltf, blob = unpack(data)
    triangles = vertex_colours = textured = primitives = 0
    materials = gltf.get("materials", [])
    for mesh in gltf.get("meshes", []):
        for prim in mesh["primitives"]:
            primitives += 1
            count = gltf["accessors"][prim["indices"]]["count"] if "indices" in prim else \
                gltf["accessors"][prim["attributes"]["POSITION"]]["count"]
            triangles += count // 3 if prim.get("mode", 4) == 4 else 0
            vertex_colours += "COLOR_0" in prim["attributes"]
            pbr = materials[prim["material"]].get("pbrMetallicRoughness", {}) if "material" in prim else {}
            textured += "baseColorTexture" in pbr and "TEXCOORD_0" in prim["attributes"]
    textures = [_image_facts(image_bytes(gltf, blob, i)) for i in range(len(gltf.get("images", [])))]
    return {"triangles": triangles, "extensions": sorted(gltf.get("extensionsUsed", [])),
            "vertex_colours": vertex_colours, "primitives": primitives, "textured_pbr": textured,
            "textures": textures}


def usdz_facts(data: bytes) -> dict[str, Any]:
    """What a USDZ holds: ``triangles`` (its meshes' faces, as triangles) and ``textures``."""
    from pxr import Usd, UsdGeom

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        textures = [_image_facts(zf.read(n)) for n in zf.namelist() if n.lower().endswith((".png", ".jpg", ".jpeg"))]
    with tempfile.TemporaryDirectory(prefix="sam3d-usdz-facts-") as tmp:
        path = Path(tmp) / "asset.usdz"
        path.write_bytes(data)
        stage = Usd.Stage.Open(str(path))
        triangles = 0
        for prim in stage.Traverse():
            if prim.IsA(UsdGeom.Mesh):
                counts = UsdGeom.Mesh(prim).GetFaceVertexCountsAttr().Get() or []
                triangles += int(sum(max(0, c - 2) for c in counts))
        del stage
    return {"triangles": triangles, "textures": textures}


def _size_rules(kind: str, triangles: int, size: int, limits: Limits, tri_by: str, byte_by: str) -> list[dict]:
    return [_rule(f"{kind} triangles", limits.max_triangles, triangles, triangles <= limits.max_triangles, tri_by),
            _rule(f"{kind} bytes", limits.max_bytes, size, size <= limits.max_bytes, byte_by)]


def check_files(files: dict[str, bytes], limits: Limits, usdz_check: dict[str, Any] | None = None) -> list[dict]:
    """Per-rule results for the asset ``files`` (``object.glb``, ``object.usdz``; others are not checked).

    Args:
        files: file name → bytes.
        limits: the profile's targets.
        usdz_check: USD's ARKit check of the USDZ (``usdz.arkit_check``), when it was run.
    """
    out: list[dict[str, Any]] = []
    tri_by = "AR Quick Look 100k, Amazon 200k" if limits.store else "triangle budget"
    byte_by = "Google Merchant 10 MB recommended, Shopify 15 MB" if limits.store else "byte budget"
    if "object.glb" in files:
        glb = glb_facts(files["object.glb"])
        out += _size_rules("glb", glb["triangles"], len(files["object.glb"]), limits, tri_by, byte_by)
        if limits.store:
            outside = [e for e in glb["extensions"] if e not in STORE_EXTENSIONS]
            out.append(_rule("glb extensions", list(STORE_EXTENSIONS), glb["extensions"], not outside,
                             "Amazon's listed extensions"))
            out.append(_rule("glb vertex colours", 0, glb["vertex_colours"], glb["vertex_colours"] == 0,
                             "no dependence on vertex colours"))
            out.append(_rule("glb textured metallic-roughness primitives", glb["primitives"], glb["textured_pbr"],
                             glb["primitives"] > 0 and glb["textured_pbr"] == glb["primitives"],
                             "Amazon PBR, Shopify base colour"))
            out += _texture_rules("glb", glb["textures"], limits)
    if "object.usdz" in files:
        usdz = usdz_facts(files["object.usdz"])
        out += _size_rules("usdz", usdz["triangles"], len(files["object.usdz"]), limits, tri_by, byte_by)
        side = max((max(w, h) for w, h, _ in usdz["textures"]), default=0)
        out.append(_rule("usdz texture side max", AR_QUICK_LOOK_TEXTURE_PX, side,
                         0 < side <= AR_QUICK_LOOK_TEXTURE_PX, "AR Quick Look"))
        if limits.store:
            out += _texture_rules("usdz", usdz["textures"], limits)
        if usdz_check is not None:
            problems = usdz_check["errors"] + usdz_check["failed_checks"]
            out.append(_rule("usdz ARKit compliance", "passes", "passes" if usdz_check["passed"] else problems[:3],
                             usdz_check["passed"], "USD's ARKit checker (usdchecker --arkit)"))
    return out


def _texture_rules(kind: str, textures: list[tuple[int, int, str]], limits: Limits) -> list[dict[str, Any]]:
    if not textures:
        return [_rule(f"{kind} textures", ">= 1", 0, False, "Amazon PBR, Shopify base colour")]
    out = []
    for w, h, fmt in textures:
        square_pow2 = w == h and w > 0 and not w & (w - 1)
        out.append(_rule(f"{kind} texture square power of two", "square, power of two", f"{w}x{h}", square_pow2,
                         "Amazon"))
        out.append(_rule(f"{kind} texture side range", [limits.texture_min_px, limits.texture_max_px], max(w, h),
                         limits.texture_min_px <= max(w, h) <= limits.texture_max_px, "Amazon 2K-4K, AR Quick Look 2K"))
        out.append(_rule(f"{kind} texture format", list(TEXTURE_FORMATS), fmt, fmt in TEXTURE_FORMATS, "Amazon"))
    return out


def passed(checks: list[dict[str, Any]]) -> bool:
    return all(c["pass"] for c in checks)
