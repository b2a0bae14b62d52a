"""The SAM 3 GPU worker exactly as the image, the pool and the deployment configure it, run here on the CPU.

The session's environment is read from ``gpu_worker/sam3.Dockerfile``'s ``ENV``, the GPU pool's job template and
the ``gpu-worker-sam3`` deployment (``tests/gpu_image.py``; only the checkpoint folder and the project folder are
relocated). Its checkpoints are laid out as ``gpu_worker/README.md`` says, with their manifest, on a local S3
(moto), and fetched by the image's own entry point (``gpu_worker/entrypoint.sh`` → ``fetch_checkpoints.py``). The
SAM 3 checkpoint is a real ``sam3.pt``: the state dict of a randomly initialised model in upstream's key layout
(``detector.*``, ``tracker.*``; ``sam3/model_builder.py:_load_checkpoint``), so upstream's own loader reads it.
Its vocabulary is found the way the image finds it. Task parameters and results go through the S3 block the pool
names (``s3-bucket/sam3d-task-storage``), on the same local S3. The orchestrating side (this process) declares
the weights' sha256 and has no checkpoint: what ``result.json`` says comes from the worker that ran the stage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("sam3")
pytest.importorskip("prefect_aws")

from sam3d_pipeline import checkpoints
from sam3d_pipeline.samples import sample_path  # noqa: E402

from .gpu_image import ROOT, process_env, session_env, template_env  # noqa: E402

pytestmark = pytest.mark.slow

DOCKERFILE = ROOT / "gpu_worker" / "sam3.Dockerfile"
DEPLOYMENT = "gpu-worker-sam3"
TASK_STORAGE_BLOCK = "sam3d-task-storage"

# Upstream's checkpoint layout: the image model's keys under ``detector.``, the interactive predictor's
# (``inst_interactive_predictor.model.*`` in the built model) under ``tracker.``.
WRITE_SAM3_PT = r"""
import sys, torch
from sam3d_pipeline.backends.sam3.segmenter import load_model
from sam3d_pipeline.settings import Settings
model = load_model(Settings(sam3_random_init=True, sam3_device="cpu")).model
tracker = "inst_interactive_predictor.model."
ckpt = {}
for key, value in model.state_dict().items():
    ckpt["tracker." + key[len(tracker):] if key.startswith(tracker) else "detector." + key] = value
assert not any("tracker" in k and "detector" in k for k in ckpt), "keys the loader would route twice"
torch.save({"model": ckpt}, sys.argv[1])
print(len(ckpt), "tensors")
"""


@pytest.fixture(scope="module")
def checkpoint_bucket(moto_server, tmp_path_factory):
    """The image's checkpoint folder (``sam3/sam3.pt`` + ``manifest.json``) on the local S3."""
    import boto3

    src = tmp_path_factory.mktemp("checkpoints-src")
    (src / "sam3").mkdir()
    done = subprocess.run([sys.executable, "-c", WRITE_SAM3_PT, str(src / "sam3" / "sam3.pt")], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = checkpoints.build_manifest(src)
    (src / checkpoints.MANIFEST).write_text(json.dumps(manifest))
    client = boto3.client("s3", endpoint_url=moto_server.url)
    bucket = f"ckpt-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"checkpoints/v1/{path.relative_to(src).as_posix()}")
    (src / "sam3" / "sam3.pt").unlink()  # only the S3 copy remains: the worker must fetch it
    sha = next(e["sha256"] for e in manifest["files"] if e["path"] == "sam3/sam3.pt")
    yield SimpleNamespace(client=client, bucket=bucket, uri=f"s3://{bucket}/checkpoints/v1", sha256=sha,
                          endpoint=moto_server.url)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])


