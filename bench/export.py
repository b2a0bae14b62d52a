"""Exported assets on the test photos, per profile: bytes, triangles, vertices, texture size, export seconds, and
the look.

Photos: the demo photo (scikit-image's coffee, 600x400) and the other sample photos shipped with scikit-image
(chelsea, rocket), each segmented and reconstructed with the lite backends at their default settings, plus a
synthetic photo of three separate discs (``three``, box prompts) and one of five flat shapes on a plain
background (``shapes``, ``instances=all``). Per asset and profile (raw, web, ar, store) in glb + usdz: bytes of
each file, triangles, vertices of the GLB (of the cut mesh when it is textured), texture side, export seconds
(including USD's ARKit check and the per-rule checks), whether every check passed, glTF-Validator errors of the
GLB, and how the GLB read back looks next to the raw vertex-coloured mesh (silhouette IoU and mean |ΔRGB| over
the object's pixels, worst of three views: ``export.look``).
Usage: python bench/export.py [--photos coffee chelsea rocket three shapes] [--profiles raw web ar store]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FORMATS = ["glb", "usdz"]


def photo_objects(name: str):
    """``(label, rgb, instances, recons)`` for one test photo, lite backends."""
    import numpy as np

    from sam3d_pipeline.backends.lite_reconstructor import LiteReconstructor
    from sam3d_pipeline.backends.lite_segmenter import LiteSegmenter
    from sam3d_pipeline.images import load_image
    from sam3d_pipeline.samples import SAMPLES, sample_path
    from sam3d_pipeline.settings import Settings
    from sam3d_pipeline.types import Box, SegmentRequest

    settings = Settings()
    if name == "shapes":
        from tests.photos import shapes_photo

        rgb, _ = shapes_photo(2)
        request = SegmentRequest(prompt="shapes")
    elif name == "three":
        from tests.photos import three_objects_photo

        rgb, _, boxes = three_objects_photo()
        request = SegmentRequest(prompt="discs", boxes=tuple(Box(*map(float, b)) for b in boxes))
    else:
        path = sample_path(name)
        rgb = load_image(path.read_bytes(), source=str(path), max_pixels=settings.max_pixels).rgb
        request = SegmentRequest(prompt=SAMPLES[name][1])
    seg = LiteSegmenter(settings).segment(rgb, request)
    several = name in ("three", "shapes")
    indices = list(range(len(seg.instances))) if several else [int(np.argmax([i.score for i in seg.instances]))]
    rec = LiteReconstructor(settings)
    return name, rgb, seg.instances, {i: rec.reconstruct(rgb, seg.instances[i].mask) for i in indices}


def validator_errors(glb: bytes) -> int:
    with tempfile.NamedTemporaryFile(suffix=".glb") as fh:
        fh.write(glb)
        fh.flush()
        proc = subprocess.run(["node", "tools/gltf-validator/validate.mjs", fh.name], capture_output=True, text=True,
                              cwd=ROOT)
    return int(json.loads(proc.stdout)["issues"]["numErrors"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photos", nargs="+", default=["coffee", "chelsea", "rocket", "three", "shapes"])
    parser.add_argument("--profiles", nargs="+", default=["raw", "web", "ar", "store"])
    args = parser.parse_args()
    import numpy as np

    from sam3d_pipeline import export
    from sam3d_pipeline.export import look
    from sam3d_pipeline.run import objects
    from sam3d_pipeline.settings import Settings

    settings = Settings()
    budgets = export.Budgets(settings.export_max_triangles, settings.export_max_bytes, settings.export_texture_max_px)
    figures = []
    for name in args.photos:
        label, rgb, instances, recons = photo_objects(name)
        where = objects.placements(instances, recons, (rgb.shape[1], rgb.shape[0]), settings)
        for i, recon in recons.items():
            raw_mesh = export.ExportMesh.from_trimesh(recon.mesh)
            placed = raw_mesh.with_vertices(export.asset_vertices(raw_mesh.vertices, where[i]))
            for profile in args.profiles:
                t = time.perf_counter()
                asset = export.export_asset(placed, profile=profile, formats=FORMATS, budgets=budgets)
                seconds = time.perf_counter() - t
                glb = asset.files["object.glb"]
                if export.profile_spec(profile).textured_glb:
                    [back] = export.read_textured_glb(glb)
                    vertices = len(back.vertices)
                else:
                    _, [back] = export.read_glb(glb)
                    vertices = len(back.vertices)
                measure = look.compare(placed, back)
                figures.append({
                    "photo": label, "object": i, "profile": profile, "triangles": asset.report["triangles"],
                    "vertices": vertices, "bytes": asset.report["bytes"],
                    "texture_px": asset.report.get("texture", {}).get("side"),
                    "texture_source": asset.report.get("texture", {}).get("source"),
                    "export_s": round(seconds, 2), "checks_passed": asset.report["checks_passed"],
                    "failed": [c["rule"] for c in asset.report["checks"] if not c["pass"]],
                    "validator_errors": validator_errors(glb), "min_y": float(back.vertices[:, 1].min()),
                    "look": {k: measure[k] for k in ("silhouette_iou", "mean_abs_rgb")},
                    "size_m": [round(float(v), 3) for v in np.ptp(placed.vertices, 0)],
                })
    print("| photo#object | profile | GLB bytes | USDZ bytes | triangles | GLB vertices | texture px | export s | "
          "checks | validator errors | silhouette IoU | mean abs RGB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for f in figures:
        checks = "pass" if f["checks_passed"] else "FAIL " + ", ".join(f["failed"])
        print(f"| {f['photo']}#{f['object']} | {f['profile']} | {f['bytes']['object.glb'] / 1e6:.2f} MB | "
              f"{f['bytes']['object.usdz'] / 1e6:.2f} MB | {f['triangles']:,} | {f['vertices']:,} | "
              f"{f['texture_px'] or '-'} | {f['export_s']} | {checks} | {f['validator_errors']} | "
              f"{f['look']['silhouette_iou']:.3f} | {f['look']['mean_abs_rgb']:.1f} |")
    print("BENCH_JSON " + json.dumps({"assets": figures}))


if __name__ == "__main__":
    main()
