"""The one settings object. Every field can be set from the environment with the ``SAM3D_`` prefix.

Settings of one concern are grouped in a model of their own, read from the same variables (``SAM3D_WEBHOOK_SECRET``
is ``Settings().webhook.secret``). ``docs/settings.md`` lists every variable (``environment_variables``)."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

SegmenterChoice = Literal["auto", "lite", "sam3"]
ReconstructorChoice = Literal["auto", "lite", "sam3d"]


class WebhookSettings(BaseSettings):
    """The signed webhooks of the job API: the key, the delivery schedule, and where receivers may be
    (``SAM3D_WEBHOOK_*``; ``Settings.webhook``)."""

    model_config = SettingsConfigDict(env_prefix="SAM3D_WEBHOOK_", extra="ignore")

    secret: str | None = Field(
        None, description="Key of the webhooks' HMAC-SHA256 signatures; jobs asking for a webhook are refused "
        "without it.")
    max_attempts: int = Field(8, ge=1, le=50, description="Most delivery attempts of one webhook.")
    backoff_s: float = Field(
        1.0, ge=0, le=3600, description="Wait before the second delivery attempt; it doubles with each further "
        "attempt (seconds).")
    backoff_max_s: float = Field(600.0, ge=0, le=86400, description="Longest wait between attempts (s).")
    timeout_s: float = Field(
        10.0, gt=0, le=120, description="Deadline of one delivery attempt, all of it: resolving the host, "
        "connecting, sending and reading the whole answer (s); a slower receiver failed.")
    poll_s: float = Field(
        2.0, gt=0, le=60, description="How often the web server looks for jobs that ended and webhooks due (s).")
    allow_networks: str = Field(
        "", description="Non-public networks webhook receivers may be in, as CIDRs separated by commas (e.g. "
        "10.0.0.0/16 for receivers in the VPC; the local stack sets 127.0.0.0/8,::1/128). Empty: public addresses "
        "only. The Prefect API, the S3 endpoint and this web server are refused whatever it says.")
    allow_hosts: str = Field(
        "", description="Host names, separated by commas, whose private or loopback addresses webhook receivers "
        "may have (e.g. hooks.internal.example); link-local (metadata), multicast and unspecified addresses "
        "still need SAM3D_WEBHOOK_ALLOW_NETWORKS.")
    max_response_bytes: int = Field(
        65536, ge=0, le=16 * 1024 * 1024, description="Most bytes of a receiver's answer body read; a longer body "
        "fails the attempt.")
    workers: int = Field(
        8, ge=1, le=64, description="Delivery attempts at once (threads): a slow receiver holds one of them for "
        "at most SAM3D_WEBHOOK_TIMEOUT_S, never the other jobs' webhooks.")


class Settings(BaseSettings):
    """Pipeline settings (env prefix ``SAM3D_``, e.g. ``SAM3D_OUTPUT_ROOT=s3://bucket/outputs``)."""

    model_config = SettingsConfigDict(env_prefix="SAM3D_", extra="ignore")

    # Where outputs go.
    output_root: str = Field(
        "outputs",
        description="Local directory or s3://bucket/prefix under which each run writes its output prefix.",
    )

    # Image intake.
    max_pixels: int = Field(
        60_000_000,
        ge=1,
        description="Largest accepted image (width x height), checked from the header before decoding.",
    )
    max_input_bytes: int = Field(
        100 * 1024 * 1024, ge=1, description="Largest accepted input file in bytes, checked before download."
    )

    # Video intake (MP4 / MOV / WebM files, or a folder / prefix of frames).
    video_max_seconds: float = Field(
        120.0, gt=0, le=3600, description="Longest accepted clip (seconds); checked from the header before decoding "
        "when the container states its duration, else while decoding.")
    video_max_frames: int = Field(
        300, ge=1, le=5000, description="Most frames sampled from one clip: the stride grows until the sample fits, "
        "so memory stays bounded (frames kept x width x height x 3 bytes).")
    video_max_pixels: int = Field(
        8_294_400, ge=1, description="Largest accepted frame (width x height; default 3840x2160), checked from the "
        "header before decoding.")
    video_stride: int = Field(1, ge=1, le=1000, description="Keep every n-th frame (at least; see video_max_frames).")
    video_folder_fps: float = Field(
        30.0, gt=0, le=1000, description="Frame rate assumed for a folder / prefix of frames (their times in reports).")

    # Backends.
    segmenter: SegmenterChoice = Field(
        "auto", description="What a run's segmenter 'auto' stands for: lite or sam3; auto picks the best usable "
        "here (sam3 when it can run), or with SAM3D_GPU_STAGES=workers the real model the GPU image runs.")
    reconstructor: ReconstructorChoice = Field(
        "auto", description="What a run's reconstructor 'auto' stands for: lite or sam3d (see segmenter).")
    min_instance_area_fraction: float = Field(
        0.002, ge=0.0, le=1.0, description="Instances smaller than this fraction of the image are dropped."
    )
    score_threshold: float = Field(
        0.25, ge=0.0, le=1.0, description="Instances scoring below this are dropped."
    )
    lite_work_size_px: int = Field(
        640, ge=64, le=4096, description="Lite segmenter works on a copy scaled to this long side (pixels)."
    )
    lite_mesh_resolution: int = Field(
        160, ge=16, le=512, description="Lite reconstructor grid cells along the object's long side."
    )
    lite_thickness: float = Field(
        0.5, gt=0.0, le=2.0, description="Lite reconstructor inflation: 1.0 turns a disc into a sphere."
    )
    preview_size_px: int = Field(512, ge=64, le=4096, description="Side of the rendered mesh preview (pixels).")

    # Exported assets (profiles web / ar; raw keeps the reconstructor's mesh and only reports the budgets).
    export_max_triangles: int = Field(
        100_000, ge=100, le=10_000_000, description="Triangle budget of a web / ar asset (Amazon: 200k, AR Quick "
        "Look: ~100k); a bigger mesh is simplified to it.")
    export_max_bytes: int = Field(
        5_000_000, ge=10_000, description="Byte budget of each exported file (Shopify typical ~4 MB, Google "
        "Merchant <= 10-15 MB); a bigger file is simplified further, and one that still does not fit says so.")
    export_texture_max_px: int = Field(
        2048, ge=64, le=8192, description="Largest side of a baked texture (USDZ, OBJ); AR Quick Look: 2048.")
    export_default_size_m: float = Field(
        0.5, gt=0.0, le=100.0, description="Size given to the largest object of a photo when the reconstructor "
        "knows no real-world scale (lite): its longest side in metres; the others keep their size relative to it.")
    export_check_usdz: bool = Field(
        True, description="Run USD's compliance checker in ARKit mode on every USDZ and record its verdict.")

    # Review.
    review_poll_interval_s: float = Field(
        0.25, gt=0, le=60, description="How often a paused run checks for the reviewer's answer (seconds): the "
        "longest wait between an answer and the run going on (one small read of the flow run per check, for at "
        "most SAM3D_REVIEW_SUSPEND_AFTER_S; a suspended run is woken by Prefect instead)."
    )
    review_suspend_after_s: float = Field(
        900.0,
        ge=0,
        description="A review allowed to last longer than this pauses the run in process for this long (an answer "
        "resumes it at once), then suspends it (it leaves its infrastructure and, once answered, re-executes from "
        "persisted results). Needs a deployment; shorter reviews pause in process throughout.",
    )
    review_decoder_weights: Literal["uint8", "float32"] = Field(
        "uint8",
        description="Weights of the review page's in-browser click decoder: uint8 (4.7 MB, faster per click) or "
        "float32 (16.5 MB, the model's own numbers). Downloaded once per model version and cached by the browser.",
    )
    review_video_frames: int = Field(
        4, ge=1, le=12, description="A video run's review shows this many of its best tracked frames (by view "
        "score, each with its mask, mask score and view score); the reviewer may pick the one to reconstruct from.",
    )
    review_page_url: str | None = Field(
        None, description="Base URL of the review server, linked from paused runs (e.g. http://127.0.0.1:8765)."
    )

    # Web server (``sam3d-pipeline web``): studio, job API (/v1/jobs) and review page.
    web_url: str | None = Field(
        None, description="Base URL of the web server as clients reach it (e.g. http://127.0.0.1:8765): the links "
        "in job JSON and webhooks start with it (else, in answers, with the request's own base URL).")
    api_token: str | None = Field(
        None, description="Bearer token of the job API, the studio and the review page; the review page's "
        "SAM3D_REVIEW_TOKEN is accepted too. Without either, the server makes one up and prints it.")
    api_input_roots: str = Field(
        "", description="Local folders a JSON job submission may name its image in, separated by os.pathsep; "
        "empty: only uploads and s3:// URIs.")
    webhook: WebhookSettings = Field(
        default_factory=WebhookSettings,
        description="The signed webhooks of the job API (SAM3D_WEBHOOK_*).")

    # SAM 3 (the ``sam3`` segmenter).
    sam3_checkpoint: str | None = Field(
        None,
        description="SAM 3 checkpoint: a local file, s3://bucket/key, or 'hf://facebook/sam3' (needs sam3_allow_hub).",
    )
    sam3_checkpoint_sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$",
        description="The SAM 3 weights' sha256 (hex), as the deployment declares them: it names output prefixes "
        "(sam3-0.1.4+<first 12>), so set it on the orchestrating pool too; where the model loads, the checkpoint "
        "must match it (checked after an s3:// download, and against the checkpoint folder's manifest).",
    )
    sam3d_checkpoint_sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$",
        description="The SAM 3D Objects weights' identity as the deployment declares it (`fetch_checkpoints.py "
        "identity`: the sha256 over the manifest entries under sam-3d-objects/); names output prefixes, and a GPU "
        "worker whose weights differ refuses the stage.",
    )
    checkpoint_dir: str | None = Field(
        None, description="The GPU image's checkpoint folder (/opt/checkpoints) with its manifest.json: the weights' "
        "sha256 is read from it instead of hashing gigabytes at every start.",
    )
    sam3_allow_hub: bool = Field(
        False, description="Allow downloading the gated checkpoint from the Hugging Face hub (never implicit)."
    )
    sam3_random_init: bool = Field(
        False, description="Build SAM 3 with random weights (tests, smoke checks); results are marked random-init."
    )
    sam3_device: str = Field("auto", description="Torch device for SAM 3: auto (cuda when available), cpu, cuda:0.")
    sam3_confidence_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="SAM 3 detections scoring below this (presence x class) are dropped."
    )
    model_cache_dir: str = Field(
        "~/.cache/sam3d-pipeline", description="Where downloaded checkpoints are kept (one copy per source)."
    )

    # Storage and retries.
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint override; AWS_ENDPOINT_URL is honoured when this is unset."
    )
    s3_max_attempts: int = Field(
        3,
        ge=1,
        le=20,
        description="Total botocore attempts per S3 call (standard mode, 1 = no retry) before our own retries.",
    )
    s3_timeout_s: float = Field(30.0, gt=0, description="S3 connect and read timeout (seconds).")
    link_expires_s: int = Field(
        3600, ge=60, le=7 * 24 * 3600,
        description="Lifetime of the presigned S3 links put into artifacts and reports (seconds; S3 allows 7 days).",
    )
    stale_part_s: float = Field(
        6 * 3600.0, gt=0,
        description="A local '.part' file older than this is left from an interrupted write (no run takes so "
        "long to write one file) and is removed by the next write into its folder (seconds).",
    )
    catalog_input_roots: str = Field(
        "",
        description="Folders a local catalog manifest may read photos from besides its own folder, separated by "
        "os.pathsep (':' on Linux). Photos outside them, or symlinks leading outside them, are refused.",
    )
    task_retries: int = Field(3, ge=0, le=20, description="Prefect retries for transient task failures.")
    task_retry_delay_s: float = Field(
        2.0, ge=0, description="Base of the exponential backoff between Prefect task retries (seconds)."
    )

    # GPU stages: in-process, or Prefect background tasks served by warm GPU worker sessions.
    gpu_stages: Literal["inline", "workers"] = Field(
        "inline",
        description="inline: the flows run the model stages in their own process (embedded default); "
        "workers: they submit them as background tasks to warm GPU worker sessions (runs of the gpu-worker "
        "deployment), which keep the models loaded between photos. Needs a Prefect server (PREFECT_API_URL).",
    )
    gpu_worker_deployment: str = Field(
        "gpu-worker/gpu-worker",
        description="Deployment (flow/deployment) whose runs are GPU worker sessions; flows start one when work "
        "is queued. Without it, sessions are started by hand (sam3d-pipeline gpu-worker).",
    )
    gpu_segment_deployment: str | None = Field(
        None,
        description="Deployment whose sessions serve the segment stage (the SAM 3 image: gpu-worker/gpu-worker-sam3 "
        "on AWS). Empty: SAM3D_GPU_WORKER_DEPLOYMENT. When both stages name the same deployment, a catalog batch "
        "goes to it as one task.",
    )
    gpu_reconstruct_deployment: str | None = Field(
        None,
        description="Deployment whose sessions serve the reconstruct stage (the SAM 3D Objects image: "
        "gpu-worker/gpu-worker-sam3d on AWS). Empty: SAM3D_GPU_WORKER_DEPLOYMENT.",
    )
    gpu_worker_stages: Literal["segment", "reconstruct", "all"] = Field(
        "all",
        description="Which GPU stage tasks a worker session serves: segment (the SAM 3 image), reconstruct (the SAM "
        "3D Objects image) or all (one process with both models: the local stack).",
    )
    gpu_max_workers: int = Field(
        5, ge=1, le=100, description="Most GPU worker sessions the flows start at once, per worker deployment."
    )
    gpu_idle_s: float = Field(300.0, gt=0, description="A GPU worker session exits after this long idle (seconds).")
    gpu_lease_s: float = Field(
        30.0, ge=1.0,
        description="A running GPU task refreshes its lease every third of this; a lease older than this means its "
        "worker is gone and the work is submitted again (seconds).",
    )
    gpu_poll_s: float = Field(
        2.0, gt=0, le=30,
        description="How often a flow checks the state and lease of a GPU task it waits on; it wakes at once when "
        "the task ends (seconds).",
    )
    gpu_stage_attempts: int = Field(
        3, ge=1, le=10, description="Attempts per GPU task when its worker is lost (spot, OOM, killed)."
    )
    gpu_stage_retry_delay_s: float = Field(
        5.0, ge=0, description="Base of the exponential backoff between GPU task attempts (seconds)."
    )
    gpu_price_per_hour: float | None = Field(
        None, ge=0, description="Dollars per GPU-hour: result.json's clock turns the GPU-seconds a job held into its "
        "cost (unset: no cost)."
    )
    gpu_stage_timeout_s: float = Field(
        3600.0, gt=0, description="Longest wait for one GPU task, queueing and instance start included (seconds)."
    )

    # SAM 3D Objects (the sam3d reconstructor; runs in the gpu_worker image).
    sam3d_config_path: str = Field(
        "/opt/checkpoints/sam-3d-objects/pipeline.yaml",
        description="SAM 3D Objects pipeline config (its checkpoints sit beside it).",
    )
    sam3d_low_memory: bool = Field(
        False,
        description="Build the networks on the CPU and move each stage's networks to the GPU only while it runs "
        "(lower peak GPU memory, slower; not yet measured on a 24 GB GPU).",
    )
    sam3d_dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None,
        description="Inference dtype of the SAM 3D Objects pipeline; unset: the config's (float16 in the released "
        "pipeline.yaml, whose generators are trained with use_fp16).",
    )
    sam3d_quality: Literal["fast", "balanced", "best"] = Field(
        "balanced",
        description="Speed against quality of SAM 3D Objects, on upstream's own options: fast = its distilled "
        "shortcut samplers (use_stage1/2_distillation, classifier-free guidance off) with 4 + 4 steps; balanced = "
        "upstream's defaults (25 + 25 steps); best = 50 + 50 steps. Not yet measured here: bench/gpu.py times "
        "each on a GPU.",
    )
    sam3d_ss_steps: int | None = Field(
        None, ge=1, le=200, description="Sparse-structure (stage 1) sampling steps; unset: the quality's.")
    sam3d_slat_steps: int | None = Field(
        None, ge=1, le=200, description="Structured-latent (stage 2) sampling steps; unset: the quality's.")
    sam3d_compile: bool = Field(
        False, description="torch.compile SAM 3D Objects' networks (upstream's compile_model, mode max-autotune): "
        "a long first call, for warm workers; not yet measured here.")
    sam3d_decode_formats: tuple[Literal["gaussian", "mesh"], ...] = Field(
        ("gaussian", "mesh"),
        min_length=1,
        description="What stage 2 decodes: gaussian (object.ply) and mesh (GLB). Both are needed: the pipeline's "
        "GLB is built from the splat's colours and the mesh (upstream reads the splat to make it).",
    )

    @field_validator("sam3d_decode_formats")
    @classmethod
    def _sam3d_formats_make_a_glb(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        # SAM 3D Objects @ cf06676, inference_pipeline.py postprocess_slat_output: `to_glb(outputs["gaussian"][0],
        # outputs["mesh"][0], ...)` whenever "mesh" is decoded, so mesh without gaussian raises KeyError there; and
        # gaussian without mesh leaves no GLB (glb = None), which object.glb needs.
        missing = {"gaussian", "mesh"} - set(formats)
        if missing == {"gaussian"}:
            raise ValueError("decode formats ('mesh',) cannot work: SAM 3D Objects builds the GLB from the decoded "
                             "Gaussian splat too (to_glb reads outputs['gaussian']); use gaussian,mesh")
        if missing:
            raise ValueError("decode formats without 'mesh' make no GLB, and every object needs object.glb; "
                             "use gaussian,mesh")
        return formats


def environment_variables(model: type[BaseSettings]) -> dict[str, FieldInfo]:
    """Every environment variable ``model`` reads (its groups' too), with the field it sets."""
    prefix = str(model.model_config.get("env_prefix", ""))
    found: dict[str, FieldInfo] = {}
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseSettings):
            found |= environment_variables(info.annotation)
        else:
            found[(prefix + name).upper()] = info
    return found


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once from the environment (tests call ``get_settings.cache_clear()``)."""
    return Settings()


EPHEMERAL_STARTUP_TIMEOUT_S = 120  # Prefect's default (20 s) is too short on a busy 2-core laptop


def local_prefect_defaults() -> None:
    """Environment defaults for a run on Prefect's ephemeral API (no ``PREFECT_API_URL``), set before Prefect
    is imported; a value the user set wins. Telemetry off (it only adds SQLite lock errors to a local run) and
    a start-up timeout long enough for a loaded machine."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))
