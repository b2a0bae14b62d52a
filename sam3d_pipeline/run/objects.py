"""Several objects per photo: which instances become objects, reconstructing them together, and every object's
asset files plus the ``scene.glb`` that holds them all.

``instances``: ``best`` (the selected instance only), ``all`` (every instance found) or a list of instance
indices. Each object gets ``objects/<index>/`` (``keys.object_file``); the selected one is also the
``object.glb`` at the prefix root, as consumers of one-object runs expect.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sam3d_pipeline import export
from sam3d_pipeline.errors import InputError
from sam3d_pipeline.gpu import stages as gpu_stages
from sam3d_pipeline.keys import SCENE_FILE, object_file
from sam3d_pipeline.masks import InstancesSpec, choose_objects, mask_to_png, primary_object
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import Instance, Reconstruction


def parse_instances(text: str) -> InstancesSpec:
    """``best``, ``all`` or comma-separated indices (``0,2``) → the ``instances`` option.

    Raises:
        InputError: anything else, or a negative index.
    """
    value = text.strip().lower()
    if value in ("best", "all"):
        return value  # type: ignore[return-value]
    try:
        indices = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"instances {text!r}: use best, all or indices like 0,2") from None
    if not indices or min(indices) < 0:
        raise InputError(f"instances {text!r}: use best, all or indices >= 0 like 0,2")
    return sorted(set(indices))


def parse_formats(text: str) -> list[str]:
    """``glb,usdz`` → ``["glb", "usdz"]`` (checked against ``export.FORMATS``).

    Raises:
        InputError: an unknown or no format.
    """
    formats = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [f for f in formats if f not in export.FORMATS]
    if not formats or unknown:
        raise InputError(f"export formats {text!r}: choose from {','.join(export.FORMATS)}")
    return list(dict.fromkeys(formats))


# Which instances become objects is the segmentation's decision (``masks``); a run's steps call it by these names.
choose = choose_objects
primary_of = primary_object


def reconstruct_together(photo: Any, masks: dict[int, np.ndarray], seed: int, photo_id: str, reconstructor: str,
                         settings: Settings) -> tuple[dict[int, Reconstruction], dict[str, float]]:
    """Reconstruct a photo's objects in one call (one model load, one point map for the photo)."""
    order = list(masks)
    recons, timing = gpu_stages.reconstruct_masks([(photo, masks[i], seed, photo_id) for i in order],
                                                  reconstructor, settings)
    return dict(zip(order, recons, strict=True)), timing


@dataclass
class ObjectsExport:
    """Every object's files (keys relative to the prefix), their reports and the scene's."""

    files: dict[str, bytes] = field(default_factory=dict)
    objects: list[dict[str, Any]] = field(default_factory=list)
    scene: dict[str, Any] | None = None
    export: dict[str, Any] = field(default_factory=dict)


def placements(instances: list[Instance], recons: dict[int, Reconstruction], image_size: tuple[int, int],
               settings: Settings) -> dict[int, export.Placement]:
    """Where each object goes: by its reconstructor's pose, else by its box in the photo (see ``export.frame``)."""
    if all(recons[i].pose is not None for i in recons):
        return {i: export.pose_placement(recons[i].pose) for i in recons}
    reference = max(max(b[2] - b[0], b[3] - b[1]) for b in (instances[i].box for i in recons))
    out = {}
    for i, recon in recons.items():
        extent = float(np.max(np.ptp(np.asarray(recon.mesh.vertices), axis=0)))
        out[i] = export.image_placement(instances[i].box, image_size, reference, settings.export_default_size_m,
                                        mesh_size=1.0 if recon.backend.name == "lite" else extent)
    return out