@pytest.fixture(scope="module")
def task_storage(prefect_server, checkpoint_bucket):
    """The S3 block the pool names for task parameters and results, on the local S3."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    bucket = f"tasks-{uuid.uuid4().hex[:10]}"
    checkpoint_bucket.client.create_bucket(Bucket=bucket)
    S3Bucket(bucket_name=bucket, credentials=AwsCredentials(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=checkpoint_bucket.endpoint)),
    ).save(TASK_STORAGE_BLOCK, overwrite=True)
    return bucket


SESSION = [sys.executable, "-m", "sam3d_pipeline.cli", "gpu-worker", "--idle-s", "1800"]


class ImageSession:
    """A gpu-worker session with the image's environment, through ``gpu_worker/entrypoint.sh`` by default."""

    def __init__(self, env: dict[str, str], log_path: Path,
                 argv: tuple[str, ...] = ("bash", str(ROOT / "gpu_worker" / "entrypoint.sh"), *SESSION)) -> None:
        self.env, self.log_path, self.argv = env, log_path, list(argv)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 900) -> ImageSession:
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while "waiting for gpu-" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the image's session did not start:\n{self.text()[-4000:]}")
            time.sleep(0.5)
        return self

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def sam3_session(checkpoint_bucket, task_storage, tmp_path_factory):
    from prefect.settings import get_current_settings

    folder = tmp_path_factory.mktemp("image")
    declared = {"SAM3D_SAM3_CHECKPOINT_SHA256": checkpoint_bucket.sha256}
    image_env = session_env(DOCKERFILE, DEPLOYMENT, folder / "opt-checkpoints", deploy_env=declared)
    env = process_env(image_env, PREFECT_API_URL=str(get_current_settings().api.url),
                      AWS_ENDPOINT_URL=checkpoint_bucket.endpoint, PREFECT_LOGGING_LEVEL="INFO",
                      SAM3D_CHECKPOINT_URI=checkpoint_bucket.uri)  # the pool's setting to fetch at start
    session = ImageSession(env, folder / "session.log").start()
    yield SimpleNamespace(session=session, image_env=image_env, checkpoints=folder / "opt-checkpoints",
                          sha256=checkpoint_bucket.sha256, bucket=task_storage)
    session.stop()


