"""Exported assets: budgets, GLB (glTF-Validator, model-viewer), USDZ (ARKit check), OBJ, floor, scale, scenes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from sam3d_pipeline import export
from sam3d_pipeline.backends.lite_reconstructor import LiteReconstructor
from sam3d_pipeline.errors import InputError
from sam3d_pipeline.export import look
from sam3d_pipeline.export.frame import GLB_TO_OBJECT, quaternion_matrix
from sam3d_pipeline.export.usdz import arkit_check
from sam3d_pipeline.run import objects
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import BackendInfo, Instance, Reconstruction

from .photos import object_photo, three_objects_photo
from .servers import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SMALL = export.Budgets(max_triangles=3_000, max_bytes=400_000, texture_max_px=1024)


@pytest.fixture(scope="module")
def placed():
    """A lite reconstruction of the test ellipse (~10k triangles), placed on the floor (0.5 m long side)."""
    rgb, mask = object_photo()
    recon = LiteReconstructor(Settings(lite_mesh_resolution=64)).reconstruct(rgb, mask)
    mesh = export.ExportMesh.from_trimesh(recon.mesh)
    where = export.image_placement((0, 0, 10, 10), (20, 20), 10, 0.5)
    return mesh.with_vertices(export.asset_vertices(mesh.vertices, where))


def _validate(path: Path) -> dict:
    proc = subprocess.run(["node", "tools/gltf-validator/validate.mjs", str(path)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    return json.loads(proc.stdout)


def test_web_glb_meets_budgets_validates_and_keeps_the_look(placed, tmp_path):
    assert placed.triangles > SMALL.max_triangles  # the budget has work to do
    web = export.export_asset(placed, profile="web", formats=["glb"], budgets=SMALL)
    ar = export.export_asset(placed, profile="ar", formats=["glb"], budgets=SMALL)
    glb = web.files["object.glb"]
    assert web.report["triangles"] <= SMALL.max_triangles and len(glb) <= SMALL.max_bytes
    assert web.report["budget"] == {"max_triangles": 3000, "max_bytes": 400_000, "met": True, "reasons": []}
    assert len(glb) < 0.8 * len(ar.files["object.glb"])  # quantised attributes are smaller than floats
    (tmp_path / "web.glb").write_bytes(glb)
    report = _validate(tmp_path / "web.glb")
    assert report["issues"]["numErrors"] == 0, report["issues"]
    assert report["info"]["totalTriangleCount"] == web.report["triangles"]
    gltf, [back] = export.read_glb(glb)
    assert gltf["extensionsRequired"] == ["KHR_mesh_quantization"]
    assert np.allclose(back.bounds(), web.mesh.bounds(), atol=1e-4)  # dequantised within 0.1 mm
    assert abs(back.vertices[:, 1].min()) < 1e-9  # still resting exactly on the floor
    measure = look.compare(placed, back)
    assert measure["silhouette_iou"] >= 0.97 and measure["mean_abs_rgb"] <= 12.0, measure


def test_look_measure_sees_a_changed_colour_and_shape(placed):
    recoloured = export.ExportMesh(placed.vertices, placed.faces, np.full_like(placed.colours, 30))
    assert look.compare(placed, recoloured)["mean_abs_rgb"] > 25
    squashed = placed.with_vertices(placed.vertices * [1.0, 0.5, 1.0])
    assert look.compare(placed, squashed)["silhouette_iou"] < 0.8


def test_raw_keeps_the_mesh_and_reports_what_is_over_budget(placed):
    raw = export.export_asset(placed, profile="raw", formats=["glb"], budgets=export.Budgets(max_triangles=1000,
                                                                                            max_bytes=20_000))
    assert raw.report["triangles"] == placed.triangles
    assert raw.report["budget"]["met"] is False
    assert any("triangles >" in r for r in raw.report["budget"]["reasons"])
    assert any(r.startswith("object.glb is") for r in raw.report["budget"]["reasons"])


def test_usdz_passes_the_arkit_check_and_obj_loads_with_its_texture(placed, tmp_path):
    asset = export.export_asset(placed, profile="web", formats=["usdz", "obj", "ply"], budgets=SMALL)
    assert "object.glb" not in asset.files and asset.report["skipped"] == {"ply": "this reconstructor makes no "
                                                                                  "Gaussian splat"}
    check = asset.report["usdz_check"]
    assert check["passed"] and check["errors"] == [] and check["failed_checks"] == [], check
    assert len(asset.files["object.usdz"]) <= SMALL.max_bytes
    for name, data in asset.files.items():
        (tmp_path / name).write_bytes(data)
    from pxr import Usd, UsdGeom

    stage = Usd.Stage.Open(str(tmp_path / "object.usdz"))
    assert UsdGeom.GetStageUpAxis(stage) == "Y" and UsdGeom.GetStageMetersPerUnit(stage) == 1.0
    points = np.asarray(UsdGeom.Mesh(stage.GetPrimAtPath("/Object/Mesh")).GetPointsAttr().Get())
    assert abs(points[:, 1].min()) < 1e-6
    loaded = trimesh.load(tmp_path / "object.obj", process=False)
    assert loaded.visual.kind == "texture" and loaded.visual.material.image is not None
    colours = np.asarray(loaded.visual.to_color().vertex_colors)[:, :3].astype(float)
    assert colours[:, 0].mean() > colours[:, 1].mean() + 60  # the red ellipse stays red
    assert abs(loaded.bounds[0][1]) < 1e-5


def test_arkit_check_reports_a_package_that_fails():
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # compressed entries and a text root layer: both refused by ARKit
        zf.writestr("object.usda", "#usda 1.0\ndef Xform \"Object\" {}\n", compress_type=zipfile.ZIP_DEFLATED)
    assert arkit_check(buf.getvalue())["passed"] is False


def test_assets_rest_on_the_floor_centred_in_metres(placed):
    lo, hi = placed.bounds()
    assert lo[1] == pytest.approx(0.0, abs=1e-9)
    assert (lo[0] + hi[0]) / 2 == pytest.approx(0.0, abs=1e-9) and (lo[2] + hi[2]) / 2 == pytest.approx(0, abs=1e-9)
    assert max(hi - lo) == pytest.approx(0.5, rel=0.05)  # the default size of the photo's largest object


def test_pose_placement_follows_the_documented_conventions():
    rng = np.random.default_rng(3)
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    pose = {"rotation": list(q), "translation": [0.2, -0.1, 2.0], "scale": [0.3, 0.3, 0.3]}
    where = export.pose_placement(pose)
    assert where.scale_source == "sam3d-pose" and where.layout == "reconstructor-pose"
    glb_points = rng.normal(size=(5, 3))
    expected = ((glb_points @ GLB_TO_OBJECT) * 0.3 @ quaternion_matrix(q) + [0.2, -0.1, 2.0]) * [-1, 1, -1]
    assert np.allclose(export.transform_points(where.matrix, glb_points), expected)
    # The asset keeps the metric size: a unit cube scaled by 0.3 is 0.3 m along its rotated diagonal span.
    cube = trimesh.creation.box(extents=(1, 1, 1))
    placed_cube = export.asset_vertices(cube.vertices, where)
    assert np.linalg.norm(placed_cube[0] - placed_cube[7]) == pytest.approx(0.3 * np.sqrt(3))
    assert placed_cube[:, 1].min() == pytest.approx(0.0)


def _lite_objects():
    rgb, masks, boxes = three_objects_photo()
    rec = LiteReconstructor(Settings(lite_mesh_resolution=40))
    instances = [Instance(mask=m, box=tuple(float(v) for v in b), score=0.9 - 0.1 * i)
                 for i, (m, b) in enumerate(zip(masks, boxes, strict=True))]
    recons = {i: rec.reconstruct(rgb, m) for i, m in enumerate(masks)}
    return rgb, instances, recons


def test_three_objects_give_three_assets_and_a_scene_side_by_side():
    rgb, instances, recons = _lite_objects()
    settings = Settings(export_max_triangles=2000, export_check_usdz=False)
    out = objects.export_objects(instances, recons, 1, (rgb.shape[1], rgb.shape[0]), profile="web",
                                 formats=["glb"], settings=settings)
    assert {f"objects/{i}/object.glb" for i in range(3)} <= set(out.files)
    assert {f"objects/{i}/mask.png" for i in range(3)} <= set(out.files)
    assert out.files["object.glb"] == out.files["objects/1/object.glb"]  # the selected object at the root
    assert [o["index"] for o in out.objects] == [0, 1, 2] and [o["selected"] for o in out.objects] == [0, 1, 0]
    sizes = [max(o["size_m"]) for o in out.objects]
    assert sizes[0] == pytest.approx(0.5, rel=0.05) and sizes[0] > sizes[1] > sizes[2]  # relative sizes kept
    assert {o["scale_source"] for o in out.objects} == {"default"}
    gltf, meshes = export.read_glb(out.files["scene.glb"])
    assert len(meshes) == 3 and gltf["scenes"][0]["extras"]["layout"] == "image-positions"
    assert out.scene["layout"] == "image-positions" and "no pose" in out.scene["note"]
    centres = [m.vertices.mean(0) for m in meshes]
    assert centres[0][0] < centres[1][0] < centres[2][0]  # left to right, as in the photo
    assert min(np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1:]) > 0.1
    assert min(m.vertices[:, 1].min() for m in meshes) == pytest.approx(0.0, abs=1e-4)  # the scene's floor


def test_scene_uses_the_reconstructors_pose_when_there_is_one():
    rgb, instances, recons = _lite_objects()
    for i, recon in recons.items():
        recons[i] = Reconstruction(mesh=recon.mesh, backend=BackendInfo("sam3d", "x"), pose={
            "rotation": [1.0, 0.0, 0.0, 0.0], "translation": [-0.5 * i, 0.0, 2.0], "scale": [0.2, 0.2, 0.2]})
    out = objects.export_objects(instances, recons, 0, (rgb.shape[1], rgb.shape[0]), profile="ar",
                                 formats=["glb"], settings=Settings(export_check_usdz=False))
    assert out.scene["layout"] == "reconstructor-pose"
    assert {o["scale_source"] for o in out.objects} == {"sam3d-pose"}
    _, meshes = export.read_glb(out.files["scene.glb"])
    xs = [m.vertices.mean(0)[0] for m in meshes]
    assert xs[1] - xs[0] == pytest.approx(0.5, abs=0.02) and xs[2] - xs[1] == pytest.approx(0.5, abs=0.02)


def test_instances_option_parsing_and_choice():
    assert objects.parse_instances("best") == "best" and objects.parse_instances(" ALL ") == "all"
    assert objects.parse_instances("2,0,2") == [0, 2]
    for bad in ("", "x", "-1", "1,,b"):
        with pytest.raises(InputError):
            objects.parse_instances(bad)
    assert objects.parse_formats("glb, OBJ,glb") == ["glb", "obj"]
    with pytest.raises(InputError):
        objects.parse_formats("glb,fbx")
    found = [Instance(np.ones((2, 2), bool), (0, 0, 1, 1), s) for s in (0.9, 0.8, 0.7)]
    assert objects.choose(found, "best", 1) == [1]
    assert objects.choose(found, "all", 1) == [1, 0, 2]
    assert objects.choose(found, [2, 0], 2) == [2, 0]
    assert objects.choose([], "all", None) == []
    with pytest.raises(InputError, match="out of range"):
        objects.choose(found, [0, 5], 0)
    assert objects.primary_of([2, 0], 0, None) == 2 and objects.primary_of([2, 0], 0, 0) == 0


MODEL_VIEWER_PAGE = """<!doctype html><html><head>
<script type="module" src="model-viewer.min.js"></script></head><body>
<model-viewer id="v" src="web.glb" ar ios-src="object.usdz" style="width:400px;height:300px"></model-viewer>
<script>
window.result = new Promise((resolve) => {
  const v = document.getElementById('v');
  v.addEventListener('load', () => resolve({event: 'load'}));
  v.addEventListener('error', (e) => resolve({event: 'error', detail: String(e.detail && e.detail.type)}));
});
</script></body></html>"""


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is installed by `make test`")
def test_web_glb_loads_in_model_viewer_in_chromium(placed, tmp_path):
    from playwright.sync_api import sync_playwright

    from sam3d_pipeline.gallery import viewer_script_path

    script = viewer_script_path()
    if script is None:
        pytest.skip("model-viewer is installed by `make install` (npm)")
    asset = export.export_asset(placed, profile="web", formats=["glb", "usdz"], budgets=SMALL, check_usdz=False)
    (tmp_path / "web.glb").write_bytes(asset.files["object.glb"])
    (tmp_path / "object.usdz").write_bytes(asset.files["object.usdz"])
    (tmp_path / "model-viewer.min.js").write_bytes(script.read_bytes())
    (tmp_path / "index.html").write_text(MODEL_VIEWER_PAGE)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_port(port, proc=proc)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"http://127.0.0.1:{port}/index.html")
                assert page.evaluate("window.result", None) == {"event": "load"}
                assert page.evaluate("document.getElementById('v').loaded") is True
                assert not errors, errors
            finally:
                browser.close()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_the_glb_is_handed_over_before_the_slower_formats_and_last_as_the_asset_has_it(placed, monkeypatch):
    from sam3d_pipeline.export import usdz

    events: list[tuple[str, bytes]] = []
    write_usdz = usdz.write_usdz
    monkeypatch.setattr(usdz, "write_usdz", lambda *a, **k: events.append(("usdz", b"")) or write_usdz(*a, **k))
    asset = export.export_asset(placed, profile="web", formats=["glb", "usdz"], budgets=SMALL,
                                on_glb=lambda glb: events.append(("glb", glb)))
    assert [kind for kind, _ in events] == ["glb", "usdz"]  # one pass, the GLB first
    assert events[0][1] == asset.files["object.glb"]

    events.clear()  # a USDZ over the byte budget: simplified again, and the new GLB handed over again
    tight = export.Budgets(max_triangles=3_000, max_bytes=len(asset.files["object.usdz"]) - 1, texture_max_px=1024)
    asset = export.export_asset(placed, profile="web", formats=["glb", "usdz"], budgets=tight,
                                on_glb=lambda glb: events.append(("glb", glb)))
    glbs = [data for kind, data in events if kind == "glb"]
    assert len(glbs) >= 2 and glbs[0] != glbs[-1] and events[0][0] == "glb"
    assert glbs[-1] == asset.files["object.glb"]
