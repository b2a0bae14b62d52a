"""gpu_worker/: the two images' pins, install steps, environment and lint, checkpoint fetch against moto S3, and the
smoke script's preflight."""

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
GPU = ROOT / "gpu_worker"
SAM3_DOCKERFILE = GPU / "sam3.Dockerfile"
SAM3D_DOCKERFILE = GPU / "sam3d.Dockerfile"
DOCKERFILES = (SAM3_DOCKERFILE, SAM3D_DOCKERFILE)


def _args(dockerfile: Path) -> dict[str, str]:
    """``ARG NAME=value`` lines of a Dockerfile."""
    return dict(re.findall(r"^ARG ([A-Z0-9_]+)=(\S*)$", dockerfile.read_text(), flags=re.M))


def _env(dockerfile: Path) -> dict[str, str]:
    """Every ``ENV A=1 \\ B=2`` of a Dockerfile (the multi-line form the images use), later ones winning."""
    text = dockerfile.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.+)$", text, flags=re.M):
        env |= dict(pair.split("=", 1) for pair in line.split())
    return env


def _runs(dockerfile: Path) -> list[str]:
    """The ``RUN`` instructions, continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    return re.findall(r"^RUN (.+)$", text, flags=re.M)


def _constraints(name: str) -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in (GPU / name).read_text().splitlines() if line and not line.startswith("#")]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement(name: str, reqs: list[str]) -> Requirement:
    [req] = [Requirement(r) for r in reqs if Requirement(r).name == name]
    return req


def _pinned(req: Requirement) -> str:
    [spec] = req.specifier
    assert spec.operator == "==", req
    return spec.version


def test_both_images_pin_this_projects_orchestration_side():
    project = _pyproject()["project"]
    for dockerfile, constraints in ((SAM3_DOCKERFILE, "constraints-sam3.txt"),
                                    (SAM3D_DOCKERFILE, "constraints-sam3d.txt")):
        args = _args(dockerfile)
        pins = _constraints(constraints)
        assert Version(args["PREFECT_VERSION"]) in _requirement("prefect", project["dependencies"]).specifier
        assert Version(args["PREFECT_AWS_VERSION"]) in _requirement(
            "prefect-aws", project["optional-dependencies"]["aws"]).specifier
        assert _pinned(pins["prefect"]) == args["PREFECT_VERSION"]
        assert _pinned(pins["prefect-aws"]) == args["PREFECT_AWS_VERSION"]
        assert Version(args["PYTHON_VERSION"] + ".0") in Requirement(f"x{project['requires-python']}").specifier
        # Everything COPY'd exists; the entry point is shared and executable.
        for line in re.findall(r"^COPY (.+)$", dockerfile.read_text(), flags=re.M):
            for src in line.split()[:-1]:
                assert (ROOT / src).exists(), (dockerfile.name, src)
        assert 'ENTRYPOINT ["/opt/sam3d-pipeline/gpu_worker/entrypoint.sh"]' in dockerfile.read_text()
        assert "WORKDIR /opt/sam3d-pipeline\n" in dockerfile.read_text()
        # Each image bakes in (or fetches at start) only its own checkpoint parts.
        assert "--only \"${SAM3D_CHECKPOINT_PARTS}\"" in dockerfile.read_text()
        assert "id=aws,target=/root/.aws/credentials" in dockerfile.read_text()
    assert (GPU / "entrypoint.sh").stat().st_mode & 0o111
    assert not (GPU / "Dockerfile").exists()  # one image per model now


def test_sam3_image_is_what_sam3_asks_for_at_the_pyproject_pins():
    """SAM 3 (its README): Python >= 3.12, torch >= 2.7, CUDA >= 12.6; at the pyproject `sam3` extra's pins, whose
    PyPI torch wheel is the CUDA 13.0 build: the base image's CUDA is the wheel's."""
    args, env = _args(SAM3_DOCKERFILE), _env(SAM3_DOCKERFILE)
    extra = {Requirement(r).name: Requirement(r) for r in _pyproject()["project"]["optional-dependencies"]["sam3"]}
    pins = _constraints("constraints-sam3.txt")
    assert Version(args["PYTHON_VERSION"]) >= Version("3.12")
    for name, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION"), ("sam3", "SAM3_VERSION")):
        assert _pinned(extra[name]) == args[arg] == _pinned(pins[name]), name
    assert Version(args["TORCH_VERSION"]) >= Version("2.7")
    cuda = re.search(r"nvidia/cuda:(\d+\.\d+)\.\d+-", args["CUDA_IMAGE"])
    assert cuda and cuda[1] == args["TORCH_CUDA"] and Version(args["TORCH_CUDA"]) >= Version("12.6")
    assert "torch.version.cuda == '${TORCH_CUDA}'" in SAM3_DOCKERFILE.read_text()  # the build checks the wheel
    # sam3's own requirement (timm>=1.0.17) holds here; what the review assets and the vocabulary need is installed.
    assert Version(_pinned(pins["timm"])) in Requirement("timm>=1.0.17").specifier
    for name in ("open-clip-torch", "onnx", "onnxruntime", "psutil"):
        assert name in pins, name
    assert any('".[aws,sam3]"' in run for run in _runs(SAM3_DOCKERFILE))
    assert env["SAM3D_SAM3_CHECKPOINT"] == "/opt/checkpoints/sam3/sam3.pt"
    assert env["SAM3D_CHECKPOINT_DIR"] == "/opt/checkpoints" and env["SAM3D_CHECKPOINT_PARTS"] == "sam3"
    assert env["SAM3D_SEGMENTER"] == "sam3" and env["SAM3D_GPU_WORKER_STAGES"] == "segment"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "SAM3D_RECONSTRUCTOR" not in env
    # flows/ and tasks/ are not in the wheel: the image imports them from the project folder, and only from there.
    assert env["PYTHONPATH"] == env["SAM3D_PROJECT_DIR"] == "/opt/sam3d-pipeline"
    # One cv2: nothing in this image asks for opencv-python beside the project's headless one.
    assert "opencv-python" not in pins


def test_sam3d_image_keeps_upstreams_pins_and_builds_the_cuda_packages_without_isolation():
    args, env, text = _args(SAM3D_DOCKERFILE), _env(SAM3D_DOCKERFILE), SAM3D_DOCKERFILE.read_text()
    pins = _constraints("constraints-sam3d.txt")
    # One CUDA everywhere: base image, torch wheels, kaolin wheels; Python 3.11 as upstream's environment.
    cuda = re.search(r"cuda:(\d+)\.(\d+)", args["CUDA_IMAGE"])
    assert args["TORCH_CUDA"] == f"cu{cuda[1]}{cuda[2]}" and "-devel-" in args["CUDA_IMAGE"]  # nvcc for the builds
    assert args["PYTHON_VERSION"] == "3.11"
    assert f"torch-{args['TORCH_VERSION']}_{args['TORCH_CUDA']}" in args["KAOLIN_FIND_LINKS"]
    for name, version in (("torch", args["TORCH_VERSION"]), ("torchvision", args["TORCHVISION_VERSION"]),
                          ("torchaudio", args["TORCH_VERSION"])):
        assert _pinned(pins[name]) == f"{version}+{args['TORCH_CUDA']}", name
    # Upstream's pins that this project's requirements would otherwise move.
    assert _pinned(pins["timm"]) == "0.9.16" and _pinned(pins["av"]) == "12.0.0"
    assert _pinned(pins["opencv-python"]) == "4.9.0.80" and "opencv-python-headless" not in pins
    assert _pinned(pins["kaolin"]) == "0.17.0" and _pinned(pins["flash-attn"]) == "2.8.3"
    assert Version("2.0") not in pins["numpy"].specifier  # opencv-python 4.9 is built against NumPy 1.x
    # SAM 3D Objects at an exact commit, the one the adapter's interface was read at.
    assert re.fullmatch(r"[0-9a-f]{40}", args["SAM3D_OBJECTS_COMMIT"])
    assert sam3d_reconstructor.VERSION.endswith(args["SAM3D_OBJECTS_COMMIT"][:7])
    # Every install under the constraints; pytorch3d, flash_attn and gsplat import torch in their build scripts:
    # built without isolation, pytorch3d with its CUDA ops though the build sees no GPU.
    assert args["UV_CONSTRAINT"] == "/opt/constraints-sam3d.txt" and args["FORCE_CUDA"] == "1"
    assert env["TORCH_CUDA_ARCH_LIST"] == "8.6"  # A10G
    installs = " ".join(_runs(SAM3D_DOCKERFILE))
    for package in ("pytorch3d", "flash-attn", "gsplat"):
        assert f"--no-build-isolation-package {package}" in installs, package
    assert "--override /opt/constraints-sam3d-overrides.txt" in installs
    assert "cudaLaunchKernel" in installs  # the build fails when pytorch3d's CUDA ops are missing
    assert "uv pip install --no-deps ." in installs and '".[aws]"' not in text
    # The environment a session runs with.
    # Upstream's notebook/inference.py, then the project folder (flows/ and tasks/ are not in the wheel).
    assert env["PYTHONPATH"] == f"/opt/sam-3d-objects/notebook:{env['SAM3D_PROJECT_DIR']}"
    assert env["SAM3D_PROJECT_DIR"] == "/opt/sam3d-pipeline" and env["HF_HUB_OFFLINE"] == "1"
    assert env["SAM3D_CHECKPOINT_DIR"] == "/opt/checkpoints"
    assert env["SAM3D_CHECKPOINT_PARTS"] == "sam-3d-objects,torch,hf"
    assert env["SAM3D_SAM3D_CONFIG_PATH"] == "/opt/checkpoints/sam-3d-objects/pipeline.yaml"
    assert env["SAM3D_RECONSTRUCTOR"] == "sam3d" and env["SAM3D_GPU_WORKER_STAGES"] == "reconstruct"
    assert "SAM3D_SAM3_CHECKPOINT" not in env and "FORCE_CUDA" not in env  # build settings stay build settings


def test_sam3d_image_installs_the_project_without_a_second_av_or_cv2():
    """The image's own one-liner, run on pyproject.toml: the project's requirements minus av and its headless
    OpenCV (upstream's av 12 and opencv-python stay), everything else kept."""
    [line] = [run for run in _runs(SAM3D_DOCKERFILE) if "tomllib" in run]
    script = re.search(r'python -c "(.+?)" > /tmp/project-requirements.txt', line)[1]
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    names = {Requirement(r).name for r in out}
    declared = {Requirement(r).name for r in _pyproject()["project"]["dependencies"]}
    assert names == declared - {"av", "opencv-python-headless"}
    pins = _constraints("constraints-sam3d.txt")
    for req in out:  # every kept requirement admits upstream's pin where upstream pins it
        name = Requirement(req).name.lower()
        if name in pins and pins[name].specifier and "==" in str(pins[name].specifier):
            assert Version(_pinned(pins[name])) in Requirement(req).specifier, (req, pins[name])


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    for dockerfile in DOCKERFILES:
        result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, dockerfile.name + result.stdout + result.stderr


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
