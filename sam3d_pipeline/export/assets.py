"""Export profiles and budgets: one placed mesh → the files of one asset (GLB, USDZ, OBJ + MTL, splat PLY).

Profiles (``PROFILES``):
- ``web`` (default): simplified to the triangle budget, vertex-coloured ``KHR_mesh_quantization`` GLB (smallest
  file that ``<model-viewer>`` opens without a decoder).
- ``ar``: simplified to the triangle budget, plain float vertex-coloured GLB (no extension a viewer must
  support: Android Scene Viewer and other AR viewers).
- ``raw``: the reconstructor's mesh as it came (only moved and scaled onto the floor), float GLB; the budgets
  are reported, not enforced.
- ``store``: what marketplaces take (``checks``): at most 100k triangles (fewer when the triangle budget says
  so) and 10 MB a file (Google Merchant's recommendation, in place of the byte budget), a textured
  metallic-roughness GLB without vertex colours or extensions, and a square power-of-two texture of 1024 px or
  more (up to the texture budget, at most 4096).

USDZ and OBJ (every profile) and the ``store`` GLB carry the colour baked into a texture (``texture.py``): over
xatlas UV charts for ``store``, in per-triangle cells (fast, no unwrap) for the others. When the GLB or the USDZ
is over the byte budget the mesh is simplified further (up to four times); an asset that still does not fit says
so in its report (``budget.met`` false, with the reasons), and every asset's report lists its per-rule
``checks``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from sam3d_pipeline.export.checks import Limits, check_files, passed
from sam3d_pipeline.export.gltf import Part, write_glb
from sam3d_pipeline.export.mesh import ExportMesh
from sam3d_pipeline.export.simplify import simplify
from sam3d_pipeline.export.texture import Textured, bake, bake_cells, texture_side

ProfileName = Literal["web", "ar", "raw", "store"]
Format = Literal["glb", "usdz", "obj", "ply"]
FORMATS: tuple[str, ...] = ("glb", "usdz", "obj", "ply")
DEFAULT_FORMATS: tuple[str, ...] = ("glb", "usdz")
# The files stores and viewers take, held to the byte budget. OBJ is text for interchange (~6x a web GLB) and
# the splat comes as the reconstructor made it: their sizes are reported, not budgeted.
BUDGETED_FILES = ("object.glb", "object.usdz")


@dataclass(frozen=True)
class Profile:
    """How one profile exports (see module docstring).

    Attributes:
        simplify: decimate to the triangle budget (and further when a file is over the byte budget).
        quantize: ``KHR_mesh_quantization`` GLB.
        textured_glb: the GLB carries the baked texture instead of vertex colours.
        store: checked against the marketplaces' rules (``checks``).
        max_triangles: a cap on top of the triangle budget (None: the budget alone).
        max_bytes: the byte limit of each budgeted file instead of the budget's (None: the budget's).
        texture_min_px, texture_max_px: the baked texture's side range (the max also capped by the budget's).
        roughness: the material's roughness (metallic is always 0).
        uv_charts: bake over real UV charts (an xatlas unwrap: seconds to tens of seconds); False: the fast
            per-triangle cells (``texture.bake_cells``).
    """

    name: str
    simplify: bool
    quantize: bool
    textured_glb: bool = False
    store: bool = False
    max_triangles: int | None = None
    max_bytes: int | None = None
    texture_min_px: int = 256
    texture_max_px: int = 4096
    roughness: float = 0.85
    uv_charts: bool = False
    summary: str = ""

    def limits(self, budgets: Budgets) -> Limits:
        """The limits this profile's assets are checked against, given the run's ``budgets``."""
        top = _power_of_two_floor(min(self.texture_max_px, budgets.texture_max_px))
        return Limits(max_triangles=min(budgets.max_triangles, self.max_triangles or budgets.max_triangles),
                      max_bytes=self.max_bytes or budgets.max_bytes, store=self.store,
                      texture_min_px=min(self.texture_min_px, top), texture_max_px=top)


PROFILE_SPECS: dict[str, Profile] = {p.name: p for p in (
    Profile("web", simplify=True, quantize=True, summary="simplified, quantised vertex-coloured GLB"),
    Profile("ar", simplify=True, quantize=False, summary="simplified, plain vertex-coloured GLB"),
    Profile("raw", simplify=False, quantize=False, summary="the reconstructor's mesh as it came"),
    Profile("store", simplify=True, quantize=False, textured_glb=True, store=True, max_triangles=100_000,
            max_bytes=10_000_000, texture_min_px=1024, uv_charts=True,
            summary="textured PBR GLB and USDZ checked against the marketplaces' rules"),
)}
PROFILES: tuple[str, ...] = get_args(ProfileName)
assert PROFILES == tuple(PROFILE_SPECS), "every profile name has its spec"


def _power_of_two_floor(px: int) -> int:
    return 1 << (max(1, int(px)).bit_length() - 1)


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
        mesh: the mesh as exported (simplified for ``web`` / ``ar`` / ``store``), world frame, on the floor.
        textured: that mesh cut along its UV seams with its baked texture, when a format carries one.
        report: what ``result.json`` says about it (see :func:`export_asset`).
    """

    files: dict[str, bytes]
    mesh: ExportMesh
    textured: Textured | None = None
    report: dict[str, Any] = field(default_factory=dict)


def profile_spec(profile: str) -> Profile:
    """The :class:`Profile` named ``profile``.

    Raises:
        ValueError: an unknown profile.
    """
    if profile not in PROFILE_SPECS:
        raise ValueError(f"profile {profile!r}: choose one of {', '.join(PROFILES)}")
    return PROFILE_SPECS[profile]


def quantized(profile: str) -> bool:
    return profile_spec(profile).quantize


