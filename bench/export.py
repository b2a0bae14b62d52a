"""Exported assets on the test photos: bytes and triangles per format, raw vs web, export time, and the look.

Photos: the demo photo (scikit-image's coffee, 600x400) and the other sample photos shipped with scikit-image
(chelsea, rocket), each segmented and reconstructed with the lite backends at their default settings, plus a
synthetic photo of three separate discs (``instances=all``). Per asset: the raw and web exports in glb, usdz and
obj (bytes, triangles, export seconds), glTF-Validator errors of the web GLB, USD's ARKit check of the web USDZ,
the lowest point (must be Y = 0), and how the web GLB's render compares with the raw mesh's (silhouette IoU and
mean |ΔRGB| over the object's pixels, worst of three views: ``export.look``).
Usage: python bench/export.py [--photos coffee chelsea rocket three]
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

FORMATS = ["glb", "usdz", "obj"]


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
    if name == "three":
        from tests.photos import three_objects_photo

        rgb, _, boxes = three_objects_photo()
        request = SegmentRequest(prompt="discs", boxes=tuple(Box(*map(float, b)) for b in boxes))
    else:
        path = sample_path(name)
        rgb = load_image(path.read_bytes(), source=str(path), max_pixels=settings.max_pixels).rgb
        request = SegmentRequest(prompt=SAMPLES[name][1])
    seg = LiteSegmenter(settings).segment(rgb, request)
    indices = list(range(len(seg.instances))) if name == "three" else [int(np.argmax([i.score for i in seg.instances]))]
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
    parser.add_argument("--photos", nargs="+", default=["coffee", "chelsea", "rocket", "three"])
    args = parser.parse_args()
    import numpy as np

    from sam3d_pipeline import export
    from sam3d_pipeline.export import look
    from sam3d_pipeline.run import objects
    from sam3d_pipeline.settings import Settings

    settings = Settings()
    budgets = export.Budgets(settings.export_max_triangles, settings.export_max_bytes, settings.export_texture_max_px)
    rows, figures = [], []
    for name in args.photos:
        label, rgb, instances, recons = photo_objects(name)
        where = objects.placements(instances, recons, (rgb.shape[1], rgb.shape[0]), settings)
        for i, recon in recons.items():
            raw_mesh = export.ExportMesh.from_trimesh(recon.mesh)
            placed = raw_mesh.with_vertices(export.asset_vertices(raw_mesh.vertices, where[i]))
            out = {}
            for profile in ("raw", "web"):
                t = time.perf_counter()
                asset = export.export_asset(placed, profile=profile, formats=FORMATS, budgets=budgets)
                out[profile] = (asset, time.perf_counter() - t)
            web, web_s = out["web"]
            raw, raw_s = out["raw"]
            _, [back] = export.read_glb(web.files["object.glb"])
            t = time.perf_counter()
            measure = look.compare(placed, back)
            look_s = time.perf_counter() - t
            fig = {
                "photo": label, "object": i, "triangles_raw": raw.report["triangles"],
                "triangles_web": web.report["triangles"],
                "bytes_raw": raw.report["bytes"], "bytes_web": web.report["bytes"],
                "export_s_raw": round(raw_s, 2), "export_s_web": round(web_s, 2),
                "web_budget_met": web.report["budget"]["met"], "validator_errors_web": validator_errors(
                    web.files["object.glb"]), "usdz_arkit_passed_web": web.report["usdz_check"]["passed"],
                "min_y_web": float(back.vertices[:, 1].min()), "look": {k: measure[k] for k in
                                                                      ("silhouette_iou", "mean_abs_rgb")},
                "look_s": round(look_s, 2), "size_m": [round(float(v), 3) for v in np.ptp(placed.vertices, 0)],
            }
            figures.append(fig)
            for fmt, key in (("glb", "object.glb"), ("usdz", "object.usdz"), ("obj", "object.obj")):
                extra = " (+ mtl, texture.png)" if fmt == "obj" else ""
                rows.append(f"| {label}#{i} | {fmt}{extra} | {raw.report['triangles']:,} | "
                            f"{raw.report['bytes'][key] / 1e6:.2f} MB | {web.report['triangles']:,} | "
                            f"{web.report['bytes'][key] / 1e6:.2f} MB |")
    print("| photo#object | format | raw triangles | raw bytes | web triangles | web bytes |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("| photo#object | export s raw / web (glb+usdz+obj, ARKit check) | validator errors | ARKit | "
          "min Y | silhouette IoU | mean abs RGB | size m |")
    print("|---|---|---|---|---|---|---|---|")
    for f in figures:
        print(f"| {f['photo']}#{f['object']} | {f['export_s_raw']} / {f['export_s_web']} | "
              f"{f['validator_errors_web']} | {'pass' if f['usdz_arkit_passed_web'] else 'FAIL'} | "
              f"{f['min_y_web']:.1e} | {f['look']['silhouette_iou']:.3f} | {f['look']['mean_abs_rgb']:.1f} | "
              f"{f['size_m']} |")
    print("BENCH_JSON " + json.dumps({"assets": figures}))


if __name__ == "__main__":
    main()
