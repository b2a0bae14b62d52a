"""``sam3d-pipeline doctor``: preflight checks, one line each (ok / warn / fail) with the fix.

Checks Python, torch and the device, the sam3 package (and which compatibility workarounds apply), the
vocabulary, the checkpoint, S3 reachability for configured buckets, the Prefect API and its work pools.
``--smoke`` also runs a text prompt and a click through the real sam3 backend and prints timings.
Nothing here downloads a checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sam3d_pipeline.errors import PipelineError
from sam3d_pipeline.settings import Settings

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Check:
    """One preflight result: ``status`` is ok, warn or fail; ``fix`` says what to do when not ok."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4} {self.name}: {self.detail}"
        return text + (f" -> fix: {self.fix}" if self.fix and self.status != OK else "")


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info < (3, 11):  # noqa: UP036 (the check runs before anything else can fail obscurely)
        return Check("python", FAIL, version, "use Python 3.11 or newer")
    return Check("python", OK, version)


def check_torch(settings: Settings) -> Check:
    if importlib.util.find_spec("torch") is None:
        return Check("torch", WARN, "not installed (sam3 unavailable; auto uses lite)",
                     "pip install 'sam3d-pipeline[sam3]'")
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 (reported as a failed check)
        return Check("torch", FAIL, f"does not import: {exc}", "reinstall torch and torchvision as a matched pair")
    if torch.cuda.is_available():
        return Check("torch", OK, f"{torch.__version__}, device cuda ({torch.cuda.get_device_name(0)})")
    if settings.sam3_device.startswith("cuda"):
        return Check("torch", FAIL, f"{torch.__version__}: sam3_device={settings.sam3_device} but no CUDA device",
                     "run on a GPU machine or set SAM3D_SAM3_DEVICE=auto")
    return Check("torch", WARN, f"{torch.__version__}, no CUDA: SAM 3 runs on the CPU (about a minute per image)",
                 "use a CUDA GPU for real workloads")


def check_sam3() -> Check:
    if importlib.util.find_spec("sam3") is None or importlib.util.find_spec("torch") is None:
        return Check("sam3", WARN, "not installed (auto uses lite)", "pip install 'sam3d-pipeline[sam3]'")
    try:
        from sam3d_pipeline.backends.sam3 import compat as sam3_compat

        applied = sam3_compat.apply()
        import sam3
    except Exception as exc:  # noqa: BLE001 (reported as a failed check)
        return Check("sam3", FAIL, f"does not import: {type(exc).__name__}: {exc}",
                     "pip install 'sam3d-pipeline[sam3]' (torch==2.14.1, torchvision==0.29.1, psutil)")
    extra = f"; {len(applied)} CPU workaround(s) active" if applied else ""
    return Check("sam3", OK, f"{getattr(sam3, '__version__', '?')} imports{extra}")


def check_vocab(settings: Settings | None = None) -> Check:
    if importlib.util.find_spec("sam3") is None:
        return Check("vocab", WARN, "sam3 not installed, nothing to check", "pip install 'sam3d-pipeline[sam3]'")
    from sam3d_pipeline.backends.sam3.assets import find_bpe_vocab

    try:
        return Check("vocab", OK, str(find_bpe_vocab(settings)))
    except PipelineError as exc:
        return Check("vocab", FAIL, str(exc), "pip install open_clip_torch")


