"""Inputs that cannot exhaust memory or end in a 500, and states and keys that tell the truth (issue "Hardening II":
prompt counts, JSON depth, invisible prompts, long names, output roots, the output hash, catalog states)."""

from __future__ import annotations

import json
import os
import time

import pytest
from pydantic import ValidationError

from sam3d_pipeline import catalog, jsonsafe
from sam3d_pipeline.errors import InputError
from sam3d_pipeline.keys import STEM_MAX_BYTES, image_stem
from sam3d_pipeline.run import pipeline
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import LocalStorage
from sam3d_pipeline.types import MAX_BOXES, MAX_POINTS
from sam3d_pipeline.web import jobs

from .photos import encode, object_photo

ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"


@pytest.fixture
def client(tmp_path, monkeypatch):
    """The web app in process with no Prefect API: every refusal below happens before any run exists."""
    from fastapi.testclient import TestClient

    from sam3d_pipeline.web.app import create_app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr("sam3d_pipeline.review.prefect_api.api_url", lambda: None)
    app = create_app(["tok"], Settings(output_root=str(tmp_path), max_input_bytes=40_000_000), deliver_webhooks=False)
    return TestClient(app, raise_server_exceptions=False)


AUTH = {"Authorization": "Bearer tok"}


def test_prompt_counts_are_bounded_everywhere():
    points = [{"x": 1, "y": 1}] * (MAX_POINTS + 1)
    with pytest.raises(ValidationError, match=f"at most {MAX_POINTS}"):
        pipeline.RunOptions(prompt="cup", points=points)
    with pytest.raises(ValidationError, match=f"at most {MAX_BOXES}"):
        pipeline.RunOptions(prompt="cup", boxes=[[0, 0, 5, 5]] * (MAX_BOXES + 1))
    pipeline.RunOptions(prompt="cup", points=points[:MAX_POINTS], boxes=[[0, 0, 5, 5]] * MAX_BOXES)
    with pytest.raises(jobs.JobRequestError, match=f"points: .*at most {MAX_POINTS}"):
        jobs.parse_request({"prompt": "cup", "points": json.dumps(points)})


def test_a_million_points_are_refused_at_once_without_echoing_the_body(client, caplog):
    body = json.dumps({"image": "s3://b/k.png", "prompt": "cup", "points": [{"x": 1, "y": 2}] * 1_000_000})
    started = time.perf_counter()
    answer = client.post("/v1/jobs", headers=AUTH | {"Content-Type": "application/json"}, content=body)
    elapsed = time.perf_counter() - started
    assert answer.status_code == 422 and f"at most {MAX_POINTS}" in answer.json()["detail"]
    assert len(answer.text) < 500 and elapsed < 30
    assert all(len(r.getMessage()) < 2000 for r in caplog.records)  # no log line carries the request


def test_deep_json_is_a_422_not_a_500(client):
    png = encode(object_photo(64, 48)[0])
    deep_field = client.post("/v1/jobs", headers=AUTH, files={"image": ("p.png", png)},
                             data={"prompt": "cup", "boxes": "[" * 5000 + "]" * 5000})
    assert deep_field.status_code == 422 and "nested deeper" in deep_field.json()["detail"]
    deep_body = client.post("/v1/jobs", headers=AUTH | {"Content-Type": "application/json"},
                            content="[" * 100_000 + "]" * 100_000)
    assert deep_body.status_code == 422 and "nested deeper" in deep_body.json()["detail"]
    with pytest.raises(jsonsafe.JSONLimitError):
        jsonsafe.loads('{"a": NaN}')


@pytest.mark.parametrize("prompt", [ZERO_WIDTH, " \u200b \t\ufeff", "\u2060" * 40])
def test_a_prompt_of_invisible_characters_is_blank(client, prompt):
    with pytest.raises(ValidationError, match="blank"):
        pipeline.RunOptions(prompt=prompt)
    png = encode(object_photo(64, 48)[0])
    answer = client.post("/v1/jobs", headers=AUTH, files={"image": ("p.png", png)}, data={"prompt": prompt})
    assert answer.status_code == 422 and "blank" in answer.json()["detail"]
    assert pipeline.RunOptions(prompt=f"{ZERO_WIDTH} red\u200bchair {ZERO_WIDTH}").prompt == "red\u200bchair"
    rows = catalog.parse_manifest(f"image,prompt\na.png,{ZERO_WIDTH}\n", fmt="csv", source="m.csv",
                                  default_prompt="fallback")
    assert rows[0].item.prompt == "fallback"


def test_long_unicode_names_are_cut_by_bytes(tmp_path):
    name = "\U00020000" * 62 + ".jpg"  # 62 four-byte letters: 248 bytes
    stem = image_stem(f"photos/{name}")
    assert len(stem.encode()) <= STEM_MAX_BYTES and stem == "\U00020000" * (STEM_MAX_BYTES // 4)
    storage = LocalStorage(tmp_path)
    storage.write_bytes(f"{stem}-0123456789ab/result.json", b"{}")  # no "File name too long"
    assert image_stem("x/" + "\u00e9" * 63 + ".png") == "\u00e9" * (STEM_MAX_BYTES // 2)


def test_an_output_root_that_resolves_to_a_system_folder_is_refused(tmp_path):
    link = tmp_path / "out"
    os.symlink("/", link)
    with pytest.raises(InputError, match="resolves to /"):
        LocalStorage(link)
    os.symlink("/etc", tmp_path / "etc-link")
    with pytest.raises(InputError, match="resolves to /etc"):
        LocalStorage(tmp_path / "etc-link" / "sub")
    assert LocalStorage(tmp_path / "fine").root == str(tmp_path / "fine")


@pytest.mark.parametrize(("segmenter", "reconstructor", "setting", "value"), [
    ("sam3", "lite", "sam3_confidence_threshold", 0.2),
    ("lite", "lite", "lite_work_size_px", 256),
    ("lite", "lite", "preview_size_px", 300),
    ("lite", "lite", "lite_mesh_resolution", 40),
])
def test_the_output_hash_covers_settings_that_change_the_output(segmenter, reconstructor, setting, value):
    options = pipeline.RunOptions(prompt="cup", segmenter=segmenter, reconstructor=reconstructor)
    base = Settings(sam3_random_init=True, gpu_stages="workers")
    before = pipeline.plan("s3://b/cup.png", "sha256:" + "0" * 64, options, "s3://b/out", base).prefix
    after = pipeline.plan("s3://b/cup.png", "sha256:" + "0" * 64, options, "s3://b/out",
                          base.model_copy(update={setting: value})).prefix
    assert before != after
    again = pipeline.plan("s3://b/cup.png", "sha256:" + "0" * 64, options, "s3://b/out", base).prefix
    assert again == before


def test_a_catalog_with_failed_items_says_so_in_its_state():
    outcome = {"counts": {"completed": 7, "skipped": 1, "no_object": 1, "failed": 2}, "items": [{}] * 11,
               "catalog": "s3://b/out/catalog.json"}
    message = catalog.failure_message(outcome)
    assert message.startswith("catalog: 2 of 11 item(s) failed") and "s3://b/out/catalog.json" in message
    assert catalog.failure_message({**outcome, "counts": {**outcome["counts"], "failed": 0}}) is None
