"""The catalog's pure core: manifests, sources, skip logic, the plain loop, catalog.json and the gallery page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sam3d_pipeline import catalog
from sam3d_pipeline.backends.lite_reconstructor import LiteReconstructor
from sam3d_pipeline.backends.lite_segmenter import LiteSegmenter
from sam3d_pipeline.errors import InputError
from sam3d_pipeline.gallery import render_gallery_html
from sam3d_pipeline.storage import LocalStorage

from .photos import encode, object_photo, uniform_photo


def test_csv_manifest_fields_defaults_and_bad_rows(tmp_path):
    text = (
        "image,prompt,box,points,review,id\n"
        "a.png,red chair,\"10,20,110,90\",,yes,\n"
        "b.jpg,,,\"[{\"\"x\"\": 5, \"\"y\"\": 6}]\",,bee\n"
        "s3://bkt/c.png,lamp,,\"5,6,0;7,8\",0,\n"
        "d.png,lamp,\"1,2,3\",,,\n"
        ",lamp,,,,\n"
        "a.png,other,,,,\n"
        "e.png,lamp,,,,bee\n"
        "f.png,lamp,,,maybe,\n"
    )
    rows = catalog.parse_manifest(text, fmt="csv", source="m.csv", base=str(tmp_path), default_prompt="thing")
    assert [r.line for r in rows] == [2, 3, 4, 5, 6, 7, 8, 9]
    a, b, c, d, empty, a2, dup, f = rows
    assert a.item.image == str(tmp_path / "a.png") and a.item.box == (10, 20, 110, 90) and a.item.review
    assert a.item.id == "a" and a.item.prompt == "red chair"
    assert b.item.prompt == "thing" and b.item.id == "bee" and b.item.points[0].x == 5 and b.item.points[0].label == 1
    assert c.item.image == "s3://bkt/c.png" and [(p.x, p.y, p.label) for p in c.item.points] == [(5, 6, 0), (7, 8, 1)]
    assert d.item is None and "m.csv line 5" in d.error and "four numbers" in d.error
    assert empty.item is None and "'image' is missing" in empty.error
    assert a2.item.id == "a-7"  # a defaulted id that repeats gets its line appended
    assert dup.item is None and "id 'bee' repeats line 3" in dup.error
    assert f.item is None and "review 'maybe'" in f.error
    opts = a.item.options(segmenter="lite", reconstructor="lite")
    assert opts.boxes == [(10, 20, 110, 90)] and opts.prompt == "red chair"


def test_jsonl_manifest_and_whole_file_errors():
    text = '{"image": "x.png", "prompt": "cup", "box": [1, 2, 30, 40]}\n\nnot json\n[1, 2]\n{"image": "y.png"}\n' \
           '{"image": "z.png", "prompt": "cup", "colour": "red"}\n'
    rows = catalog.parse_manifest(text, fmt="jsonl", source="m.jsonl")
    assert rows[0].item.box == (1, 2, 30, 40) and rows[0].line == 1
    assert "line 3: not valid JSON" in rows[1].error
    assert "expected a JSON object, got list" in rows[2].error
    assert "'prompt' is empty and no default prompt" in rows[3].error
    assert rows[4].item.image == "z.png" and rows[4].error is None  # an unknown key is ignored ...
    assert rows.warnings == ["m.jsonl: ignored unknown column(s) colour (the pipeline reads image, prompt, box, "
                             "points, review, id, instances)"]  # ... with one warning for the whole manifest
    with pytest.raises(InputError, match="needs a header row with an 'image' column"):
        catalog.parse_manifest("photo,prompt\na.png,cup\n", fmt="csv", source="m.csv")
    with pytest.raises(InputError, match="no data rows"):
        catalog.parse_manifest("image,prompt\n", fmt="csv", source="m.csv")


def test_load_source_folder_skips_output_root_and_needs_prompt(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    rgb, _ = object_photo(80, 60)
    (photos / "one.png").write_bytes(encode(rgb))
    (photos / "sub" / "two.jpg").write_bytes(encode(rgb, "JPEG"))
    (photos / "notes.txt").write_text("not a photo")
    (photos / "out" / "x-123").mkdir(parents=True)
    (photos / "out" / "x-123" / "overlay.png").write_bytes(encode(rgb))
    rows = catalog.load_source(str(photos), default_prompt="thing", output_root=str(photos / "out"))
    assert [r.item.id for r in rows] == ["one", "sub/two"]
    assert all(r.item.prompt == "thing" for r in rows)
    with pytest.raises(InputError, match="needs a default prompt"):
        catalog.load_source(str(photos))
    with pytest.raises(InputError, match="not a manifest"):
        catalog.load_source(str(tmp_path / "nowhere"), default_prompt="x")


def test_a_listing_takes_videos_and_the_plain_loop_runs_them_with_every_object(tmp_path):
    """A folder with a photo of three objects and two clips: the listing takes both kinds; a clip is tracked and
    reconstructed from its best view, a row repeating it is its duplicate; instances=all gives one object per disc;
    the catalog entries list every object and the clip's chosen frame."""
    from .clips import encode as encode_clip
    from .clips import moving_object
    from .photos import three_objects_photo

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "spin.mp4").write_bytes(encode_clip(moving_object(45).frames, "mp4"))
    (folder / "turn.MOV").write_bytes(encode_clip(moving_object(30, seed=3).frames, "mov"))
    (folder / "three.png").write_bytes(encode(three_objects_photo()[0]))
    (folder / "clip.avi").write_bytes(b"not taken")
    rows = catalog.load_source(str(folder), default_prompt="disc")
    assert [r.item.id for r in rows] == ["spin", "three", "turn"]
    rows = [r if r.item.id != "three" else catalog.ManifestRow(r.line, r.item.model_copy(update={"instances": "all"}))
            for r in rows]
    rows.append(catalog.ManifestRow(9, rows[0].item.model_copy(update={"id": "spin-again", "line": 9})))
    storage = LocalStorage(tmp_path / "out")
    entries = {e.id: e for e in catalog.run_catalog_plain(rows, storage, segmenter="lite", reconstructor="lite")}
    assert {k: e.status for k, e in entries.items()} == {"spin": "completed", "spin-again": "duplicate",
                                                          "three": "completed", "turn": "completed"}
    clip = entries["spin"]
    assert clip.video["frames_sampled"] == 45 and entries["turn"].video["frames_sampled"] == 30
    assert {"frame.png", "track.webp", "object.glb"} <= set(clip.files) and len(clip.objects) == 1
    three = entries["three"]
    assert sorted(o["index"] for o in three.objects) == [0, 1, 2] and three.objects[0]["selected"]
    assert all(f"objects/{o['index']}/object.glb" in o["files"] for o in three.objects)