def check_checkpoint(settings: Settings, s3_head: Callable[[str, str], int]) -> Check:
    from sam3d_pipeline.backends.sam3.assets import HUB_PREFIX
    from sam3d_pipeline.storage import is_s3_uri, split_s3_uri

    source = settings.sam3_checkpoint
    if not source:
        if settings.sam3_random_init:
            return Check("checkpoint", WARN, "none: random-init mode (outputs are meaningless)",
                         "set SAM3D_SAM3_CHECKPOINT for real segmentation")
        return Check("checkpoint", WARN, "none configured: sam3 unavailable, auto uses lite",
                     "set SAM3D_SAM3_CHECKPOINT to sam3.pt, s3://bucket/sam3.pt or hf://facebook/sam3")
    if source.startswith(HUB_PREFIX):
        if not settings.sam3_allow_hub:
            return Check("checkpoint", FAIL, f"{source}: hub downloads are off",
                         "set SAM3D_SAM3_ALLOW_HUB=true (after `hf auth login`), or use a local file / s3:// URI")
        return Check("checkpoint", WARN, f"{source}: fetched from the gated hub on first use",
                     "accept the licence on huggingface.co/facebook/sam3 and run `hf auth login`")
    if is_s3_uri(source):
        try:
            size = s3_head(*split_s3_uri(source))
        except PipelineError as exc:
            return Check("checkpoint", FAIL, f"{source}: {exc}", "check the URI, credentials and endpoint")
        return Check("checkpoint", OK, f"{source} ({size / 2**30:.2f} GiB, downloaded once into the cache)")
    path = Path(os.path.expanduser(source))
    if not path.is_file():
        return Check("checkpoint", FAIL, f"{source}: no such file", "fix SAM3D_SAM3_CHECKPOINT")
    if not os.access(path, os.R_OK):
        return Check("checkpoint", FAIL, f"{source}: not readable", f"chmod a+r {path}")
    size = path.stat().st_size
    if size < 1_000_000_000:
        return Check("checkpoint", WARN, f"{source}: {size} bytes, smaller than the 3.4 GB sam3.pt",
                     "check that this is the full SAM 3 checkpoint")
    return Check("checkpoint", OK, f"{source} ({size / 2**30:.2f} GiB)")


def check_s3(settings: Settings, s3_bucket: Callable[[str], None]) -> Check:
    from sam3d_pipeline.storage import is_s3_uri, split_s3_uri

    buckets = sorted({split_s3_uri(uri)[0] for uri in (settings.output_root, settings.sam3_checkpoint or "")
                      if is_s3_uri(uri)})
    if not buckets:
        return Check("s3", OK, "no S3 locations configured (local output root)")
    problems = []
    for bucket in buckets:
        try:
            s3_bucket(bucket)
        except PipelineError as exc:
            problems.append(f"{bucket}: {exc}")
    if problems:
        return Check("s3", FAIL, "; ".join(problems), "check credentials, bucket names and SAM3D_S3_ENDPOINT_URL")
    return Check("s3", OK, "reachable: " + ", ".join(buckets))


def expected_work_pools(prefect_yaml: Path = Path("prefect.yaml")) -> list[str]:
    """Work pool names the deployments in ``prefect.yaml`` use (``{{ $VAR | default('x') }}`` resolved)."""
    names = []
    if prefect_yaml.is_file():
        import yaml

        doc = yaml.safe_load(prefect_yaml.read_text()) or {}
        for deployment in doc.get("deployments") or []:
            name = str((deployment.get("work_pool") or {}).get("name") or "")
            match = re.fullmatch(r"\{\{\s*\$(\w+)\s*\|\s*default\('([^']*)'\)\s*\}\}", name)
            if match:
                name = os.environ.get(match.group(1), match.group(2))
            if name and name not in names:
                names.append(name)
    return names or ["sam3d-cpu"]


