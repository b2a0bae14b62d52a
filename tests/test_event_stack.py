"""End to end through the local stack: S3 PUT → notification → SQS → events bridge → Prefect event →
deployment trigger → worker → image-to-3d (lite backends) → outputs under the expected prefix.

The tests share the session's stack (the ``stack`` fixture in ``conftest.py``): ``sam3d-pipeline up`` (moto,
Prefect server on SQLite, process worker, events bridge, web server) in a temporary state dir, stopped with
``sam3d-pipeline down``, which is checked by PID to leave nothing running. The notification covers the whole
bucket (no upload prefix), so the pipeline's own outputs and markers reach the bridge too and must be ignored there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sam3d_pipeline.keys import image_stem
from sam3d_pipeline.stack.local import read_stack

from .clips import encode as encode_clip
from .clips import moving_object
from .photos import encode, object_photo, three_objects_photo

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "sam3d_pipeline.cli"]


def test_env_file_and_up_twice_starts_nothing(stack):
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                 "PREFECT_API_URL", "SAM3D_BUCKET", "SAM3D_UPLOAD_PREFIX", "SAM3D_OUTPUT_PREFIX"):
        assert name in stack.env
    before = read_stack(stack.state_dir)["processes"]
    again = subprocess.run([*CLI, "up", "--state-dir", str(stack.state_dir)], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0 and "already running" in again.stdout
    assert read_stack(stack.state_dir)["processes"] == before


def test_review_server_is_part_of_the_stack(stack):
    import requests

    url = stack.env["SAM3D_REVIEW_PAGE_URL"]
    assert requests.get(f"{url}/api/runs", timeout=10).status_code == 401
    listed = requests.get(f"{url}/api/runs", headers={"Authorization": f"Bearer {stack.env['SAM3D_REVIEW_TOKEN']}"},
                          timeout=10)
    assert listed.status_code == 200 and isinstance(listed.json(), list)
    assert "review-server" in read_stack(stack.state_dir)["processes"]


def test_uploads_start_one_completed_run_each(stack):
    tag = uuid.uuid4().hex[:6]
    uploads = {  # key → (prompt metadata, expected prompt)
        f"photos {tag}/red chair.png": ("red chair", "red chair"),
        f"photos{tag}/a+b=c.png": (None, "object"),  # deployment default
        f"фото-{tag}/ünïcödé 椅子.png": ("stuhl", "stuhl"),
        f"mugs/{tag}/deep/nested/cup.PNG": (None, "mug"),  # SAM3D_PROMPT_BY_PREFIX
    }
    images = {stack.put(key, seed=i, prompt=meta): (key, expected)
              for i, (key, (meta, expected)) in enumerate(uploads.items())}
    finished = stack.wait_finished(list(images))
    for image, runs in finished.items():
        key, expected_prompt = images[image]
        assert len(runs) == 1, f"{key}: {len(runs)} runs"
        (run,) = runs
        assert run["state_type"] == "COMPLETED", (run["state_name"], (run.get("state") or {}).get("message"))
        assert run["parameters"]["prompt"] == expected_prompt
        prefix, result = stack.result(run)
        assert prefix.startswith(f"{stack.env['SAM3D_OUTPUT_PREFIX']}{image_stem(key)}-")
        assert result["status"] == "completed" and result["prompt"] == expected_prompt
        assert result["input"]["uri"] == image
        assert result["segmenter"]["name"] == "lite" and result["reconstructor"]["name"] == "lite"
        names = {o["Key"].rsplit("/", 1)[1] for o in
                 stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix=prefix)["Contents"]}
        assert {"mask.png", "overlay.png", "object.glb", "preview.png", "result.json"} <= names
        # Each run's process was forked from the stack's warm flow-run server (stack/warm_runs.py), not started.
        assert f"flow run {run['id']} in pid " in (stack.state_dir / "logs" / "warm-runs.log").read_text()
    # The runs wrote PNGs under the output root; the bucket-wide notification sent them to the bridge too.
    stack.wait_log(f"under the pipeline's own prefix s3://{stack.bucket}/{stack.env['SAM3D_OUTPUT_PREFIX']}")


def test_a_burst_of_uploads_shares_the_warm_gpu_worker(stack):
    """8 uploads at once: 8 completed results, exactly once each, every model stage on the stack's GPU worker
    sessions, and each (session, stage) loads its model for one photo at most."""
    from collections import Counter

    assert stack.env["SAM3D_GPU_STAGES"] == "workers"
    tag = uuid.uuid4().hex[:6]
    images = [stack.put(f"burst-{tag}/photo {i}.png", seed=200 + i, prompt="thing") for i in range(8)]
    finished = stack.wait_finished(images, timeout_s=400)
    loads: Counter = Counter()
    prefixes = set()
    for image, runs in finished.items():
        assert len(runs) == 1 and runs[0]["state_type"] == "COMPLETED", (
            image, [(r["state_type"], (r.get("state") or {}).get("message")) for r in runs])
        prefix, result = stack.result(runs[0])
        prefixes.add(prefix)
        assert result["status"] == "completed" and set(result["stages"]) == {"segment", "reconstruct"}
        for stage, info in result["stages"].items():
            assert info["worker"] != "inline" and info["queue_wait_s"] >= 0
            loads[(info["worker"], stage)] += info["model_load_s"] > 0
    assert len(prefixes) == 8
    assert loads and all(n <= 1 for n in loads.values()), loads


def test_a_catalog_with_a_clip_and_every_object_runs_on_the_stacks_gpu_workers(stack, tmp_path):
    """A manifest with a video row, an instances=all row and plain photos, through ``up``'s workers: every item's
    stages ran on a worker session, the clip has its video section, the three-object photo one object folder per
    object found."""
    clip = moving_object(40)
    (tmp_path / "spin.mp4").write_bytes(encode_clip(clip.frames, "mp4"))
    (tmp_path / "three.png").write_bytes(encode(three_objects_photo()[0]))
    for i in range(2):
        (tmp_path / f"item {i}.png").write_bytes(encode(object_photo(160, 120, seed=300 + i)[0]))
    (tmp_path / "items.csv").write_text("image,prompt,instances\nspin.mp4,red disc,\nthree.png,discs,all\n"
                                        "item 0.png,item,\nitem 1.png,item,\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_", "SAM3D_"))} | stack.env
    out = f"s3://{stack.bucket}/catalog-{uuid.uuid4().hex[:6]}"
    done = subprocess.run([*CLI, "catalog", str(tmp_path / "items.csv"), "--out", out, "--batch-size", "2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    bucket_prefix = out.split("/", 3)[3]
    index = json.loads(stack.s3.get_object(Bucket=stack.bucket, Key=f"{bucket_prefix}/catalog.json")["Body"].read())
    assert index["counts"]["completed"] == 4, index["counts"]
    results = {}
    for item in index["items"]:
        key = f"{item['output_prefix'].split('/', 3)[3]}/result.json"
        results[item["id"]] = result = json.loads(stack.s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read())
        assert set(result["stages"]) == {"segment", "reconstruct"}
        assert "inline" not in {info["worker"] for info in result["stages"].values()}, result["stages"]
    spin, three = results["spin"], results["three"]
    assert spin["video"]["frames_sampled"] == 40 and clip.whole(spin["video"]["chosen"]["index"])
    assert {"frame.png", "track.webp", "object.glb"} <= set(spin["outputs"])
    assert sorted(o["index"] for o in three["objects"]) == [0, 1, 2]
    three_prefix = next(i["output_prefix"] for i in index["items"] if i["id"] == "three").split("/", 3)[3]
    folders = {o["Key"][len(three_prefix):].split("/")[2] for o in stack.s3.list_objects_v2(
        Bucket=stack.bucket, Prefix=f"{three_prefix}/objects/")["Contents"]}
    assert folders == {"0", "1", "2"}


def test_an_uploaded_clip_is_tracked_and_reconstructed_on_the_stacks_gpu_workers(stack):
    """A clip PUT into the bucket: one run, the clip tracked on a GPU worker session (the segment stage) and its
    chosen frame reconstructed there, ``result.json`` with its ``video`` section, the track and the chosen frame
    published; a truncated clip fails at once with the reason in the run's state, and is not retried."""
    tag = uuid.uuid4().hex[:6]
    clip = moving_object(45)
    good = stack.put_bytes(f"clips-{tag}/turntable.mp4", encode_clip(clip.frames, "mp4"), prompt="red disc")
    broken = stack.put_bytes(f"clips-{tag}/broken.mp4", encode_clip(clip.frames, "mp4")[:3000], prompt="red disc")
    finished = stack.wait_finished([good, broken], timeout_s=400)
    (run,) = finished[good]
    assert run["state_type"] == "COMPLETED", (run["state_name"], (run.get("state") or {}).get("message"))
    prefix, result = stack.result(run)
    assert result["status"] == "completed" and result["input"]["uri"] == good
    assert result["video"]["frames_sampled"] == 45 and clip.whole(result["video"]["chosen"]["index"])
    assert set(result["stages"]) == {"segment", "reconstruct"}
    assert "inline" not in {info["worker"] for info in result["stages"].values()}, result["stages"]
    names = {o["Key"].rsplit("/", 1)[1] for o in
             stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix=prefix)["Contents"]}
    assert {"frame.png", "track.webp", "object.glb", "mask.png", "result.json"} <= names
    (bad,) = finished[broken]
    assert bad["state_type"] == "FAILED" and bad["run_count"] == 1, bad
    assert "video" in bad["state"]["message"].lower(), bad["state"]["message"]