def export_objects(instances: list[Instance], recons: dict[int, Reconstruction], primary: int,
                   image_size: tuple[int, int], *, profile: str, formats: list[str], settings: Settings,
                   extras: dict[str, Any] | None = None,
                   early: Callable[[dict[str, bytes]], None] | None = None) -> ObjectsExport:
    """Export every reconstructed object under ``profile`` in ``formats``, and the scene of all of them.

    ``early`` is handed the root ``object.glb`` as soon as the ``primary`` object's GLB is written (again if the
    byte budget makes it simplify further), before that object's slower formats and the other objects.

    Returns:
        Files ``objects/<i>/...``, ``scene.glb`` and the root ``object.glb`` (the ``primary`` object's GLB);
        one report per object (``result.json``'s ``objects``) and the scene's.
    """
    budgets = export.Budgets(max_triangles=settings.export_max_triangles, max_bytes=settings.export_max_bytes,
                             texture_max_px=settings.export_texture_max_px)
    where = placements(instances, recons, image_size, settings)
    out = ObjectsExport(export={"profile": profile, "formats": list(formats),
                                "max_triangles": budgets.max_triangles, "max_bytes": budgets.max_bytes})
    textured_glb = export.profile_spec(profile).textured_glb
    parts: list[tuple[int, export.Part]] = []
    for i in sorted(recons):
        recon, placement = recons[i], where[i]
        raw = export.ExportMesh.from_trimesh(recon.mesh)
        linear = placement.matrix.copy()
        linear[:3, 3] = 0.0
        asset_v, offset = export.on_floor(export.transform_points(linear, raw.vertices))
        asset = export.export_asset(raw.with_vertices(asset_v), profile=profile, formats=formats, budgets=budgets,
                                    splat_ply=recon.splat_ply, check_usdz=settings.export_check_usdz,
                                    extras={"object": i, **(extras or {})},
                                    on_glb=(lambda glb: early({"object.glb": glb})) if early and i == primary else None)
        for name, data in asset.files.items():
            out.files[object_file(i, name)] = data
        out.files[object_file(i, "mask.png")] = mask_to_png(instances[i].mask)
        part = export.Part("object", asset.mesh, textured=asset.textured if textured_glb else None)
        if i == primary:
            out.files["object.glb"] = asset.files.get("object.glb") or export.write_glb(
                [part], quantize=export.quantized(profile), extras=extras)
        # The asset sits on the floor at the origin; in the scene it goes back where the placement put it.
        part.translation = tuple(float(v) for v in placement.matrix[:3, 3] - offset)
        parts.append((i, part))
        out.objects.append(instances[i].summary(i) | {
            "selected": i == primary,
            "pose": recon.pose,
            "units": placement.units,
            "scale_source": placement.scale_source,
            "size_m": [round(float(v), 4) for v in np.ptp(asset.mesh.vertices, axis=0)],
            "mesh": recon.stats,
            "export": asset.report,
        })
    out.scene = _scene(parts, where, profile, extras, out.files)
    return out


def _scene(parts: list[tuple[int, export.Part]], where: dict[int, export.Placement],
           profile: str, extras: dict[str, Any] | None, files: dict[str, bytes]) -> dict[str, Any]:
    t = time.perf_counter()
    lo = np.min([p.mesh.vertices.min(0) + p.translation for _, p in parts], axis=0)
    hi = np.max([p.mesh.vertices.max(0) + p.translation for _, p in parts], axis=0)
    shift = np.array([-(lo[0] + hi[0]) / 2, -lo[1], -(lo[2] + hi[2]) / 2])
    layout = where[parts[0][0]].layout
    placed = [(i, export.Part(f"object-{i}", p.mesh, tuple(float(v) for v in p.translation + shift), p.textured))
              for i, p in parts]
    glb = export.write_glb([p for _, p in placed], quantize=export.quantized(profile), roughness=export.profile_spec(
        profile).roughness, extras={"layout": layout, **(extras or {})})
    files[SCENE_FILE] = glb
    note = ("objects placed by the reconstructor's pose (the photo's camera frame)" if layout == "reconstructor-pose"
            else "objects side by side at their image positions: this reconstructor gives no pose")
    return {"layout": layout, "note": note, "objects": [i for i, _ in placed],
            "positions_m": {str(i): [round(v, 4) for v in p.translation] for i, p in placed},
            "triangles": int(sum(p.mesh.triangles for _, p in placed)), "bytes": len(glb),
            "export_s": round(time.perf_counter() - t, 3)}