def check_prefect(api_url: str | None, pools: list[str]) -> list[Check]:
    if not api_url:
        return [Check("prefect-api", OK, "PREFECT_API_URL unset: runs use the embedded ephemeral API"),
                Check("work-pools", WARN, "not checked (no Prefect server configured)",
                      "set PREFECT_API_URL to check deployments' work pools")]
    import httpx

    try:
        response = httpx.get(api_url.rstrip("/") + "/health", timeout=5.0)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        return [Check("prefect-api", FAIL, f"{api_url}: {type(exc).__name__}: {exc}",
                      "start the server (`prefect server start`) or fix PREFECT_API_URL"),
                Check("work-pools", FAIL, "not checked (API unreachable)", "fix the Prefect API first")]
    checks = [Check("prefect-api", OK, f"{api_url} healthy")]
    try:
        response = httpx.post(api_url.rstrip("/") + "/work_pools/filter", json={}, timeout=5.0)
        response.raise_for_status()
        present = {pool["name"] for pool in response.json()}
    except httpx.HTTPError as exc:
        return checks + [Check("work-pools", FAIL, f"listing failed: {exc}", "check the Prefect API")]
    missing = [p for p in pools if p not in present]
    if missing:
        checks.append(Check("work-pools", FAIL, f"missing: {', '.join(missing)} (present: "
                            f"{', '.join(sorted(present)) or 'none'})",
                            "prefect work-pool create " + " / ".join(missing) + " --type process (or ecs)"))
    else:
        checks.append(Check("work-pools", OK, "present: " + ", ".join(pools)))
    return checks


def smoke(settings: Settings, size: tuple[int, int] = (320, 240)) -> Check:
    """Text prompt and one click through the real sam3 backend (random weights without a checkpoint)."""
    import numpy as np
    from PIL import Image

    from sam3d_pipeline.backends.sam3.segmenter import Sam3Segmenter
    from sam3d_pipeline.samples import sample_path
    from sam3d_pipeline.types import Point, SegmentRequest

    if not settings.sam3_checkpoint:
        settings = settings.model_copy(update={"sam3_random_init": True})
    try:
        rgb = np.asarray(Image.open(sample_path("coffee")).convert("RGB").resize(size))
        seg = Sam3Segmenter(settings)
        t0 = time.perf_counter()
        loaded = seg.loaded
        t1 = time.perf_counter()
        seg.image_state(rgb)
        t2 = time.perf_counter()
        result = seg.segment(rgb, SegmentRequest("coffee cup"))
        t3 = time.perf_counter()
        mask, _, _ = seg.click(rgb, [Point(size[0] / 2, size[1] / 2, 1)])
        t4 = time.perf_counter()
    except Exception as exc:  # noqa: BLE001 (reported as a failed check)
        return Check("smoke", FAIL, f"{type(exc).__name__}: {exc}", "run `sam3d-pipeline doctor` without --smoke first")
    if mask.shape != rgb.shape[:2]:
        return Check("smoke", FAIL, f"click mask has shape {mask.shape}, expected {rgb.shape[:2]}")
    return Check("smoke", OK, f"sam3 on {loaded.device} ({loaded.weights}): build {t1 - t0:.1f} s, set_image "
                 f"{t2 - t1:.1f} s, text prompt {t3 - t2:.1f} s ({len(result.instances)} instances), click "
                 f"{t4 - t3:.2f} s")


def run_checks(settings: Settings, *, smoke_test: bool = False) -> list[Check]:
    """All preflight checks in order (``smoke_test`` adds the sam3 smoke run)."""
    from sam3d_pipeline.storage import classify_s3_error, s3_client

    def s3_head(bucket: str, key: str) -> int:
        try:
            return int(s3_client(settings).head_object(Bucket=bucket, Key=key)["ContentLength"])
        except Exception as exc:  # noqa: BLE001 (classified)
            raise classify_s3_error(exc, f"s3://{bucket}/{key}") from exc

    def s3_bucket(bucket: str) -> None:
        try:
            s3_client(settings).head_bucket(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001 (classified)
            raise classify_s3_error(exc, f"s3://{bucket}") from exc

    checks = [check_python(), check_torch(settings), check_sam3(), check_vocab(settings),
              check_checkpoint(settings, s3_head), check_s3(settings, s3_bucket)]
    checks += check_prefect(os.environ.get("PREFECT_API_URL"), expected_work_pools())
    if smoke_test:
        checks.append(smoke(settings))
    return checks


def exit_code(checks: list[Check], strict: bool) -> int:
    """1 when any check failed (or, with ``strict``, warned); else 0."""
    statuses = {c.status for c in checks}
    return 1 if FAIL in statuses or (strict and WARN in statuses) else 0