def test_redelivery_and_reupload_of_same_bytes_start_one_run(stack):
    key = f"dup-{uuid.uuid4().hex[:6]}/photo.png"
    image = stack.put(key, seed=7)
    (run,) = stack.wait_finished([image])[image]
    assert run["state_type"] == "COMPLETED"
    etag = stack.s3.head_object(Bucket=stack.bucket, Key=key)["ETag"].strip('"')
    redelivered = {"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "eventTime": "2026-11-25T08:00:00.000Z",
        "s3": {"bucket": {"name": stack.bucket}, "object": {"key": key.replace("/", "%2F"), "size": 1, "eTag": etag,
                                                             "sequencer": "00AA"}},
    }]}
    stack.sqs.send_message(QueueUrl=stack.env["SAM3D_QUEUE_URL"], MessageBody=json.dumps(redelivered))
    stack.put(key, seed=7)  # the same bytes again: a new notification with the same ETag
    stack.wait_log(f"duplicate s3://{stack.bucket}/{key}", count=2)
    time.sleep(3)  # give a (wrong) second run time to appear
    assert len(stack.runs(image)) == 1


def test_upload_under_output_root_starts_nothing(stack):
    key = f"{stack.env['SAM3D_OUTPUT_PREFIX']}manual-{uuid.uuid4().hex[:6]}/photo.png"
    image = stack.put(key, seed=3)
    stack.wait_log(f"skip s3://{stack.bucket}/{key}: under the pipeline's own prefix")
    time.sleep(2)
    assert stack.runs(image) == []


