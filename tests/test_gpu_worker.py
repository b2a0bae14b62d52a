"""gpu_worker/: Dockerfile pins and lint, checkpoint fetch against moto S3, and the smoke script's preflight."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from sam3d_pipeline import checkpoints
from sam3d_pipeline.backends import sam3d_reconstructor
from sam3d_pipeline.errors import InputError

ROOT = Path(__file__).parents[1]
DOCKERFILE = ROOT / "gpu_worker" / "Dockerfile"


def _args() -> dict[str, str]:
    """``ARG NAME=value`` lines of the Dockerfile."""
    return dict(re.findall(r"^ARG ([A-Z0-9_]+)=(\S*)$", DOCKERFILE.read_text(), flags=re.M))


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement(name: str, reqs: list[str]) -> Requirement:
    [req] = [Requirement(r) for r in reqs if Requirement(r).name == name]
    return req


def test_dockerfile_pins_agree_with_pyproject():
    args = _args()
    project = _pyproject()["project"]
    assert Version(args["PREFECT_VERSION"]) in _requirement("prefect", project["dependencies"]).specifier
    assert Version(args["PREFECT_AWS_VERSION"]) in _requirement(
        "prefect-aws", project["optional-dependencies"]["aws"]).specifier
    assert Version(args["PYTHON_VERSION"] + ".0") in Requirement(f"x{project['requires-python']}").specifier
    sam3_reqs = [r for extra in project["optional-dependencies"].values() for r in extra
                 if Requirement(r).name == "sam3"]
    for req in sam3_reqs:  # the SAM 3 extra, where this build has one
        assert Version(args["SAM3_VERSION"]) in Requirement(req).specifier
    # One CUDA everywhere: base image, torch wheels, kaolin wheels.
    cuda = re.search(r"cuda:(\d+)\.(\d+)", args["CUDA_IMAGE"])
    assert args["TORCH_CUDA"] == f"cu{cuda[1]}{cuda[2]}"
    assert f"torch-{args['TORCH_VERSION']}_{args['TORCH_CUDA']}" in args["KAOLIN_FIND_LINKS"]
    # SAM 3D Objects at an exact commit, the one the adapter's interface was read at.
    assert re.fullmatch(r"[0-9a-f]{40}", args["SAM3D_OBJECTS_COMMIT"])
    assert sam3d_reconstructor.VERSION.endswith(args["SAM3D_OBJECTS_COMMIT"][:7])
    # Everything COPY'd exists; the entry point is executable.
    for src in re.findall(r"^COPY (\S+)", DOCKERFILE.read_text(), flags=re.M):
        assert (ROOT / src).exists(), src
    assert (ROOT / "gpu_worker" / "entrypoint.sh").stat().st_mode & 0o111
    assert "HF_HUB_OFFLINE=1" in DOCKERFILE.read_text()


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_shell_is_valid():
    subprocess.run(["bash", "-n", str(ROOT / "gpu_worker" / "entrypoint.sh")], check=True, timeout=30)


# -- checkpoints from S3 with a sha256 manifest -------------------------------------------------------------
@pytest.fixture
def checkpoint_prefix(s3, tmp_path):
    client, bucket = s3
    src = tmp_path / "src"
    files = {
        "sam-3d-objects/pipeline.yaml": b"ss_generator_ckpt_path: ss_generator.ckpt\n",
        "sam-3d-objects/ss_generator.ckpt": bytes(range(256)) * 4096,
        "sam3/sam3.pt": b"\x00sam3" * 1000,
        "torch/hub/checkpoints/dinov2_vitl14_reg4_pretrain.pth": b"dino" * 777,
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    manifest = checkpoints.build_manifest(src)
    prefix = f"checkpoints/{uuid.uuid4().hex[:8]}"
    for rel, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)
    client.put_object(Bucket=bucket, Key=f"{prefix}/manifest.json", Body=json.dumps(manifest))
    return client, bucket, prefix, files, manifest


def test_fetch_downloads_verifies_and_skips_what_matches(checkpoint_prefix, tmp_path):
    client, bucket, prefix, files, manifest = checkpoint_prefix
    dest = tmp_path / "ckpt"
    report = checkpoints.fetch(f"s3://{bucket}/{prefix}", dest)
    assert sorted(report.downloaded) == sorted(files) and report.present == []
    assert report.bytes_downloaded == sum(len(d) for d in files.values())
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data
    assert json.loads((dest / "manifest.json").read_text()) == manifest
    assert [e["sha256"] for e in manifest["files"]] == [
        hashlib.sha256(files[e["path"]]).hexdigest() for e in manifest["files"]]
    again = checkpoints.fetch(f"s3://{bucket}/{prefix}", dest)
    assert again.downloaded == [] and sorted(again.present) == sorted(files)
    # A locally damaged file is downloaded again.
    (dest / "sam3/sam3.pt").write_bytes(b"truncated")
    assert checkpoints.fetch(f"s3://{bucket}/{prefix}", dest).downloaded == ["sam3/sam3.pt"]
    assert not list(dest.rglob(".*.*"))  # no temporary files left


def test_fetch_refuses_an_object_that_does_not_match(checkpoint_prefix, tmp_path):
    client, bucket, prefix, files, _ = checkpoint_prefix
    client.put_object(Bucket=bucket, Key=f"{prefix}/sam3/sam3.pt", Body=b"tampered" * 10)
    dest = tmp_path / "ckpt"
    with pytest.raises(checkpoints.ChecksumError, match="sam3/sam3.pt"):
        checkpoints.fetch(f"s3://{bucket}/{prefix}", dest)
    assert not (dest / "sam3" / "sam3.pt").exists()
    assert not (dest / "manifest.json").exists()  # incomplete folder: no manifest
    assert list((dest / "sam3").iterdir()) == []  # and no partial file


def test_manifest_paths_cannot_escape(tmp_path):
    entry = {"size": 1, "sha256": "0" * 64}
    for bad in ("../etc/passwd", "/abs/path", "a/../../b"):
        with pytest.raises(InputError, match="relative"):
            checkpoints.parse_manifest(json.dumps({"version": 1, "files": [entry | {"path": bad}]}).encode(), "m")
    with pytest.raises(InputError, match="version"):
        checkpoints.parse_manifest(b'{"files": []}', "m")


@pytest.mark.slow
def test_fetch_script_end_to_end(checkpoint_prefix, tmp_path, moto_server):
    _, bucket, prefix, files, _ = checkpoint_prefix
    dest = tmp_path / "ckpt"
    script = ROOT / "gpu_worker" / "fetch_checkpoints.py"
    env = {"AWS_ENDPOINT_URL": moto_server.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, str(script), "fetch", f"s3://{bucket}/{prefix}", str(dest)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"{len(files)} downloaded" in run.stdout
    ok = subprocess.run([sys.executable, str(script), "verify", str(dest)], capture_output=True, text=True,
                        env=env, timeout=60)
    assert ok.returncode == 0 and f"{len(files)} checkpoint file(s) verified" in ok.stdout
    (dest / "sam3/sam3.pt").unlink()
    bad = subprocess.run([sys.executable, str(script), "verify", "--sizes-only", str(dest)], capture_output=True,
                         text=True, env=env, timeout=60)
    assert bad.returncode == 1 and "sam3/sam3.pt" in bad.stderr


def test_smoke_script_refuses_to_run_without_a_gpu():
    run = subprocess.run([sys.executable, str(ROOT / "gpu_worker" / "smoke.py")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert "gpu_worker image" in run.stderr or "no CUDA device" in run.stderr