@pytest.mark.slow
def test_load_source_s3_prefix_and_manifest(s3):
    client, bucket = s3
    rgb, _ = object_photo(80, 60)
    for key in ("shop/a.png", "shop/b.jpeg", "shop/readme.md", "shop/out/a-1/overlay.png", "other/c.png"):
        client.put_object(Bucket=bucket, Key=key, Body=encode(rgb))
    rows = catalog.load_source(f"s3://{bucket}/shop", default_prompt="thing", output_root=f"s3://{bucket}/shop/out")
    assert [r.item.image for r in rows] == [f"s3://{bucket}/shop/a.png", f"s3://{bucket}/shop/b.jpeg"]
    client.put_object(Bucket=bucket, Key="lists/m.jsonl", Body=b'{"image": "a.png", "prompt": "cup"}\n')
    rows = catalog.load_source(f"s3://{bucket}/lists/m.jsonl")
    assert rows[0].item.image == f"s3://{bucket}/lists/a.png"


def test_gpu_batches_and_counts():
    works = list(range(7))
    assert [len(b) for b in catalog.gpu_batches(works, 3)] == [3, 3, 1]
    with pytest.raises(ValueError, match="batch_size"):
        catalog.gpu_batches(works, 0)
    entries = [catalog.CatalogEntry(id=str(i), line=i, image="x", prompt="p", status=s, result_status=r)
               for i, (s, r) in enumerate([("completed", "completed"), ("skipped", "completed"), ("failed", "failed")])]
    assert catalog.summary_line(entries) == "catalog: 3 item(s): 1 completed, 1 skipped, 0 no_object, 1 failed"
    assert not catalog.all_succeeded(entries) and catalog.all_succeeded(entries[:2])
    skipped_blank = entries[0].model_copy(update={"status": "skipped", "result_status": "no_object"})
    assert skipped_blank.no_object and not catalog.all_succeeded([skipped_blank])