@pytest.fixture
def orchestrator(sam3_session, checkpoint_bucket, monkeypatch):
    """This process as the orchestrating pool: workers mode, the weights declared, no checkpoint, same blocks."""
    from prefect.settings import (
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK,
        PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK,
        temporary_settings,
    )

    for name in [k for k in os.environ if k.startswith("SAM3D_SAM3_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SAM3D_GPU_STAGES", "workers")
    monkeypatch.setenv("SAM3D_GPU_POLL_S", "0.5")
    monkeypatch.setenv("SAM3D_GPU_STAGE_TIMEOUT_S", "900")
    monkeypatch.setenv("SAM3D_SAM3_CHECKPOINT_SHA256", sam3_session.sha256)
    monkeypatch.setenv("AWS_ENDPOINT_URL", checkpoint_bucket.endpoint)
    block = f"s3-bucket/{TASK_STORAGE_BLOCK}"
    with temporary_settings({PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK: block,
                             PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: block}):
        yield sam3_session


def _photo_on_s3(client, bucket: str) -> str:
    key = f"photos/coffee-{uuid.uuid4().hex[:6]}.jpg"
    client.put_object(Bucket=bucket, Key=key, Body=Path(sample_path("coffee")).read_bytes())
    return f"s3://{bucket}/{key}"


def test_the_image_configures_sam3_and_its_checkpoints(sam3_session):
    """What the image's environment says is where the entry point put the files."""
    env = sam3_session.image_env
    assert env["SAM3D_GPU_STAGES"] == "workers" and env["SAM3D_SEGMENTER"] == "sam3"
    assert Path(env["SAM3D_SAM3_CHECKPOINT"]) == sam3_session.checkpoints / "sam3" / "sam3.pt"
    assert Path(env["SAM3D_SAM3_CHECKPOINT"]).is_file()
    assert env["SAM3D_CHECKPOINT_DIR"] == str(sam3_session.checkpoints)
    assert env.get("HF_HUB_OFFLINE") == "1"
    listed = [e["path"] for e in checkpoints.read_manifest(sam3_session.checkpoints)]
    assert listed == ["sam3/sam3.pt"]


def test_sam3_segments_on_the_worker_and_writes_the_review_assets(orchestrator, checkpoint_bucket):
    """A segment stage with review assets, submitted as the flows submit it, runs on the image's session with
    the fetched real-format checkpoint; the identity in the stage's output is the worker's own."""
    from prefect import flow

    from sam3d_pipeline.backends.sam3 import clickdecoder
    from sam3d_pipeline.run import pipeline
    from sam3d_pipeline.settings import get_settings
    from sam3d_pipeline.storage import open_storage
    from tasks import gpu_dispatch

    client, bucket = checkpoint_bucket.client, orchestrator.bucket
    photo = _photo_on_s3(client, bucket)
    out = f"s3://{bucket}/outputs"

    @flow(name="real-config-segment")
    def segment_here() -> dict:
        settings = get_settings()
        data = pipeline.read_bytes(photo, settings)
        image = pipeline.decode(data, photo, settings)
        options = pipeline.RunOptions(prompt="coffee cup", segmenter="sam3", reconstructor="lite")
        plan = pipeline.plan(photo, pipeline.content_id(data), options, out, settings, review_mode="page")
        seg = gpu_dispatch.segment(image, options, plan, settings, out, review_assets=True)
        return {"prefix": plan.prefix, "planned": plan.segmenter_info, "ran": seg.backend.as_dict()}

    got = segment_here()
    ran, planned = got["ran"], got["planned"]
    assert ran["name"] == "sam3" and ran["weights"] == "checkpoint" and ran["device"] == "cpu"
    assert ran["checkpoint_sha256"] == orchestrator.sha256[:12] and ran["dtype"] == "float32"
    assert planned["version"] == ran["version"] == f"sam3-0.1.4+{orchestrator.sha256[:12]}"
    storage = open_storage(out)
    assert storage.exists(f"{got['prefix']}/stages/segment/segmentation.json")
    for key in (clickdecoder.embeddings_key(got["prefix"]), clickdecoder.decoder_key(ran["version"])):
        assert storage.exists(key), key
    summary = json.loads(storage.read_bytes(f"{got['prefix']}/stages/segment/segmentation.json"))
    assert summary["backend"] == ran  # the stage's own record of what ran


def test_a_worker_with_other_weights_refuses_the_stage(orchestrator, checkpoint_bucket, monkeypatch):
    """The submitter declares weights the worker does not have: the stage fails at once, naming both."""
    from prefect import flow

    from sam3d_pipeline.errors import BackendUnavailableError
    from sam3d_pipeline.run import pipeline
    from sam3d_pipeline.settings import get_settings
    from tasks import gpu_dispatch

    monkeypatch.setenv("SAM3D_SAM3_CHECKPOINT_SHA256", "ab" * 32)
    photo = _photo_on_s3(checkpoint_bucket.client, orchestrator.bucket)
    out = f"s3://{orchestrator.bucket}/outputs"

    @flow(name="real-config-mismatch")
    def segment_here() -> None:
        settings = get_settings()
        data = pipeline.read_bytes(photo, settings)
        options = pipeline.RunOptions(prompt="coffee cup", segmenter="sam3", reconstructor="lite")
        plan = pipeline.plan(photo, pipeline.content_id(data), options, out, settings)
        gpu_dispatch.segment(pipeline.decode(data, photo, settings), options, plan, settings, out)

    started = time.monotonic()
    with pytest.raises(BackendUnavailableError) as caught:
        segment_here()
    message = str(caught.value)
    assert "identity mismatch" in message and "abababababab" in message and orchestrator.sha256[:12] in message
    assert time.monotonic() - started < 120  # permanent: not retried


@pytest.fixture(scope="module")
def reconstruct_session(sam3_session, checkpoint_bucket, tmp_path_factory):
    """A lite reconstruct session beside the SAM 3 one (the SAM 3D Objects image needs CUDA): the pool's env, with
    this deployment's stage."""
    from prefect.settings import get_current_settings

    env = process_env(template_env() | {"SAM3D_GPU_WORKER_STAGES": "reconstruct"},
                      PREFECT_API_URL=str(get_current_settings().api.url), AWS_ENDPOINT_URL=checkpoint_bucket.endpoint,
                      PREFECT_LOGGING_LEVEL="INFO")
    session = ImageSession(env, tmp_path_factory.mktemp("lite") / "session.log", argv=tuple(SESSION)).start(120)
    yield session
    session.stop()


def test_result_json_names_what_the_worker_ran(orchestrator, reconstruct_session, checkpoint_bucket):
    """image-to-3d in workers mode: the submitter has no checkpoint (only the declared sha256); result.json's
    segmenter is what the SAM 3 session reported (weights, sha256, device, dtype), its reconstructor the lite one's."""
    from flows.image_to_3d import image_to_3d
    from sam3d_pipeline.storage import open_storage

    photo = _photo_on_s3(checkpoint_bucket.client, orchestrator.bucket)
    out = f"s3://{orchestrator.bucket}/outputs"
    state = image_to_3d(image=photo, prompt="coffee cup", output_root=out, segmenter="sam3", reconstructor="lite",
                        return_state=True)
    assert state.is_completed() or "no_object" in str(state.message), state.message
    result = state.result(raise_on_failure=False)
    on_s3 = json.loads(open_storage(out).read_bytes(f"{result['output_prefix'].rsplit('/', 1)[-1]}/result.json"))
    seg = on_s3["segmenter"]
    assert seg["name"] == "sam3" and seg["weights"] == "checkpoint" and seg["device"] == "cpu"
    assert seg["checkpoint_sha256"] == orchestrator.sha256[:12] and seg["dtype"] == "float32"
    assert seg["version"] == f"sam3-0.1.4+{orchestrator.sha256[:12]}" and "GPU workers" in seg["chosen_because"]
    assert on_s3["stages"]["segment"]["worker"] != on_s3["stages"].get("reconstruct", {}).get("worker")
