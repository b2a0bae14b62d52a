# syntax=docker/dockerfile:1.7
# SAM 3D Objects worker image (ECS GPU work pool, g5 / A10G, sm_86): each container runs one session of the
# gpu-worker-sam3d deployment (`prefect flow-run execute`, passed by the ECS worker) that serves the gpu-reconstruct
# background task with SAM 3D Objects kept loaded, and exits when idle. SAM 3 runs in the other image
# (gpu_worker/sam3.Dockerfile): gpu_worker/README.md says why there are two.
#
#   docker build -f gpu_worker/sam3d.Dockerfile -t sam3d-gpu-sam3d:0.1.0 \
#     --build-arg CHECKPOINT_URI=s3://my-bucket/checkpoints/v1 --secret id=aws,src=$HOME/.aws/credentials .
#
# Pins: SAM 3D Objects at an exact commit of facebookresearch/sam-3d-objects, whose requirements.txt pins
# torchaudio==2.5.1+cu121 (so torch 2.5.1 on CUDA 12.1) and whose environment is Python 3.11; kaolin 0.17 wheels
# exist only for torch 2.5.1 + cu121. gpu_worker/constraints-sam3d.txt holds those pins for every install step;
# tests/test_gpu_worker.py checks them against this file, upstream's commit and pyproject.toml.
ARG CUDA_IMAGE=nvidia/cuda:12.1.1-cudnn8-devel-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG PYTHON_VERSION=3.11
ARG UV_VERSION=0.9.5
ARG TORCH_VERSION=2.5.1
ARG TORCHVISION_VERSION=0.20.1
ARG TORCH_CUDA=cu121
ARG SAM3D_OBJECTS_COMMIT=cf066761706cd02b07e2fc6274570ec8cdafb683
ARG PREFECT_VERSION=3.9.1
ARG PREFECT_AWS_VERSION=0.7.12
ARG KAOLIN_FIND_LINKS=https://nvidia-kaolin.s3.us-east-2.amazonaws.com/torch-2.5.1_cu121.html
ARG DEBIAN_FRONTEND=noninteractive
# Build-only: the build sees no GPU, so pytorch3d must be told to compile its CUDA ops (upstream doc/setup.md:
# "RuntimeError: Not compiled with GPU support" otherwise); MAX_JOBS bounds the memory of the CUDA compiles.
ARG FORCE_CUDA=1
ARG MAX_JOBS=4