def test_tally_collects_entries_progress_crashes_and_the_outcome(tmp_path):
    """The flow's bookkeeping, without Prefect: rows in, entries as they arrive, catalog.json and the result out."""
    for name in ("a.png", "c.png"):
        (tmp_path / name).write_bytes(encode(object_photo(80, 60)[0]))
    rows = catalog.parse_manifest('image,prompt,box\na.png,cup,\nb.png,cup,"1,2"\nc.png,cup,\n', fmt="csv",
                                  source="m.csv", base=str(tmp_path))
    tally = catalog.CatalogTally(source="m.csv", output_root=str(tmp_path / "out"), flow_run_id="run-1")
    a, c = tally.begin(rows)
    assert (a.id, c.id, tally.total) == ("a", "c", 3)
    [bad] = tally.entries  # the unusable row is entered as failed at once
    assert (bad.id, bad.line, bad.status) == ("line-3", 3, "failed") and "four numbers" in bad.error["message"]
    assert tally.percent_done == 33.3
    assert tally.progress_line() == ("catalog-batch: 1 of 3 item(s) done "
                                     "(catalog: 1 item(s): 0 completed, 0 skipped, 0 no_object, 1 failed)")

    storage = LocalStorage(tmp_path / "out")
    planned = catalog.plan_item(c, c.options(segmenter="lite", reconstructor="lite"), storage)
    crashed = catalog.crashed_entry(c, "worker lost", planned)  # a planned item keeps its prefix
    assert crashed.error == {"type": "TaskFailure", "code": "task_failed", "message": "worker lost"}
    assert crashed.prefix == planned.run_plan.prefix and crashed.output_prefix == f"{storage.root}/{crashed.prefix}"
    assert not (tmp_path / "out").exists()  # nothing is written for a crash
    unplanned = catalog.crashed_entry(a, "planning failed")
    assert (unplanned.status, unplanned.prefix, unplanned.output_prefix) == ("failed", "", "")
    done = catalog.CatalogEntry(id="a", line=2, image=a.image, prompt="cup", status="completed",
                                result_status="completed")
    tally.add(crashed, done)
    assert tally.percent_done == 100.0
    assert tally.counts() == {"completed": 1, "skipped": 0, "no_object": 0, "failed": 2, "duplicate": 0}

    summary, index = tally.summary(), tally.index()
    assert summary.startswith("catalog: 3 item(s): 1 completed, 0 skipped, 0 no_object, 2 failed (")
    assert summary.endswith(" s)")
    assert [it["id"] for it in index["items"]] == ["a", "line-3", "c"]  # manifest order, not arrival order
    assert (index["source"], index["flow_run_id"], index["started_at"]) == ("m.csv", "run-1", tally.started_at)
    uris = {"catalog": "out/catalog.json", "gallery": "out/index.html"}
    assert tally.outcome(index, uris, summary) == {
        "counts": index["counts"], "catalog": "out/catalog.json", "gallery": "out/index.html",
        "all_succeeded": False, "any_no_object": False, "summary": summary, "items": index["items"],
    }
    tally.entries = [done]
    assert tally.outcome(tally.index(), uris, "")["all_succeeded"]


