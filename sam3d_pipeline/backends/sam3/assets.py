"""Files the SAM 3 backend needs besides code: the BPE vocabulary and the checkpoint. No torch import here.

Checkpoints are never downloaded implicitly: a local path is used as is, an ``s3://`` URI is copied once
into the cache directory (atomically, size and optional sha256 checked), and the Hugging Face hub is used
only when ``sam3_allow_hub`` is set.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sam3d_pipeline.checkpoints import manifest_sha256, sha256_file
from sam3d_pipeline.errors import BackendUnavailableError, InputError
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import classify_s3_error, is_s3_uri, s3_client, split_s3_uri

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_MD5 = "933b7abbbbde62c36f02f0e6ccde464f"
HUB_REPO = "facebook/sam3"
HUB_FILE = "sam3.pt"
HUB_PREFIX = "hf://"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def file_md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 (identity check of a public file, not security)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_bpe_vocab(settings: Settings | None = None) -> Path:
    """The CLIP BPE vocabulary SAM 3's tokenizer reads.

    Looks in the sam3 package (``sam3/../assets``, where ``model_builder.build_sam3_image_model`` expects
    it; the 0.1.4 wheel does not ship it), then beside the checkpoint in the image's checkpoint folder
    (``<SAM3D_CHECKPOINT_DIR>/sam3/``), then in ``open_clip_torch`` (the identical file); each md5-checked.

    Returns:
        Path of ``bpe_simple_vocab_16e6.txt.gz``.

    Raises:
        BackendUnavailableError: neither package has the file (says what to install).
    """
    candidates = []
    sam3_dir = _package_dir("sam3")
    if sam3_dir is not None:
        candidates += [sam3_dir.parent / "assets" / VOCAB_NAME, sam3_dir / "assets" / VOCAB_NAME]
    if settings is not None and settings.checkpoint_dir:
        candidates.append(Path(settings.checkpoint_dir) / "sam3" / VOCAB_NAME)
    clip_dir = _package_dir("open_clip")
    if clip_dir is not None:
        candidates.append(clip_dir / VOCAB_NAME)
    for path in candidates:
        if path.is_file() and file_md5(path) == VOCAB_MD5:
            return path
    raise BackendUnavailableError(
        f"SAM 3 text vocabulary {VOCAB_NAME} not found (looked in: {', '.join(map(str, candidates)) or 'nothing'});"
        " install open_clip_torch (pip install 'sam3d-pipeline[sam3]'), which ships the identical file"
    )


@dataclass(frozen=True)
class CheckpointRef:
    """Where a checkpoint came from, where it is on disk, and its sha256 (hex)."""

    source: str  # what was configured
    path: Path
    size_bytes: int
    sha256: str = ""


def cache_dir(settings: Settings) -> Path:
    return Path(os.path.expanduser(settings.model_cache_dir))


def _download_s3(uri: str, settings: Settings) -> Path:
    bucket, key = split_s3_uri(uri)
    target = cache_dir(settings) / "s3" / bucket / key
    expected_sha = (settings.sam3_checkpoint_sha256 or "").lower() or None
    client = s3_client(settings)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001 (classified: transient or permanent)
        raise classify_s3_error(exc, f"checkpoint {uri}") from exc
    size = int(head["ContentLength"])
    if target.is_file() and target.stat().st_size == size:
        if expected_sha is None or sha256_file(target) == expected_sha:
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".part-", suffix=".pt")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            client.download_file(bucket, key, str(tmp))
        except Exception as exc:  # noqa: BLE001 (classified: transient or permanent)
            raise classify_s3_error(exc, f"checkpoint {uri}") from exc
        got = tmp.stat().st_size
        if got != size:
            raise BackendUnavailableError(f"checkpoint {uri}: downloaded {got} bytes, expected {size}")
        if expected_sha is not None:
            actual = sha256_file(tmp)
            if actual != expected_sha:
                raise BackendUnavailableError(
                    f"checkpoint {uri}: sha256 {actual} does not match the configured {expected_sha}; refusing it"
                )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _download_hub(source: str, settings: Settings) -> Path:
    if not settings.sam3_allow_hub:
        raise BackendUnavailableError(
            f"checkpoint {source}: downloading from the Hugging Face hub is off; set SAM3D_SAM3_ALLOW_HUB=true "
            "to allow it, or point SAM3D_SAM3_CHECKPOINT at a local file or s3:// URI"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    repo = source[len(HUB_PREFIX):].strip("/") or HUB_REPO
    try:
        return Path(hf_hub_download(repo_id=repo, filename=HUB_FILE, cache_dir=str(cache_dir(settings) / "hf")))
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise BackendUnavailableError(
                f"checkpoint {source}: the hub answered {status}. {repo} is gated: accept its licence on "
                f"https://huggingface.co/{repo} with your account, then run `hf auth login` (or set HF_TOKEN)"
            ) from exc
        raise


def resolve_checkpoint(settings: Settings) -> CheckpointRef | None:
    """Find (and for s3:// or the hub, fetch once) the configured checkpoint.

    Returns:
        The checkpoint on local disk, or None when none is configured.

    Raises:
        InputError: a local path that does not exist or is not a readable file.
        BackendUnavailableError: hub not allowed, gated access refused, size or sha256 mismatch.
        StorageAccessError, TransientStorageError: S3 failures (classified).
    """
    source = settings.sam3_checkpoint
    if not source:
        return None
    if is_s3_uri(source):
        path = _download_s3(source, settings)
    elif source.startswith(HUB_PREFIX):
        path = _download_hub(source, settings)
    else:
        path = Path(os.path.expanduser(source))
        if not path.is_file():
            raise InputError(
                f"checkpoint {source}: no such file (set SAM3D_SAM3_CHECKPOINT to sam3.pt, an s3:// URI, "
                "or hf://facebook/sam3 with SAM3D_SAM3_ALLOW_HUB=true)"
            )
        if not os.access(path, os.R_OK):
            raise InputError(f"checkpoint {source}: file is not readable")
    return CheckpointRef(source=source, path=path, size_bytes=path.stat().st_size,
                         sha256=checkpoint_sha256(source, path, settings))


def checkpoint_sha256(source: str, path: Path, settings: Settings) -> str:
    """The loaded file's sha256: from the checkpoint folder's manifest when the file is listed there with its size
    (checked when it was fetched), else hashed here (seconds per GB).

    Raises:
        BackendUnavailableError: it differs from the declared ``SAM3D_SAM3_CHECKPOINT_SHA256`` (both named).
    """
    actual = manifest_sha256(path, settings.checkpoint_dir) or sha256_file(path)
    declared = (settings.sam3_checkpoint_sha256 or "").lower()
    if declared and actual != declared:
        raise BackendUnavailableError(
            f"checkpoint {source}: this worker's SAM 3 weights have sha256 {actual[:12]}…, the pool declares "
            f"{declared[:12]}… (SAM3D_SAM3_CHECKPOINT_SHA256); refusing to label one as the other"
        )
    return actual
