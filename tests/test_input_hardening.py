"""Hostile or careless input: work done twice, files that should not be read, and messages a person can act on.

Each test names the class of problem it covers; all run without Prefect (the catalog through its plain loop).
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zlib
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from sam3d_pipeline import catalog
from sam3d_pipeline.errors import ImageTooLargeError, InputError, InputNotFoundError, InvalidImageError
from sam3d_pipeline.images import load_image
from sam3d_pipeline.run.pipeline import RunOptions, run_plain
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import LocalStorage, open_storage, read_input
from sam3d_pipeline.types import Point

from .photos import encode, object_photo

LITE = {"segmenter": "lite", "reconstructor": "lite"}


def _plain(rows, out):
    return catalog.run_catalog_plain(rows, LocalStorage(out), batch_size=4, **LITE)


# --- Work done twice -----------------------------------------------------------------------------------------


def test_rows_with_the_same_prefix_run_once_and_report_the_row_that_does_the_work(tmp_path, monkeypatch):
    photo = encode(object_photo(96, 72)[0])
    (tmp_path / "cup.png").write_bytes(photo)
    (tmp_path / "sub").mkdir()
    (tmp_path / "other.png").write_bytes(photo)  # same bytes, other name: another prefix, so it runs
    text = ("image,prompt,id\n" + "".join(f"cup.png,cup,c{i}\n" for i in range(4))
            + "sub/../cup.png,cup,copy\n"  # written differently, same file: found after planning
            + "other.png,cup,other\n")
    rows = catalog.parse_manifest(text, fmt="csv", source="m.csv", base=str(tmp_path))

    from sam3d_pipeline.backends import lite_reconstructor

    calls = []
    real = lite_reconstructor.LiteReconstructor.reconstruct
    monkeypatch.setattr(lite_reconstructor.LiteReconstructor, "reconstruct",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    entries = {e.id: e for e in _plain(rows, tmp_path / "out")}
    assert len(calls) == 2  # one reconstruction per prefix, for six rows
    assert entries["c0"].status == "completed" and entries["other"].status == "completed"
    for dup in ("c1", "c2", "c3", "copy"):
        assert entries[dup].status == "duplicate" and entries[dup].duplicate_of == "c0"
    index = catalog.build_index(list(entries.values()), source="m.csv", output_root=str(tmp_path / "out"))
    assert index["counts"]["duplicate"] == 4 and index["counts"]["completed"] == 2
    resolved = {it["id"]: it for it in index["items"]}
    assert resolved["copy"]["result_status"] == "completed" and resolved["copy"]["prefix"] == entries["c0"].prefix
    assert catalog.all_succeeded(entries.values())  # a duplicate of a completed row has its asset


def test_a_batch_rechecks_for_a_result_finished_meanwhile(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(object_photo(96, 72)[0]))
    rows = catalog.parse_manifest("image,prompt\na.png,cup\n", fmt="csv", source="m.csv", base=str(tmp_path))
    storage = LocalStorage(tmp_path / "out")
    item = rows[0].item
    work = catalog.plan_item(item, item.options(**LITE), storage)
    assert isinstance(work, catalog.ItemWork)
    assert catalog.recheck_finished([work], storage) == 0
    _plain(rows, tmp_path / "out")  # another run finishes it while `work` waits for its GPU slot
    assert catalog.recheck_finished([work], storage) == 1
    catalog.segment_batch([work])
    assert work.seg is None  # not segmented again
    entry = catalog.finish_item(work, storage)
    assert entry.status == "skipped" and entry.result_status == "completed"


def test_a_stale_partial_write_is_removed_by_the_next_write(tmp_path):
    stale, fresh = tmp_path / ".result.json.abc123.part", tmp_path / ".other.json.def456.part"
    stale.write_bytes(b"half a file")
    fresh.write_bytes(b"a write in progress")
    old = time.time() - 7 * 3600
    os.utime(stale, (old, old))
    store = LocalStorage(tmp_path, stale_part_s=6 * 3600)
    store.write_bytes("result.json", b"{}")
    assert not stale.exists()  # older than any run: removed
    assert fresh.exists()  # recent: may be another writer's, kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.def456.part", "result.json"]


# --- Reading what it should not --------------------------------------------------------------------------------


@pytest.fixture
def secret(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "secret.txt"
    path.write_text("TOP-SECRET-CONTENT " * 10)
    return path


def test_local_manifest_images_are_confined_to_its_folder(tmp_path, secret):
    shop = tmp_path / "shop"
    shop.mkdir()
    (shop / "ok.png").write_bytes(encode(object_photo(96, 72)[0]))
    (shop / "link.png").symlink_to(secret)
    (shop / "loop.png").symlink_to(shop / "loop.png")
    manifest = shop / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": img, "prompt": "cup"}) for img in [
        "ok.png", "../outside/secret.txt", str(secret), "link.png", "loop.png", "/etc/passwd"]) + "\n")
    rows = catalog.load_source(str(manifest), settings=Settings())
    ok, up, absolute, link, loop, passwd = rows
    assert ok.item is not None
    assert "is outside the manifest's folder" in up.error and "is outside" in absolute.error
    assert "is a symbolic link leading outside" in link.error
    assert "symbolic link loop" in loop.error
    assert "is outside" in passwd.error
    entries = _plain(rows, tmp_path / "out")
    everything = json.dumps([e.model_dump() for e in entries])
    assert "TOP-SECRET" not in everything and "root:" not in everything  # nothing was read, nothing quoted
    assert [e.status for e in entries].count("completed") == 1

    # An allow-list setting opens another folder, and only that one.
    allowed = catalog.load_source(str(manifest), settings=Settings(catalog_input_roots=str(secret.parent)))
    assert allowed[1].item is not None and allowed[3].item is not None and allowed[5].item is None


def test_folder_listing_refuses_symlinks_that_escape_it(tmp_path, secret):
    shop = tmp_path / "shop"
    shop.mkdir()
    (shop / "ok.png").write_bytes(encode(object_photo(96, 72)[0]))
    (shop / "escape.png").symlink_to(secret)
    rows = {r.raw_image.rsplit("/", 1)[-1]: r for r in catalog.load_source(str(shop), default_prompt="cup")}
    assert rows["ok.png"].item is not None
    assert rows["escape.png"].item is None and "symbolic link leading outside" in rows["escape.png"].error


@pytest.mark.parametrize("image", ["/etc/passwd", "../../etc/passwd", "~/secret.png", "a/../../b.png"])
def test_s3_manifest_never_names_local_files(image):
    rows = catalog.parse_manifest(json.dumps({"image": image, "prompt": "cup"}) + "\n", fmt="jsonl",
                                  source="s3://bkt/lists/m.jsonl", base="s3://bkt/lists")
    assert rows[0].item is None
    assert "never a local path" in rows[0].error or "'..' is not allowed" in rows[0].error
    good = catalog.parse_manifest('{"image": "photos/a.png", "prompt": "cup"}\n', fmt="jsonl",
                                  source="s3://bkt/lists/m.jsonl", base="s3://bkt/lists")
    assert good[0].item.image == "s3://bkt/lists/photos/a.png"


def test_image_errors_never_quote_the_file(tmp_path):
    with pytest.raises(InvalidImageError) as caught:
        load_image(b"root:x:0:0:root:/root:/bin/bash\n" * 20, source="p.img", max_pixels=10**8)
    message = str(caught.value)
    assert "root:" not in message and "BytesIO" not in message and "not a recognised image format" in message


def test_pillow_bomb_guard_stays_on():
    import sam3d_pipeline.images  # noqa: F401  (importing our intake must not switch Pillow's guard off)

    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 0


# --- Errors a person can read ----------------------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def test_a_huge_text_chunk_is_named_as_such():
    png = encode(object_photo(16, 16)[0])
    bomb = png[:33] + _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * 100_000_000, 9)) + png[33:]
    assert len(bomb) < 200_000
    with pytest.raises(InvalidImageError, match="text metadata chunk decompresses to more than"):
        load_image(bomb, source="p.png", max_pixels=10**8)


def test_a_symlink_loop_is_not_reported_as_missing(tmp_path):
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(InputError, match="symbolic link loop") as caught:
        read_input(str(loop))
    assert not isinstance(caught.value, InputNotFoundError)
    with pytest.raises(InputNotFoundError, match="no such file"):
        read_input(str(tmp_path / "missing.png"))
    with pytest.raises(InputError, match="not a regular file"):
        read_input(str(tmp_path))


def test_jsonl_lines_end_at_newline_only_and_csv_ignores_unknown_columns():
    text = (json.dumps({"image": "a.png", "prompt": "cup\u2028with a line separator"}, ensure_ascii=False) + "\n"
            + json.dumps({"image": "b.png", "prompt": "cup"}) + "\n")
    assert "\u2028" in text
    a, b = catalog.parse_manifest(text, fmt="jsonl", source="m.jsonl")
    assert a.item is not None and "\u2028" in a.item.prompt and (a.line, b.line) == (1, 2)
    rows = catalog.parse_manifest("image,prompt,notes,sku\na.png,cup,fragile,1\nb.png,cup,,2\n", fmt="csv",
                                  source="m.csv")
    assert all(r.item is not None for r in rows)
    assert rows.warnings == ["m.csv: ignored unknown column(s) notes, sku (the pipeline reads image, prompt, box, "
                             "points, review, id, instances)"]


@pytest.mark.parametrize("box", ["[1, 2, Infinity, 4]", "[NaN, 2, 3, 4]", '"1,2,inf,4"', "[1, 2, 1e400, 4]"])
def test_non_finite_numbers_are_refused_where_they_enter(box):
    rows = catalog.parse_manifest(f'{{"image": "a.png", "prompt": "cup", "box": {box}}}\n', fmt="jsonl",
                                  source="m.jsonl")
    assert rows[0].item is None and rows[0].error
    with pytest.raises(ValidationError):
        RunOptions(prompt="cup", boxes=[(0, 0, float("inf"), 5)])
    with pytest.raises(ValidationError):
        Point(float("nan"), 3)


def test_orientation_and_frames_are_reported_truthfully(tmp_path):
    im = Image.fromarray(object_photo(40, 30)[0])
    exif = im.getexif()
    exif[0x0112] = 9  # not a valid orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    loaded = load_image(buf.getvalue(), source="bad-exif.jpg", max_pixels=10**8)
    assert not loaded.exif_transposed and loaded.rgb.shape == (30, 40, 3)
    assert any("EXIF orientation 9 is not a valid value" in n for n in loaded.notes)

    frames = [Image.fromarray(np.full((30, 40, 3), 40 * i, np.uint8)) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    (tmp_path / "anim.gif").write_bytes(gif.getvalue())
    result = run_plain(str(tmp_path / "anim.gif"), RunOptions(prompt="thing", **LITE), str(tmp_path / "out"))
    assert any("animated GIF with 3 frames; the first frame was used" in m for m in result.messages)


def test_a_multi_page_tiff_says_its_first_page_was_used(tmp_path):
    pages = [Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)) for i in range(4)]
    tiff = io.BytesIO()
    pages[0].save(tiff, format="TIFF", save_all=True, append_images=pages[1:])
    loaded = load_image(tiff.getvalue(), source="scan.tiff", max_pixels=10**8)
    assert loaded.rgb.shape == (30, 40, 3) and int(loaded.rgb.max()) == 0  # the first page's pixels
    assert loaded.notes == ["scan.tiff: multi-page TIFF with 4 frames; the first frame was used"]
    single = io.BytesIO()
    pages[1].save(single, format="TIFF")
    assert load_image(single.getvalue(), source="one.tiff", max_pixels=10**8).notes == []


def test_decoder_messages_never_show_stream_objects():
    """Pillow names the stream it read (``<_io.BytesIO object at 0x…>``) in some of its errors: a person reads
    what is wrong with the file instead."""
    from sam3d_pipeline.images import _corrupt_reason

    reason = _corrupt_reason(OSError("cannot read from <_io.BytesIO object at 0x7f3a2c1d9e40>: bad tile"),
                             "image data")
    assert reason == "image data is corrupt: cannot read from the file: bad tile"
    assert "0x" not in _corrupt_reason(SyntaxError("<PIL.PngImagePlugin.PngStream object at 0xdeadbeef>"),
                                       "image header")
    assert _corrupt_reason(OSError(""), "image header") == "image header is corrupt: no detail from the decoder"
    truncated = b"\x89PNG\r\n\x1a\n" + encode(object_photo(64, 48)[0])[8:200]
    with pytest.raises(InvalidImageError) as err:
        load_image(truncated, source="cut.png", max_pixels=10**8)
    assert "cut.png: image data is truncated" in str(err.value) and "object at 0x" not in str(err.value)


def test_bomb_over_pillows_own_guard_says_our_limit():
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))
    with pytest.raises(ImageTooLargeError, match="exceeds the limit of 1,000 .*SAM3D_MAX_PIXELS"):
        load_image(bomb, source="bomb.png", max_pixels=1000)


@pytest.mark.slow
def test_presigned_links_expire_after_the_setting(s3, monkeypatch):
    _, bucket = s3
    store = open_storage(f"s3://{bucket}/out")
    expires = parse_qs(urlparse(store.link("a/result.json")).query)
    assert expires["X-Amz-Expires"] == ["3600"]  # the short default, not 7 days
    monkeypatch.setenv("SAM3D_LINK_EXPIRES_S", "120")
    link = open_storage(f"s3://{bucket}/out", Settings()).link("k")
    assert parse_qs(urlparse(link).query)["X-Amz-Expires"] == ["120"]