@pytest.fixture
def spies(monkeypatch):
    """Count calls into the real lite backends (the methods still run)."""
    calls = {"segment": 0, "reconstruct": 0}
    real_segment, real_reconstruct = LiteSegmenter.segment, LiteReconstructor.reconstruct

    def segment(self, *args, **kwargs):
        calls["segment"] += 1
        return real_segment(self, *args, **kwargs)

    def reconstruct(self, *args, **kwargs):
        calls["reconstruct"] += 1
        return real_reconstruct(self, *args, **kwargs)

    monkeypatch.setattr(LiteSegmenter, "segment", segment)
    monkeypatch.setattr(LiteReconstructor, "reconstruct", reconstruct)
    return calls


def test_plain_loop_runs_once_skips_finished_and_retries_failed(tmp_path, spies):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"p{i}.png").write_bytes(encode(object_photo(160, 120, seed=i)[0]))
    (photos / "blank.png").write_bytes(encode(uniform_photo(160, 120)))
    (photos / "broken.png").write_bytes(encode(object_photo(160, 120)[0])[:200])
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,prompt,box\nphotos/p0.png,cup,\nphotos/p1.png,cup,\"10,10,150,110\"\n"
                        "photos/p2.png,cup,\"500,500,600,600\"\nphotos/blank.png,cup,\nphotos/broken.png,cup,\n"
                        "photos/gone.png,cup,\n")
    storage = LocalStorage(tmp_path / "out")
    rows = catalog.load_source(str(manifest))
    first = catalog.run_catalog_plain(rows, storage, batch_size=2, segmenter="lite", reconstructor="lite")
    by_id = {e.id: e for e in first}
    assert [by_id[k].status for k in ("p0", "p1", "p2", "blank", "broken", "gone")] == [
        "completed", "completed", "failed", "no_object", "failed", "failed"]
    assert "lies outside the 160x120 image" in by_id["p2"].error["message"]
    assert "truncated" in by_id["broken"].error["message"]
    assert "no such file" in by_id["gone"].error["message"] and by_id["gone"].prefix == ""
    assert spies == {"segment": 3, "reconstruct": 2}  # p0, p1, blank segmented; p0, p1 reconstructed
    assert {by_id["p0"].gpu_batch, by_id["p1"].gpu_batch} == {0}
    # A failure with a known prefix leaves a failed result.json there (retried next time).
    failed = json.loads((Path(by_id["broken"].output_prefix) / "result.json").read_text())
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_image"
    assert set(by_id["p0"].files) == {"mask.png", "overlay.png", "object.glb", "preview.png", "result.json",
                                      "scene.glb", "objects/0/mask.png", "objects/0/object.glb",
                                      "objects/0/object.usdz"}

    second = catalog.run_catalog_plain(rows, storage, batch_size=2, segmenter="lite", reconstructor="lite")
    statuses = {e.id: (e.status, e.result_status) for e in second}
    assert statuses["p0"] == ("skipped", "completed") and statuses["blank"] == ("skipped", "no_object")
    assert statuses["broken"] == ("failed", "failed")
    assert spies == {"segment": 3, "reconstruct": 2}  # the re-run did no model work


def test_catalog_prefix_matches_image_to_3d(tmp_path):
    """An item lands where `image-to-3d` (run_plain) puts the same photo, prompt and options."""
    from sam3d_pipeline.run.pipeline import RunOptions, run_plain

    photo = tmp_path / "chair.png"
    photo.write_bytes(encode(object_photo(160, 120)[0]))
    single = run_plain(str(photo), RunOptions(prompt="chair", boxes=[(10, 10, 150, 110)], segmenter="lite",
                                              reconstructor="lite"), output_root=str(tmp_path / "out"))
    rows = catalog.parse_manifest(f"image,prompt,box\n{photo},chair,\"10,10,150,110\"\n", fmt="csv", source="m")
    [entry] = catalog.run_catalog_plain(rows, LocalStorage(tmp_path / "out"), segmenter="lite", reconstructor="lite")
    assert entry.status == "skipped" and entry.output_prefix == single.output_prefix


