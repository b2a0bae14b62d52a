# syntax=docker/dockerfile:1.7
# SAM 3 worker image (ECS GPU work pool, g5 / A10G, sm_86): each container runs one session of the gpu-worker-sam3
# deployment (`prefect flow-run execute`, passed by the ECS worker) that serves the gpu-segment background task with
# SAM 3 kept loaded (it also writes the review page's click-decoder assets), and exits when idle. SAM 3D Objects runs
# in the other image (gpu_worker/sam3d.Dockerfile): gpu_worker/README.md says why there are two.
#
#   docker build -f gpu_worker/sam3.Dockerfile -t sam3d-gpu-sam3:0.1.0 \
#     --build-arg CHECKPOINT_URI=s3://my-bucket/checkpoints/v1 --secret id=aws,src=$HOME/.aws/credentials .
#
# Pins: what SAM 3 asks for (its README: Python >= 3.12, torch >= 2.7, CUDA >= 12.6) at the versions this project's
# tests run it with: the pyproject `sam3` extra (torch 2.14.1, torchvision 0.29.1, sam3 0.1.4), whose PyPI torch
# wheel is the CUDA 13.0 build with sm_86 kernels. The base image's CUDA is that 13.0: its NVIDIA_REQUIRE_CUDA makes
# the container runtime refuse a host driver older than 580 at start, instead of torch failing at the first kernel.
# The CUDA libraries themselves come with the torch wheel (nvidia-* packages); nothing here compiles CUDA code.
# tests/test_gpu_worker.py checks these pins against pyproject.toml and gpu_worker/constraints-sam3.txt.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG PYTHON_VERSION=3.12
ARG UV_VERSION=0.9.5
ARG TORCH_VERSION=2.14.1
ARG TORCH_CUDA=13.0
ARG TORCHVISION_VERSION=0.29.1
ARG SAM3_VERSION=0.1.4
ARG PREFECT_VERSION=3.9.1
ARG PREFECT_AWS_VERSION=0.7.12
ARG DEBIAN_FRONTEND=noninteractive

ENV PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MPLBACKEND=Agg

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# System packages: a C compiler for triton (it builds its small launcher modules at run time), git for pinned
# sources. Versions come from the pinned CUDA base image's Ubuntu 24.04 release, not pinned one by one.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl git gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

RUN curl -LsSf "https://astral.sh/uv/${UV_VERSION}/install.sh" | env UV_INSTALL_DIR=/usr/local/bin sh \
 && uv python install "${PYTHON_VERSION}" \
 && uv venv --python "${PYTHON_VERSION}" /opt/venv

# This project with its `aws` extra (the S3 task storage block) and its `sam3` extra: torch, torchvision, sam3,
# psutil (sam3 imports it undeclared), open_clip_torch (the BPE vocabulary the sam3 wheel lacks), onnx and
# onnxruntime (the review page's click-decoder export). One resolution under gpu_worker/constraints-sam3.txt (uv
# reads UV_CONSTRAINT as `--constraint`; an ARG, so a build setting only): sam3's
# timm>=1.0.17 is met here (SAM 3D Objects' timm==0.9.16 lives in the other image), one cv2 (the project's
# opencv-python-headless; nothing here asks for opencv-python).
WORKDIR /opt/sam3d-pipeline
COPY pyproject.toml README.md ./
COPY sam3d_pipeline ./sam3d_pipeline
COPY flows ./flows
COPY tasks ./tasks
COPY gpu_worker ./gpu_worker
ARG UV_CONSTRAINT=/opt/sam3d-pipeline/gpu_worker/constraints-sam3.txt
RUN uv pip install ".[aws,sam3]" "prefect==${PREFECT_VERSION}" \
      "prefect-aws==${PREFECT_AWS_VERSION}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
      "sam3==${SAM3_VERSION}" \
 && python -c "import torch; assert torch.version.cuda == '${TORCH_CUDA}', torch.version.cuda" \
 && python -c "import open_clip, pathlib; assert (pathlib.Path(open_clip.__file__).parent / 'bpe_simple_vocab_16e6.txt.gz').is_file()" \
 && test "$(python -c 'import importlib.metadata as m; print(sum(1 for d in m.distributions() if d.metadata["Name"].lower().startswith("opencv")))')" = 1

# Everything the model reads comes from /opt/checkpoints (this image's part: sam3/); the hubs are never asked at run
# time. A session serves only the segment stage (SAM3D_GPU_WORKER_STAGES), so it has the whole GPU to itself. The
# package installs sam3d_pipeline only: flows/ and tasks/ are imported from the project folder, on PYTHONPATH.
ENV SAM3D_PROJECT_DIR=/opt/sam3d-pipeline \
    PYTHONPATH=/opt/sam3d-pipeline \
    SAM3D_CHECKPOINT_DIR=/opt/checkpoints \
    SAM3D_CHECKPOINT_PARTS=sam3 \
    SAM3D_SAM3_CHECKPOINT=/opt/checkpoints/sam3/sam3.pt \
    TORCH_HOME=/opt/checkpoints/torch \
    HF_HOME=/opt/checkpoints/hf \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    SAM3D_SEGMENTER=sam3 \
    SAM3D_GPU_WORKER_STAGES=segment

# The checkpoint part from an S3 prefix with a sha256 manifest, baked in at build when CHECKPOINT_URI is given;
# otherwise the entry point fetches it at start from SAM3D_CHECKPOINT_URI.
ARG CHECKPOINT_URI=""
RUN --mount=type=secret,id=aws,target=/root/.aws/credentials \
    if [ -n "${CHECKPOINT_URI}" ]; then \
      python gpu_worker/fetch_checkpoints.py fetch "${CHECKPOINT_URI}" /opt/checkpoints --only "${SAM3D_CHECKPOINT_PARTS}"; \
    fi

# uid 1001: Ubuntu 24.04 images already have `ubuntu` as uid 1000.
RUN useradd --create-home --uid 1001 sam3d \
 && mkdir -p /opt/checkpoints && chown -R 1001:1001 /opt/sam3d-pipeline /opt/checkpoints
USER 1001
ENTRYPOINT ["/opt/sam3d-pipeline/gpu_worker/entrypoint.sh"]
CMD ["python", "gpu_worker/smoke.py"]