def test_malformed_message_is_logged_and_the_bridge_keeps_working(stack):
    pid = stack.bridge_pid()
    queue = stack.env["SAM3D_QUEUE_URL"]
    before = stack.bridge_log.read_text().count("malformed SQS message")
    stack.sqs.send_message(QueueUrl=queue, MessageBody="this is not an S3 event")
    stack.sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"Records": [{"eventSource": "aws:s3"}]}))
    stack.wait_log("malformed SQS message", count=before + 2)
    image = stack.put(f"after-malformed-{uuid.uuid4().hex[:6]}.png", seed=11)
    (run,) = stack.wait_finished([image])[image]
    assert run["state_type"] == "COMPLETED"
    assert stack.bridge_pid() == pid and Path(f"/proc/{pid}").exists()


def test_bridge_killed_mid_stream_loses_and_doubles_nothing(stack):
    tag = uuid.uuid4().hex[:6]
    images = []
    for i in range(6):
        images.append(stack.put(f"stream-{tag}/{i}.png", seed=100 + i))
        if i == 1:
            os.killpg(stack.bridge_pid(), signal.SIGKILL)  # mid-stream, possibly mid-message
        time.sleep(0.3)
    stack.restart_bridge()
    finished = stack.wait_finished(images)
    for image, runs in finished.items():
        assert len(runs) == 1, f"{image}: {len(runs)} runs"
        assert runs[0]["state_type"] == "COMPLETED"


def test_lambda_handler_posts_the_eventbridge_event(stack, monkeypatch):
    bucket = f"lambda-{uuid.uuid4().hex[:8]}"  # no notification on this bucket: only the handler sees it
    stack.s3.create_bucket(Bucket=bucket)
    rgb, _ = object_photo(160, 120, seed=21)
    key = "inbox/lamp shade.png"
    put = stack.s3.put_object(Bucket=bucket, Key=key, Body=encode(rgb), Metadata={"prompt": "lamp"})
    for name in ("AWS_ENDPOINT_URL", "PREFECT_API_URL", "SAM3D_OUTPUT_ROOT", "SAM3D_EVENT_MARKER_ROOT"):
        monkeypatch.setenv(name, stack.env[name])
    spec = importlib.util.spec_from_file_location("lambda_handler", ROOT / "deployments" / "lambda" / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    event = {
        "version": "0", "id": str(uuid.uuid4()), "detail-type": "Object Created", "source": "aws.s3",
        "time": "2026-11-25T08:00:00Z", "region": "us-east-1",
        "detail": {"bucket": {"name": bucket}, "object": {"key": "inbox/lamp+shade.png", "size": 1,
                                                          "etag": put["ETag"].strip('"'), "sequencer": "01"}},
    }
    first = module.handler(event, None)
    assert len(first["posted"]) == 1
    assert module.handler(event, None)["posted"] == []  # a retried invocation: the marker says done
    image = f"s3://{bucket}/{key}"
    (run,) = stack.wait_finished([image])[image]
    assert run["state_type"] == "COMPLETED" and run["parameters"]["prompt"] == "lamp"