ENV PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/cuda/bin:$PATH \
    CUDA_HOME=/usr/local/cuda \
    CONDA_PREFIX=/usr/local/cuda \
    TORCH_CUDA_ARCH_LIST=8.6 \
    LIDRA_SKIP_INIT=true \
    MPLBACKEND=Agg

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# System packages: compilers for pytorch3d/gsplat/flash_attn, GL for open3d/pyrender, git for pinned sources.
# Versions come from the pinned CUDA base image's Ubuntu 22.04 release (its apt snapshot), not pinned one by one.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates curl git build-essential ninja-build libgl1 libglib2.0-0 libegl1 \
 && rm -rf /var/lib/apt/lists/*

RUN curl -LsSf "https://astral.sh/uv/${UV_VERSION}/install.sh" | env UV_INSTALL_DIR=/usr/local/bin sh \
 && uv python install "${PYTHON_VERSION}" \
 && uv venv --python "${PYTHON_VERSION}" /opt/venv

# Every install below runs under these pins (uv reads UV_CONSTRAINT as `--constraint`; an ARG, so it is a build
# setting only), with PyTorch's CUDA 12.1 index and NVIDIA's beside PyPI (upstream's PIP_EXTRA_INDEX_URL), so nothing
# can pull another torch, timm, av or cv2.
COPY gpu_worker/constraints-sam3d.txt gpu_worker/constraints-sam3d-overrides.txt /opt/
ARG UV_CONSTRAINT=/opt/constraints-sam3d.txt

# torch first, from the CUDA 12.1 index: the builds below compile against it.
RUN uv pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
      "torch==${TORCH_VERSION}+${TORCH_CUDA}" "torchvision==${TORCHVISION_VERSION}+${TORCH_CUDA}" \
      "torchaudio==${TORCH_VERSION}+${TORCH_CUDA}" \
 && uv pip install setuptools wheel ninja packaging psutil

# SAM 3D Objects at a pinned commit: its requirements, then the p3d extra (pytorch3d, flash_attn) and the inference
# extra (kaolin, gsplat), as upstream's doc/setup.md orders them. pytorch3d's setup.py imports torch at the top,
# gsplat's get_extensions() imports torch and flash_attn 2.8.3 is an sdist whose setup.py imports torch: built in an
# isolated environment they fail with "No module named torch", so those three build without isolation, against the
# torch installed above (and with FORCE_CUDA / TORCH_CUDA_ARCH_LIST=8.6, since no GPU is visible here). Upstream's
# gradio pin cannot live beside prefect (starlette): gpu_worker/constraints-sam3d-overrides.txt replaces it.
RUN git clone https://github.com/facebookresearch/sam-3d-objects.git /opt/sam-3d-objects \
 && git -C /opt/sam-3d-objects checkout --detach "${SAM3D_OBJECTS_COMMIT}" \
 && test "$(git -C /opt/sam-3d-objects rev-parse HEAD)" = "${SAM3D_OBJECTS_COMMIT}"
WORKDIR /opt/sam-3d-objects
RUN export UV_EXTRA_INDEX_URL="https://download.pytorch.org/whl/${TORCH_CUDA} https://pypi.ngc.nvidia.com" \
           UV_INDEX_STRATEGY=unsafe-best-match \
 && uv pip install -e . \
 && uv pip install --no-build-isolation-package pytorch3d --no-build-isolation-package flash-attn -e ".[p3d]" \
 && uv pip install --find-links "${KAOLIN_FIND_LINKS}" --no-build-isolation-package gsplat \
      --override /opt/constraints-sam3d-overrides.txt -e ".[inference]" \
 && python ./patching/hydra \
 && nm -D "$(python -c 'import torch, pytorch3d._C as c; print(c.__file__)')" | grep -q cudaLaunchKernel \
 && python -c "import torch; assert torch.__version__ == '${TORCH_VERSION}+${TORCH_CUDA}', torch.__version__"

# This project (gpu-worker flow, GPU stage tasks, adapters) and prefect-aws for the S3 task storage block. Its own
# requirements go in without `av` and `opencv-python-headless`: upstream pins av==12.0.0 (the project's av==18.1.0 is
# for video intake, which never runs here) and ships cv2 as opencv-python==4.9.0.80; two OpenCV distributions in one
# environment overwrite each other's cv2. The project itself then goes in without dependencies.
WORKDIR /opt/sam3d-pipeline
COPY pyproject.toml README.md ./
COPY sam3d_pipeline ./sam3d_pipeline
COPY flows ./flows
COPY tasks ./tasks
COPY gpu_worker ./gpu_worker
RUN export UV_EXTRA_INDEX_URL="https://download.pytorch.org/whl/${TORCH_CUDA}" UV_INDEX_STRATEGY=unsafe-best-match \
 && python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if re.split(r'[^A-Za-z0-9._-]', d, maxsplit=1)[0].lower() not in ('av', 'opencv-python-headless')))" > /tmp/project-requirements.txt \
 && uv pip install -r /tmp/project-requirements.txt "prefect==${PREFECT_VERSION}" "prefect-aws==${PREFECT_AWS_VERSION}" \
 && uv pip install --no-deps . \
 && test "$(python -c 'import importlib.metadata as m; print(sum(1 for d in m.distributions() if d.metadata["Name"].lower().startswith("opencv")))')" = 1 \
 && python -c "import av, cv2, timm; assert (av.__version__, cv2.__version__, timm.__version__) == ('12.0.0', '4.9.0', '0.9.16')"

# Everything the models read comes from /opt/checkpoints (this image's parts: SAM 3D Objects, DINOv2 as torch.hub
# caches it, MoGe as huggingface_hub caches it); the hubs are never asked at run time. A session serves only the
# reconstruct stage (SAM3D_GPU_WORKER_STAGES), so SAM 3D Objects has the whole GPU to itself. The package installs
# sam3d_pipeline only: flows/ and tasks/ are imported from the project folder, on PYTHONPATH.
ENV PYTHONPATH=/opt/sam-3d-objects/notebook:/opt/sam3d-pipeline \
    SAM3D_PROJECT_DIR=/opt/sam3d-pipeline \
    SAM3D_CHECKPOINT_DIR=/opt/checkpoints \
    SAM3D_CHECKPOINT_PARTS=sam-3d-objects,torch,hf \
    SAM3D_SAM3D_CONFIG_PATH=/opt/checkpoints/sam-3d-objects/pipeline.yaml \
    TORCH_HOME=/opt/checkpoints/torch \
    HF_HOME=/opt/checkpoints/hf \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    SAM3D_RECONSTRUCTOR=sam3d \
    SAM3D_GPU_WORKER_STAGES=reconstruct

# The checkpoint parts from an S3 prefix with a sha256 manifest, baked in at build when CHECKPOINT_URI is given;
# otherwise the entry point fetches them at start from SAM3D_CHECKPOINT_URI.
ARG CHECKPOINT_URI=""
RUN --mount=type=secret,id=aws,target=/root/.aws/credentials \
    if [ -n "${CHECKPOINT_URI}" ]; then \
      python gpu_worker/fetch_checkpoints.py fetch "${CHECKPOINT_URI}" /opt/checkpoints --only "${SAM3D_CHECKPOINT_PARTS}"; \
    fi

RUN useradd --create-home --uid 1000 sam3d \
 && mkdir -p /opt/checkpoints && chown -R 1000:1000 /opt/sam3d-pipeline /opt/checkpoints
USER 1000
ENTRYPOINT ["/opt/sam3d-pipeline/gpu_worker/entrypoint.sh"]
CMD ["python", "gpu_worker/smoke.py"]
