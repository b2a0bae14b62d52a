"""Export profiles and budgets: one placed mesh → the files of one asset (GLB, USDZ, OBJ + MTL, splat PLY).

Profiles:
- ``web`` (default): simplified to the triangle budget, ``KHR_mesh_quantization`` GLB (smallest file that
  ``<model-viewer>`` opens without a decoder).
- ``ar``: simplified to the triangle budget, plain float GLB (no extension a viewer must support: Android Scene
  Viewer and other AR viewers).
- ``raw``: the reconstructor's mesh as it came (only moved and scaled onto the floor), float GLB; the budgets
  are reported, not enforced.

USDZ and OBJ carry the vertex colours baked into a texture (``texture.py``). When the GLB or the USDZ is over
the byte budget the mesh is simplified further (up to four times); an asset that still does not fit says so in its
report (``budget.met`` false, with the reasons).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from sam3d_pipeline.export.gltf import Part, write_glb
from sam3d_pipeline.export.mesh import ExportMesh
from sam3d_pipeline.export.simplify import simplify
from sam3d_pipeline.export.texture import bake

Profile = Literal["web", "ar", "raw"]
Format = Literal["glb", "usdz", "obj", "ply"]
PROFILES: tuple[str, ...] = ("web", "ar", "raw")
FORMATS: tuple[str, ...] = ("glb", "usdz", "obj", "ply")
DEFAULT_FORMATS: tuple[str, ...] = ("glb", "usdz")
# The files stores and viewers take, held to the byte budget. OBJ is text for interchange (~6x a web GLB) and
# the splat comes as the reconstructor made it: their sizes are reported, not budgeted.
BUDGETED_FILES = ("object.glb", "object.usdz")


@dataclass(frozen=True)
class Budgets:
    """Limits of one asset: triangles, bytes per file, texture side (pixels)."""

    max_triangles: int = 100_000
    max_bytes: int = 5_000_000
    texture_max_px: int = 2048


@dataclass
class Asset:
    """One exported asset.

    Attributes:
        files: file name (``object.glb``, ``object.usdz``, ``object.obj``, ``object.mtl``, ``texture.png``,
            ``object.ply``) → bytes.
        mesh: the mesh as exported (simplified for ``web`` / ``ar``), world frame, on the floor.
        report: what ``result.json`` says about it (see :func:`export_asset`).
    """

    files: dict[str, bytes]
    mesh: ExportMesh
    report: dict[str, Any] = field(default_factory=dict)


def quantized(profile: str) -> bool:
    return profile == "web"


def export_asset(mesh: ExportMesh, *, profile: str = "web", formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS,
                 budgets: Budgets | None = None, splat_ply: bytes | None = None, check_usdz: bool = True,
                 extras: dict[str, Any] | None = None) -> Asset:
    """Export ``mesh`` (already placed: metres, Y up, on the floor) in ``formats`` under ``profile``.

    Returns:
        The asset; its report holds ``profile``, ``formats``, ``triangles_in``, ``triangles``, ``vertices``,
        ``bytes`` (per file), ``budget`` (``max_triangles``, ``max_bytes``, ``met``, ``reasons``), ``bounds_m``
        (min / max corner), ``usdz_check`` (ARKit compliance, when a USDZ was written and checked),
        ``skipped`` (formats asked for that this asset cannot have, and why) and ``export_s``.

    Raises:
        ValueError: an unknown profile or format.
    """
    budgets = budgets or Budgets()
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r}: choose one of {', '.join(PROFILES)}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"export format(s) {unknown}: choose from {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    skipped: dict[str, str] = {}
    target = budgets.max_triangles if profile != "raw" else mesh.triangles
    files: dict[str, bytes] = {}
    out = mesh
    for _ in range(5):
        out = simplify(mesh, target) if target < mesh.triangles else mesh
        files = _write(out, profile, formats, budgets, extras)
        reducible = {k: len(v) for k, v in files.items() if k in BUDGETED_FILES}
        biggest = max(reducible.values(), default=0)
        if profile == "raw" or biggest <= budgets.max_bytes or out.triangles <= 100:
            break
        target = max(100, int(out.triangles * budgets.max_bytes / biggest * 0.9))
    if "ply" in formats:
        if splat_ply is not None:
            files["object.ply"] = splat_ply
        else:
            skipped["ply"] = "this reconstructor makes no Gaussian splat"
    reasons = []
    if out.triangles > budgets.max_triangles:
        reasons.append(f"{out.triangles:,} triangles > {budgets.max_triangles:,}")
    reasons += [f"{name} is {len(data):,} bytes > {budgets.max_bytes:,}" for name, data in sorted(files.items())
                if name in BUDGETED_FILES and len(data) > budgets.max_bytes]
    report: dict[str, Any] = {
        "profile": profile,
        "formats": [f for f in formats if f not in skipped],
        "triangles_in": mesh.triangles,
        "triangles": out.triangles,
        "vertices": int(len(out.vertices)),
        "bytes": {name: len(data) for name, data in sorted(files.items())},
        "budget": {"max_triangles": budgets.max_triangles, "max_bytes": budgets.max_bytes, "met": not reasons,
                   "reasons": reasons},
        "bounds_m": [[round(float(v), 5) for v in row] for row in out.bounds()],
    }
    if skipped:
        report["skipped"] = skipped
    if check_usdz and "object.usdz" in files:
        from sam3d_pipeline.export.usdz import arkit_check

        report["usdz_check"] = arkit_check(files["object.usdz"])
    report["export_s"] = round(time.perf_counter() - t0, 3)
    return Asset(files=files, mesh=out, report=report)


def _write(mesh: ExportMesh, profile: str, formats: tuple[str, ...] | list[str], budgets: Budgets,
           extras: dict[str, Any] | None) -> dict[str, bytes]:
    files = {"object.glb": write_glb([Part("object", mesh)], quantize=quantized(profile),
                                     extras={"profile": profile, **(extras or {})})}
    if "usdz" in formats or "obj" in formats:
        baked = bake(mesh, budgets.texture_max_px)
        if "usdz" in formats:
            from sam3d_pipeline.export.usdz import write_usdz

            files["object.usdz"] = write_usdz(mesh, baked)
        if "obj" in formats:
            from sam3d_pipeline.export.obj import write_obj

            files.update(write_obj(mesh, baked))
    if "glb" not in formats:
        files.pop("object.glb")
    return files