def export_asset(mesh: ExportMesh, *, profile: str = "web", formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS,
                 budgets: Budgets | None = None, splat_ply: bytes | None = None, check_usdz: bool = True,
                 extras: dict[str, Any] | None = None, on_glb: Callable[[bytes], None] | None = None) -> Asset:
    """Export ``mesh`` (already placed: metres, Y up, on the floor) in ``formats`` under ``profile``.

    ``on_glb`` is handed the GLB as soon as it is written, before the slower formats (USDZ, OBJ): a viewer can show
    it while they are made. When a file is over the byte budget the mesh is simplified further and ``on_glb`` gets
    the new GLB: the last one it gets is the asset's.

    Returns:
        The asset; its report holds ``profile``, ``formats``, ``triangles_in``, ``triangles``, ``vertices``,
        ``bytes`` (per file), ``budget`` (``max_triangles``, ``max_bytes``, ``met``, ``reasons``), ``bounds_m``
        (min / max corner), ``texture`` (``source`` baked, ``side`` px, ``charts``, ``vertices`` of the cut mesh,
        ``in``: the files that carry it; when one was baked), ``usdz_check`` (ARKit compliance, when a USDZ was
        written and checked), ``checks`` (per-rule results, ``checks.check_files``) and ``checks_passed``,
        ``skipped`` (formats asked for that this asset cannot have, and why) and ``export_s``.

    Raises:
        ValueError: an unknown profile or format.
    """
    budgets = budgets or Budgets()
    spec = profile_spec(profile)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"export format(s) {unknown}: choose from {', '.join(FORMATS)}")
    limits = spec.limits(budgets)
    t0 = time.perf_counter()
    skipped: dict[str, str] = {}
    target = limits.max_triangles if spec.simplify else mesh.triangles
    files: dict[str, bytes] = {}
    out, textured = mesh, None
    for _ in range(5):
        out = simplify(mesh, target) if target < mesh.triangles else mesh
        files, textured = _write(out, spec, formats, limits, extras, on_glb)
        reducible = {k: len(v) for k, v in files.items() if k in BUDGETED_FILES}
        biggest = max(reducible.values(), default=0)
        if not spec.simplify or biggest <= limits.max_bytes or out.triangles <= 100:
            break
        target = max(100, int(out.triangles * limits.max_bytes / biggest * 0.9))
    if "ply" in formats:
        if splat_ply is not None:
            files["object.ply"] = splat_ply
        else:
            skipped["ply"] = "this reconstructor makes no Gaussian splat"
    reasons = []
    if out.triangles > limits.max_triangles:
        reasons.append(f"{out.triangles:,} triangles > {limits.max_triangles:,}")
    reasons += [f"{name} is {len(data):,} bytes > {limits.max_bytes:,}" for name, data in sorted(files.items())
                if name in BUDGETED_FILES and len(data) > limits.max_bytes]
    report: dict[str, Any] = {
        "profile": profile,
        "formats": [f for f in formats if f not in skipped],
        "triangles_in": mesh.triangles,
        "triangles": out.triangles,
        "vertices": int(len(out.vertices)),
        "bytes": {name: len(data) for name, data in sorted(files.items())},
        "budget": {"max_triangles": limits.max_triangles, "max_bytes": limits.max_bytes, "met": not reasons,
                   "reasons": reasons},
        "bounds_m": [[round(float(v), 5) for v in row] for row in out.bounds()],
    }
    if textured is not None:
        report["texture"] = {"source": textured.source, "side": textured.side, "charts": textured.charts,
                             "vertices": int(len(textured.vertices)),
                             "in": [n for n in ("object.glb", "object.usdz", "object.obj") if n in files
                                    and (n != "object.glb" or spec.textured_glb)]}
    if skipped:
        report["skipped"] = skipped
    usdz_check = None
    if check_usdz and "object.usdz" in files:
        from sam3d_pipeline.export.usdz import arkit_check

        usdz_check = report["usdz_check"] = arkit_check(files["object.usdz"])
    report["checks"] = check_files(files, limits, usdz_check)
    report["checks_passed"] = passed(report["checks"])
    report["export_s"] = round(time.perf_counter() - t0, 3)
    return Asset(files=files, mesh=out, textured=textured, report=report)


def _write(mesh: ExportMesh, spec: Profile, formats: tuple[str, ...] | list[str], limits: Limits,
           extras: dict[str, Any] | None,
           on_glb: Callable[[bytes], None] | None = None) -> tuple[dict[str, bytes], Textured | None]:
    """The files of ``formats``; a GLB without the baked texture first, handed to ``on_glb`` before the texture
    is baked and the other formats are written."""
    wants_glb = "glb" in formats
    files: dict[str, bytes] = {}

    def glb(textured: Textured | None) -> None:
        files["object.glb"] = write_glb([Part("object", mesh, textured=textured)], quantize=spec.quantize,
                                        roughness=spec.roughness, extras={"profile": spec.name, **(extras or {})})
        if on_glb is not None:
            on_glb(files["object.glb"])

    if wants_glb and not spec.textured_glb:
        glb(None)
    textured = None
    if "usdz" in formats or "obj" in formats or (wants_glb and spec.textured_glb):
        textured = (bake(mesh, texture_side(mesh.triangles, limits.texture_min_px, limits.texture_max_px))
                    if spec.uv_charts else bake_cells(mesh, limits.texture_min_px, limits.texture_max_px))
    if wants_glb and spec.textured_glb:
        glb(textured)
    if textured is not None and "usdz" in formats:
        from sam3d_pipeline.export.usdz import write_usdz

        files["object.usdz"] = write_usdz(textured, roughness=spec.roughness)
    if textured is not None and "obj" in formats:
        from sam3d_pipeline.export.obj import write_obj

        files.update(write_obj(textured))
    return files, textured
