"""The ``store`` profile: textured PBR GLB and USDZ over real UV charts, checked against the marketplaces' rules,
glTF-Validator and USD's ARKit checker, and looking like the reconstructor's vertex-coloured mesh."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import trimesh

from sam3d_pipeline import export
from sam3d_pipeline.backends.lite_reconstructor import LiteReconstructor
from sam3d_pipeline.backends.lite_segmenter import LiteSegmenter
from sam3d_pipeline.export import checks, look
from sam3d_pipeline.export.texture import bake, texture_side
from sam3d_pipeline.images import load_image
from sam3d_pipeline.run import objects
from sam3d_pipeline.run.pipeline import RunOptions
from sam3d_pipeline.samples import SAMPLES, sample_path
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import SegmentRequest

from .photos import shapes_photo

REPO = Path(__file__).resolve().parents[1]
# Small meshes keep the tests quick (and under the triangle budget, so the asset is the reconstructor's mesh and
# the look is compared with that mesh itself); the store's own limits are unchanged.
SETTINGS = Settings(lite_mesh_resolution=56)
STORE_RULES = {"glb triangles", "glb bytes", "glb extensions", "glb vertex colours",
               "glb textured metallic-roughness primitives", "glb texture square power of two",
               "glb texture side range", "glb texture format", "usdz triangles", "usdz bytes", "usdz texture side max",
               "usdz texture square power of two", "usdz texture side range", "usdz texture format",
               "usdz ARKit compliance"}


def _validate(glb: bytes, tmp_path: Path) -> dict:
    path = tmp_path / "check.glb"
    path.write_bytes(glb)
    proc = subprocess.run(["node", "tools/gltf-validator/validate.mjs", str(path)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    return json.loads(proc.stdout)


def _export_store(rgb: np.ndarray, prompt: str, instances: str) -> tuple[objects.ObjectsExport, dict, dict]:
    seg = LiteSegmenter(SETTINGS).segment(rgb, SegmentRequest(prompt))
    selected = int(np.argmax([i.score for i in seg.instances]))
    chosen = objects.choose(seg.instances, objects.parse_instances(instances), selected)
    rec = LiteReconstructor(SETTINGS)
    recons = {i: rec.reconstruct(rgb, seg.instances[i].mask) for i in chosen}
    out = objects.export_objects(seg.instances, recons, selected, (rgb.shape[1], rgb.shape[0]), profile="store",
                                 formats=["glb", "usdz"], settings=SETTINGS)
    where = objects.placements(seg.instances, recons, (rgb.shape[1], rgb.shape[0]), SETTINGS)
    placed = {}
    for i, recon in recons.items():
        raw = export.ExportMesh.from_trimesh(recon.mesh)
        placed[i] = raw.with_vertices(export.asset_vertices(raw.vertices, where[i]))
    return out, recons, placed


def _assert_store_ready(out: objects.ObjectsExport, placed: dict, tmp_path: Path) -> None:
    for obj in out.objects:
        report, i = obj["export"], obj["index"]
        assert {c["rule"] for c in report["checks"]} == STORE_RULES
        assert report["checks_passed"] and all(c["pass"] for c in report["checks"]), report["checks"]
        assert report["usdz_check"]["passed"], report["usdz_check"]
        assert report["texture"]["source"] == "vertex-colours"
        glb = out.files[f"objects/{i}/object.glb"]
        validation = _validate(glb, tmp_path)
        assert validation["issues"]["numErrors"] == 0, validation["issues"]
        gltf, _ = export.gltf.unpack(glb)
        assert "extensionsUsed" not in gltf
        assert all("COLOR_0" not in p["attributes"] for m in gltf["meshes"] for p in m["primitives"])
        assert gltf["materials"][0]["pbrMetallicRoughness"]["metallicFactor"] == 0.0
        [textured] = export.read_textured_glb(glb)
        side = textured.image.shape[0]
        assert textured.image.shape == (side, side, 3) and side in (1024, 2048)
        assert len(textured.vertices) < 1.5 * textured.triangles  # real charts: vertices split only on seams
        # The textured GLB, read back, looks like the reconstructor's vertex-coloured mesh.
        assert report["triangles"] == report["triangles_in"] == placed[i].triangles
        measure = look.compare(placed[i], textured)
        assert measure["silhouette_iou"] >= 0.99 and measure["mean_abs_rgb"] <= 4.0, measure
    scene = _validate(out.files["scene.glb"], tmp_path)
    assert scene["issues"]["numErrors"] == 0, scene["issues"]


def test_store_assets_of_the_demo_photo_pass_the_stores_rules(tmp_path):
    path = sample_path("coffee")
    rgb = load_image(path.read_bytes(), source=str(path), max_pixels=SETTINGS.max_pixels).rgb
    out, _, placed = _export_store(rgb, SAMPLES["coffee"][1], "best")
    assert len(out.objects) == 1
    _assert_store_ready(out, placed, tmp_path)


def test_store_assets_of_a_photo_of_several_objects_pass_the_stores_rules(tmp_path):
    rgb, masks = shapes_photo(0)
    out, _, placed = _export_store(rgb, "shapes", "all")
    assert len(out.objects) == len(masks) == 3
    _assert_store_ready(out, placed, tmp_path)


def _sphere(colour_of) -> export.ExportMesh:
    ball = trimesh.creation.icosphere(subdivisions=4, radius=0.2)
    v = np.asarray(ball.vertices)
    return export.ExportMesh(v + [0, 0.2, 0], np.asarray(ball.faces, np.int64), colour_of(v).astype(np.uint8))


def test_the_bake_fills_the_gaps_between_charts_with_their_own_colours():
    gradient = _sphere(lambda v: np.stack([60 + 400 * (v[:, 0] + 0.2), 60 + 400 * (v[:, 1] + 0.2),
                                           np.full(len(v), 90.0)], 1).clip(0, 255))
    baked = bake(gradient, 512)
    assert baked.image.shape == (512, 512, 3) and baked.charts >= 1
    assert len(baked.vertices) < 1.5 * baked.triangles
    assert baked.image.min() >= 55  # no texel left black between the charts: every gap holds a chart's colour
    # A coarse mip level (8x8 texel blocks) stays within the mesh's colours: no bleeding from outside.
    coarse = baked.image.reshape(64, 8, 64, 8, 3).mean((1, 3))
    assert coarse[..., 2].min() >= 89 and coarse[..., 2].max() <= 91
    measure = look.compare(gradient, baked)
    assert measure["silhouette_iou"] >= 0.99 and measure["mean_abs_rgb"] <= 4.0, measure


def test_the_look_measure_samples_the_texture_through_the_uvs():
    two_tone = _sphere(lambda v: np.where(v[:, :1] > 0, [220, 40, 40], [40, 40, 220]))
    baked = bake(two_tone, 256)
    assert look.compare(two_tone, baked)["mean_abs_rgb"] <= 4.0
    flipped = export.Textured(**{**baked.__dict__, "uv": np.stack([baked.uv[:, 0], 1 - baked.uv[:, 1]], 1)})
    assert look.compare(two_tone, flipped)["mean_abs_rgb"] > 20  # a wrong texture lookup is seen


def test_store_checks_fail_what_the_stores_refuse():
    mesh = _sphere(lambda v: np.full((len(v), 3), 150))
    limits = export.profile_spec("store").limits(export.Budgets())
    web = export.export_asset(mesh, profile="web", formats=["glb"])
    failed = {c["rule"] for c in checks.check_files(web.files, limits) if not c["pass"]}
    assert failed == {"glb extensions", "glb vertex colours", "glb textured metallic-roughness primitives",
                      "glb textures"}
    odd = bake(mesh, 1024)
    odd.image = odd.image[:1000, :1000]  # not a power of two, and smaller than the store's minimum
    glb = export.write_glb([export.Part("object", mesh, textured=odd)], quantize=False)
    failed = {c["rule"] for c in checks.check_files({"object.glb": glb}, limits) if not c["pass"]}
    assert failed == {"glb texture square power of two", "glb texture side range"}
    big = checks.check_files({"object.glb": glb}, checks.Limits(max_triangles=100, max_bytes=1000, store=True))
    assert {c["rule"] for c in big if not c["pass"]} >= {"glb triangles", "glb bytes"}


def test_texture_side_follows_the_triangles_within_the_profiles_range():
    assert texture_side(100, 1024, 2048) == 1024
    assert texture_side(100_000, 1024, 2048) == 2048
    assert texture_side(100_000, 256, 4096) == 2048  # 32 texels a triangle
    assert texture_side(10**7, 256, 4096) == 4096
    with pytest.raises(ValueError, match="power of two"):
        texture_side(10, 1000, 2048)
    with pytest.raises(ValueError, match="min_px"):
        texture_side(10, 2048, 1024)
    limits = export.profile_spec("store").limits(export.Budgets(texture_max_px=8192))
    assert (limits.texture_min_px, limits.texture_max_px, limits.max_bytes) == (1024, 4096, 10_000_000)


def test_store_is_a_profile_of_runs_and_unknown_profiles_are_refused():
    assert RunOptions(prompt="cup", profile="store").profile == "store"
    assert export.PROFILES == ("web", "ar", "raw", "store")
    with pytest.raises(ValueError, match="choose one of web, ar, raw, store"):
        export.export_asset(_sphere(lambda v: np.full((len(v), 3), 150)), profile="shop")