def test_gallery_page_escapes_and_links():
    index = catalog.build_index([
        catalog.CatalogEntry(id="a<b>", line=2, image="x.png", prompt="<script>x</script>", status="completed",
                             result_status="completed", prefix="a-123", files=["object.glb", "overlay.png"],
                             score=0.9, instances=1),
        catalog.CatalogEntry(id="bad", line=3, image="y.png", prompt="cup", status="failed",
                             error={"code": "invalid_image", "message": "y.png: </script> not an image"}),
    ], source="m.csv", output_root="/out")
    page = render_gallery_html(index)
    assert '<script type="module" src="model-viewer.min.js"></script>' in page
    assert 'src="a-123/overlay.png"' in page and 'href="a-123/object.glb"' in page
    assert "<script>x</script>" not in page.replace('<script type="application/json"', "")
    assert "y.png: &lt;/script&gt; not an image" in page
    assert page.count('data-open="') == 1
    assert index["counts"] == {"completed": 1, "skipped": 0, "no_object": 0, "failed": 1, "duplicate": 0}
    assert "not installed" in render_gallery_html(index, viewer_available=False)


def test_manifest_instances_field_reaches_the_run_options(tmp_path):
    text = "image,prompt,instances\na.png,cups,all\nb.png,cups,0;2\nc.png,cups,\nd.png,cups,two\n"
    a, b, c, d = catalog.parse_manifest(text, fmt="csv", source="m.csv", base=str(tmp_path))
    assert a.item.options().instances == "all" and b.item.options().instances == [0, 2]
    assert c.item.options().instances == "best"
    assert d.item is None and "instances 'two'" in d.error
    # Different instances, different outputs: the prefix differs.
    from sam3d_pipeline.run.pipeline import plan

    base = dict(input_uri="a.png", input_id="sha256:1", output_root=str(tmp_path))
    assert plan(options=a.item.options(), **base).prefix != plan(options=c.item.options(), **base).prefix


def test_gallery_offers_ar_and_every_objects_downloads():
    files = ["object.glb", "overlay.png", "scene.glb", "objects/0/object.glb", "objects/0/object.usdz",
             "objects/0/mask.png", "objects/2/object.glb", "objects/2/object.obj", "objects/2/object.mtl",
             "objects/2/texture.png"]
    index = catalog.build_index([catalog.CatalogEntry(
        id="cups", line=2, image="x.png", prompt="cups", status="completed", result_status="completed",
        prefix="p-1", files=files, score=0.9, instances=3)], source="m.csv", output_root="/out")
    page = render_gallery_html(index)
    assert '<model-viewer id="viewer"' in page and " ar ar-modes=" in page and 'slot="ar-button"' in page
    assert "setAttribute('ios-src'" in page  # AR Quick Look gets the object's USDZ
    for name in ("scene.glb", "objects/0/object.usdz", "objects/2/object.obj", "objects/2/texture.png"):
        assert f'href="p-1/{name}" download' in page
    assert 'href="p-1/objects/0/mask.png"' not in page


def test_gallery_shows_each_objects_export_checks():
    rules = [{"rule": "glb triangles", "limit": 100000, "value": 2400, "pass": True, "by": "AR Quick Look"},
             {"rule": "glb vertex colours", "limit": 0, "value": 1, "pass": False, "by": "stores"}]
    index = catalog.build_index([catalog.CatalogEntry(
        id="cup", line=2, image="x.png", prompt="cup", status="completed", result_status="completed",
        prefix="p-1", files=["object.glb"], checks={"0": rules, "1": rules[:1]})], source="m.csv", output_root="/o")
    page = render_gallery_html(index)
    assert '<details class="checks" data-object="0"><summary>#0 checks: 1/2 pass</summary>' in page
    assert "#1 checks: 1/1 pass" in page
    assert "<td>glb vertex colours</td><td>0</td><td>1</td><td class=\"fail\">FAIL</td>" in page
