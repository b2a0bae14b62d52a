"""The image-to-3d flow under a Prefect test server (SQLite), with local and S3 storage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3d_pipeline.masks import iou

from .photos import encode, object_photo, uniform_photo

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def _run(**kwargs):
    from flows.image_to_3d import image_to_3d

    return image_to_3d(return_state=True, **kwargs)


def test_completed_run_writes_every_output(tmp_path):
    rgb, truth = object_photo()
    photo = tmp_path / "red ellipse.png"
    photo.write_bytes(encode(rgb))
    state = _run(image=str(photo), prompt="red ellipse", output_root=str(tmp_path / "out"))
    assert state.is_completed(), state.message
    result = state.result()
    assert result["status"] == "completed"
    prefix = Path(result["output_prefix"])
    assert prefix.parent == (tmp_path / "out").resolve()
    assert prefix.name.startswith("red-ellipse-")
    assert {p.name for p in prefix.iterdir()} == {"mask.png", "overlay.png", "object.glb", "preview.png",
                                                  "result.json", "scene.glb", "objects"}
    assert {p.name for p in (prefix / "objects" / "0").iterdir()} == {"mask.png", "object.glb", "object.usdz"}
    mask = np.asarray(Image.open(prefix / "mask.png")) > 127
    assert mask.shape == truth.shape
    assert iou(mask, truth) > 0.9
    on_disk = json.loads((prefix / "result.json").read_text())
    assert on_disk["segmenter"]["name"] == "lite" and on_disk["reconstructor"]["name"] == "lite"
    assert on_disk["prompt"] == "red ellipse" and on_disk["prompt_used_by_segmenter"] is False
    assert on_disk["flow_run_id"] == str(state.state_details.flow_run_id)
    assert on_disk["mesh"]["watertight"] is True
    assert set(on_disk["outputs"]) == {"mask.png", "overlay.png", "object.glb", "preview.png", "result.json",
                                       "scene.glb", "objects/0/mask.png", "objects/0/object.glb",
                                       "objects/0/object.usdz"}
    [obj] = on_disk["objects"]
    assert obj["selected"] is True and obj["export"]["profile"] == "web" and obj["export"]["budget"]["met"]
    assert obj["export"]["usdz_check"]["passed"] is True
    assert obj["units"] == "m" and obj["scale_source"] == "default"
    assert set(obj["outputs"]) == {"mask.png", "object.glb", "object.usdz"}
    assert on_disk["export"]["profile"] == "web" and on_disk["export"]["formats"] == ["glb", "usdz"]


def test_rerun_reuses_the_same_prefix(tmp_path):
    rgb, _ = object_photo(seed=1)
    photo = tmp_path / "thing.png"
    photo.write_bytes(encode(rgb))
    out = tmp_path / "out"
    first = _run(image=str(photo), prompt="thing", output_root=str(out)).result()
    mtime = (Path(first["output_prefix"]) / "object.glb").stat().st_mtime_ns
    second = _run(image=str(photo), prompt="thing", output_root=str(out)).result()
    assert second["output_prefix"] == first["output_prefix"]
    assert second["flow_run_id"] == first["flow_run_id"]  # reused, not recomputed
    assert (Path(first["output_prefix"]) / "object.glb").stat().st_mtime_ns == mtime
    forced = _run(image=str(photo), prompt="thing", output_root=str(out), force=True).result()
    assert forced["output_prefix"] == first["output_prefix"]
    assert forced["flow_run_id"] != first["flow_run_id"]
    assert len(list(out.iterdir())) == 1
    # A different prompt is a different result.
    other = _run(image=str(photo), prompt="other thing", output_root=str(out)).result()
    assert other["output_prefix"] != first["output_prefix"]


def test_no_object_skips_reconstruction(tmp_path):
    photo = tmp_path / "blank.png"
    photo.write_bytes(encode(uniform_photo()))
    state = _run(image=str(photo), prompt="chair", output_root=str(tmp_path / "out"))
    assert state.is_completed()
    result = state.result()
    assert result["status"] == "no_object"
    assert result["selected"] is None and result["instances"] == []
    prefix = Path(result["output_prefix"])
    assert {p.name for p in prefix.iterdir()} == {"overlay.png", "result.json"}


def test_corrupt_image_fails_fast_with_reason(tmp_path):
    photo = tmp_path / "broken.jpg"
    photo.write_bytes(encode(object_photo()[0], "JPEG")[:500])
    state = _run(image=str(photo), prompt="chair", output_root=str(tmp_path / "out"))
    assert state.is_failed()
    assert "broken.jpg" in state.message and "truncated" in state.message
    [prefix] = list((tmp_path / "out").iterdir())
    result = json.loads((prefix / "result.json").read_text())
    assert result["status"] == "failed"
    assert result["error"]["type"] == "InvalidImageError"


def test_box_outside_image_is_refused(tmp_path):
    photo = tmp_path / "p.png"
    photo.write_bytes(encode(object_photo()[0]))
    state = _run(image=str(photo), prompt="x", output_root=str(tmp_path / "out"), boxes=[(1000, 1000, 1200, 1100)])
    assert state.is_failed()
    assert "outside the 320x240 image" in state.message


def test_missing_input_fails_without_retry(tmp_path):
    state = _run(image=str(tmp_path / "nope.jpg"), prompt="x", output_root=str(tmp_path / "out"))
    assert state.is_failed()
    assert "nope.jpg" in state.message and "no such file" in state.message


def test_s3_input_and_output(s3):
    client, bucket = s3
    rgb, _ = object_photo(seed=2)
    client.put_object(Bucket=bucket, Key="photos/my chair+1.png", Body=encode(rgb))
    state = _run(image=f"s3://{bucket}/photos/my chair+1.png", prompt="chair", output_root=f"s3://{bucket}/outputs")
    assert state.is_completed(), state.message
    result = state.result()
    prefix = result["output_prefix"]
    assert prefix.startswith(f"s3://{bucket}/outputs/my-chair-1-")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="outputs/")["Contents"]}
    stem = prefix.split("/", 3)[3]
    assert keys == {f"{stem}/{name}" for name in ("mask.png", "overlay.png", "object.glb", "preview.png",
                                                   "result.json", "scene.glb", "objects/0/mask.png",
                                                   "objects/0/object.glb", "objects/0/object.usdz")}
    stored = json.loads(client.get_object(Bucket=bucket, Key=f"{stem}/result.json")["Body"].read())
    assert stored["status"] == "completed" and stored["outputs"]["object.glb"] == f"{prefix}/object.glb"


def test_transient_s3_failure_is_retried(s3, faulty_s3):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="photos/flaky.png", Body=encode(object_photo(seed=4)[0]))
    faulty_s3.fail_next(2, 503, "SlowDown", match="/photos/flaky.png")
    state = _run(image=f"s3://{bucket}/photos/flaky.png", prompt="x", output_root=f"s3://{bucket}/outputs")
    assert state.is_completed(), state.message
    statuses = [status for _, path, status in faulty_s3.requests if path.endswith("/photos/flaky.png")]
    assert statuses[:2] == [503, 503] and statuses[2:] and all(s == 200 for s in statuses[2:])


def test_permanent_s3_failure_is_not_retried(s3, faulty_s3):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="photos/secret.png", Body=encode(object_photo(seed=5)[0]))
    faulty_s3.fail_next(5, 403, "AccessDenied", match="/photos/secret.png")
    state = _run(image=f"s3://{bucket}/photos/secret.png", prompt="x", output_root=f"s3://{bucket}/outputs")
    assert state.is_failed()
    assert "access denied" in state.message and "photos/secret.png" in state.message
    statuses = [status for _, path, status in faulty_s3.requests if path.endswith("/photos/secret.png")]
    assert statuses == [403]  # one attempt, no retry


def test_artifacts_and_a_valid_glb(tmp_path):
    import subprocess

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    rgb, _ = object_photo(seed=6)
    photo = tmp_path / "p.png"
    photo.write_bytes(encode(rgb))
    state = _run(image=str(photo), prompt="thing", output_root=str(tmp_path / "out"))
    result = state.result()
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    by_type = {a.type: a for a in artifacts}
    assert set(by_type) == {"image", "table", "markdown"}
    assert by_type["image"].data.endswith("/overlay.png")
    table = json.loads(by_type["table"].data)
    assert table[0]["selected"] is True and table[0]["area"] == result["instances"][0]["area"]
    markdown = by_type["markdown"].data
    assert "completed" in markdown and "object.glb" in markdown and "cannot read text" in markdown
    # The GLB passes the Khronos glTF validator (what viewers rely on) with no errors.
    glb = Path(result["outputs"]["object.glb"])
    proc = subprocess.run(["node", "tools/gltf-validator/validate.mjs", str(glb)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["issues"]["numErrors"] == 0, report["issues"]
    assert report["info"]["totalTriangleCount"] == result["objects"][0]["export"]["triangles"]


def test_every_object_of_a_photo_and_the_scene(tmp_path):
    from .photos import three_objects_photo

    rgb, masks, boxes = three_objects_photo()
    photo = tmp_path / "three.png"
    photo.write_bytes(encode(rgb))
    state = _run(image=str(photo), prompt="discs", output_root=str(tmp_path / "out"), boxes=[list(b) for b in boxes],
                 instances="all", profile="ar", export=["glb", "obj"])
    assert state.is_completed(), state.message
    result = state.result()
    prefix = Path(result["output_prefix"])
    assert sorted(o["index"] for o in result["objects"]) == [0, 1, 2]
    assert result["objects"][0]["index"] == result["selected"] and result["objects"][0]["selected"] is True
    for obj in result["objects"]:
        folder = prefix / "objects" / str(obj["index"])
        assert {p.name for p in folder.iterdir()} == {"mask.png", "object.glb", "object.obj", "object.mtl",
                                                      "texture.png"}
        assert obj["export"]["profile"] == "ar" and obj["mesh"]["watertight"] is True
        assert obj["export"]["bounds_m"][0][1] == 0.0  # rests on the floor
    masks_back = [np.asarray(Image.open(prefix / "objects" / str(i) / "mask.png")) > 127 for i in range(3)]
    assert sorted(max(iou(m, t) for m in masks_back) for t in masks)[0] > 0.8  # each disc is one object
    from sam3d_pipeline.export import read_glb

    _, meshes = read_glb((prefix / "scene.glb").read_bytes())
    assert len(meshes) == 3 and result["scene"]["layout"] == "image-positions"
    xs = sorted(m.vertices.mean(0)[0] for m in meshes)
    assert xs[1] - xs[0] > 0.1 and xs[2] - xs[1] > 0.1
    assert (prefix / "object.glb").read_bytes() == (prefix / "objects" / str(result["selected"]) /
                                                    "object.glb").read_bytes()
    # Other export options are other outputs: a different prefix, never a mix of files.
    other = _run(image=str(photo), prompt="discs", output_root=str(tmp_path / "out"),
                 boxes=[list(b) for b in boxes]).result()
    assert other["output_prefix"] != result["output_prefix"] and len(other["objects"]) == 1


def test_failed_run_has_a_markdown_artifact_with_the_reason(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    photo = tmp_path / "empty.jpg"
    photo.write_bytes(b"")
    state = _run(image=str(photo), prompt="x", output_root=str(tmp_path / "out"))
    assert state.is_failed() and "the file is empty" in state.message
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    [md] = [a for a in artifacts if a.type == "markdown"]
    assert "failed" in md.data and "InvalidImageError" in md.data and "the file is empty" in md.data


def test_the_viewers_glb_is_written_first_and_the_result_last(tmp_path, monkeypatch):
    """object.glb is published as soon as it is exported (after any earlier result.json is removed), before the
    preview and the other files; result.json comes last; nothing is written twice; the clock adds up."""
    from sam3d_pipeline.run.pipeline import RunOptions, run_plain
    from sam3d_pipeline.storage import LocalStorage

    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(object_photo()[0]))
    first = run_plain(str(photo), RunOptions(prompt="thing"), output_root=str(tmp_path / "out"))
    assert first.status == "completed"

    events: list[tuple[str, str]] = []
    write, delete = LocalStorage.write_bytes, LocalStorage.delete
    monkeypatch.setattr(LocalStorage, "write_bytes",
                        lambda self, key, data, **kw: events.append(("write", key.split("/", 1)[-1]))
                        or write(self, key, data, **kw))
    monkeypatch.setattr(LocalStorage, "delete",
                        lambda self, key: events.append(("delete", key.split("/", 1)[-1])) or delete(self, key))
    again = run_plain(str(photo), RunOptions(prompt="thing"), output_root=str(tmp_path / "out"), force=True)
    writes = [name for op, name in events if op == "write"]
    assert writes[0] == "object.glb" and writes[-1] == "result.json"
    assert events.index(("delete", "result.json")) < events.index(("write", "object.glb"))  # no stale pairing
    assert len(writes) == len(set(writes)) and set(writes) == set(again.outputs)  # each file once, all listed
    clock = again.clock
    assert set(clock["render_s"]) == {"preview", "export"}
    assert clock["render_s"]["preview"] + clock["render_s"]["export"] <= clock["steps_s"]["render"] + 1e-3
    assert clock["queue_s"] == 0.0 and clock["gpu_s"] == 0  # created here, ran on the CPU
