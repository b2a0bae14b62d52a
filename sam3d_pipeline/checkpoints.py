"""Model checkpoints from an S3 prefix, checked against a sha256 manifest (no model-hub downloads at run time).

The prefix mirrors the checkpoint folder of the GPU image (``/opt/checkpoints``)::

    manifest.json                              {"version": 1, "files": [{"path", "size", "sha256"}, ...]}
    sam-3d-objects/pipeline.yaml, *.ckpt ...   SAM 3D Objects (facebook/sam-3d-objects, checkpoints/hf)
    sam3/sam3.pt                               SAM 3
    torch/hub/...                              DINOv2 (torch.hub cache; TORCH_HOME=/opt/checkpoints/torch)
    hf/hub/models--Ruicheng--moge-vitl/...     MoGe (Hugging Face cache; HF_HOME=/opt/checkpoints/hf, offline)

``build_manifest`` writes the manifest from a local folder once, after the weights were obtained under their
licences; ``fetch`` downloads what is missing or different, hashing while it streams, and renames each file
into place only when its size and sha256 match, so a folder never holds a partial or wrong checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sam3d_pipeline.errors import InputError, PipelineError
from sam3d_pipeline.settings import Settings, get_settings
from sam3d_pipeline.storage import classify_s3_error, s3_client, split_s3_uri

MANIFEST = "manifest.json"
CHUNK = 8 * 1024 * 1024


class ChecksumError(PipelineError):
    """A downloaded or local checkpoint does not match the manifest."""

    code = "checkpoint_mismatch"


@dataclass
class FetchReport:
    """What ``fetch`` did: file counts, bytes downloaded and wall time (seconds)."""

    downloaded: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    bytes_downloaded: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        mb_s = self.bytes_downloaded / 1e6 / self.seconds if self.seconds > 0 else 0.0
        return (f"{len(self.downloaded)} downloaded ({self.bytes_downloaded / 1e9:.2f} GB, {mb_s:.0f} MB/s), "
                f"{len(self.present)} already present, {self.seconds:.1f} s")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (checkpoints run to gigabytes)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _safe_relpath(path: str) -> PurePosixPath:
    rel = PurePosixPath(path)
    if rel.is_absolute() or not rel.parts or any(p in ("..", "") for p in rel.parts) or path.startswith("/"):
        raise InputError(f"manifest path {path!r} must be relative and stay inside the checkpoint folder")
    return rel


def build_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Manifest of every file under ``folder`` (except an existing ``manifest.json``), sorted by path.

    Returns:
        ``{"version": 1, "files": [{"path": str (posix, relative), "size": int (bytes), "sha256": str}]}``.
    """
    root = Path(folder)
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        files.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return {"version": 1, "files": files}


def parse_manifest(data: bytes, source: str) -> list[dict[str, Any]]:
    """Validate a manifest's shape and paths.

    Raises:
        InputError: not JSON, wrong version, or an entry without a safe path, an int size and a sha256.
    """
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise InputError(f"{source}: manifest is not JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("version") != 1 or not isinstance(manifest.get("files"), list):
        raise InputError(f"{source}: manifest must be {{'version': 1, 'files': [...]}}")
    for entry in manifest["files"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
            raise InputError(f"{source}: bad manifest entry {entry!r}")
        _safe_relpath(entry["path"])
    return manifest["files"]


def select_parts(files: list[dict[str, Any]], parts: str | list[str] | tuple[str, ...] | None) -> list[dict[str, Any]]:
    """The manifest entries under the top-level folders ``parts`` (``"sam3"``, ``"sam3,torch"`` or a list);
    all of them when ``parts`` is empty. Each image fetches only what its models read (``SAM3D_CHECKPOINT_PARTS``).

    Raises:
        InputError: a named part has no file in the manifest (a typo would otherwise start an empty worker).
    """
    names = [p.strip().strip("/") for p in (parts.split(",") if isinstance(parts, str) else parts or []) if p.strip()]
    if not names:
        return list(files)
    chosen = [e for e in files if PurePosixPath(e["path"]).parts[0] in names]
    missing = sorted(set(names) - {PurePosixPath(e["path"]).parts[0] for e in chosen})
    if missing:
        raise InputError(f"the checkpoint manifest has no files under {', '.join(missing)}/ (asked for: "
                         f"{', '.join(names)})")
    return chosen


def folder_digest(files: list[dict[str, Any]], subfolder: str) -> str:
    """Identity of the weights under ``subfolder`` (``"sam-3d-objects"``): sha256 hex over the sorted
    ``"<path> <sha256>\n"`` lines of its manifest entries. Same files, same digest; any changed byte, another one.

    Raises:
        InputError: the manifest has no file under ``subfolder``.
    """
    prefix = subfolder.strip("/") + "/"
    lines = sorted(f"{e['path']} {e['sha256']}\n" for e in files if e["path"].startswith(prefix))
    if not lines:
        raise InputError(f"the checkpoint manifest has no files under {prefix}")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def read_manifest(folder: str | os.PathLike[str]) -> list[dict[str, Any]] | None:
    """The entries of ``<folder>/manifest.json``, or None when the folder has none (a checkpoint not laid out
    by ``fetch``/``manifest``)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return parse_manifest(path.read_bytes(), str(path))


def manifest_sha256(path: str | os.PathLike[str], folder: str | os.PathLike[str] | None) -> str | None:
    """The sha256 the manifest of ``folder`` records for the file at ``path`` (checked when it was fetched), or
    None when ``path`` is not under ``folder`` or not in its manifest. Saves hashing gigabytes at every start."""
    if not folder:
        return None
    try:
        rel = Path(path).resolve().relative_to(Path(folder).resolve()).as_posix()
    except ValueError:
        return None
    files = read_manifest(folder) or []
    size = Path(path).stat().st_size
    return next((e["sha256"] for e in files if e["path"] == rel and e["size"] == size), None)


# The weights each pool declares, so the orchestrator names output prefixes by what the workers will run
# (``sam3_version.version``, ``sam3d_reconstructor.describe``): setting name -> how it is computed.
SAM3_CHECKPOINT_FILE = "sam3/sam3.pt"
SAM3D_FOLDER = "sam-3d-objects"


def declared_identities(folder: str | os.PathLike[str]) -> list[str]:
    """``SETTING=value`` lines for the checkpoint identities found in ``folder``'s manifest (what a deployment sets
    on both pools: the GPU workers check the files they load against them).

    Raises:
        InputError: the folder has no manifest.
    """
    files = read_manifest(folder)
    if files is None:
        raise InputError(f"{folder}: no {MANIFEST} (write it with `fetch_checkpoints.py manifest`)")
    lines = []
    sam3 = next((e for e in files if e["path"] == SAM3_CHECKPOINT_FILE), None)
    if sam3 is not None:
        lines.append(f"SAM3D_SAM3_CHECKPOINT_SHA256={sam3['sha256']}")
    if any(e["path"].startswith(SAM3D_FOLDER + "/") for e in files):
        lines.append(f"SAM3D_SAM3D_CHECKPOINT_SHA256={folder_digest(files, SAM3D_FOLDER)}")
    return lines


def verify(folder: str | os.PathLike[str], files: list[dict[str, Any]], *, hashes: bool = True) -> list[str]:
    """Entries missing or different under ``folder`` (size always; sha256 when ``hashes``)."""
    root = Path(folder)
    bad = []
    for entry in files:
        path = root / _safe_relpath(entry["path"])
        if not path.is_file() or path.stat().st_size != entry["size"] or (
            hashes and sha256_file(path) != entry["sha256"]
        ):
            bad.append(entry["path"])
    return bad


def fetch(source: str, dest: str | os.PathLike[str], settings: Settings | None = None,
          parts: str | list[str] | None = None) -> FetchReport:
    """Bring ``dest`` in line with the manifest at ``source`` (``s3://bucket/prefix``); with ``parts``, only the
    files under those top-level folders (``select_parts``). The manifest is written whole either way.

    Files already present with the right size and sha256 are kept. Each download is hashed as it streams to a
    temporary file beside its target and renamed into place only if it matches; ``manifest.json`` comes last.

    Raises:
        ChecksumError: an object's size or sha256 differs from the manifest (nothing is left at its path).
        InputError: a bad manifest or source URI.
        StorageAccessError / TransientStorageError: S3 refused or failed (classified like all storage calls).
    """
    s = settings or get_settings()
    bucket, prefix = split_s3_uri(source.rstrip("/") + "/")
    client = s3_client(s)
    start = time.perf_counter()
    manifest_key = f"{prefix}{MANIFEST}"
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        data = client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()
    except (BotoCoreError, ClientError) as exc:
        raise classify_s3_error(exc, f"s3://{bucket}/{manifest_key}") from exc
    files = select_parts(parse_manifest(data, f"s3://{bucket}/{manifest_key}"), parts)
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)  # until every file matches the new manifest
    report = FetchReport()
    for entry in files:
        rel = _safe_relpath(entry["path"])
        target = root / rel
        if not verify(root, [entry]):
            report.present.append(entry["path"])
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        key = f"{prefix}{rel.as_posix()}"
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            digest, size = hashlib.sha256(), 0
            try:
                body = client.get_object(Bucket=bucket, Key=key)["Body"]
                with os.fdopen(fd, "wb") as fh:
                    for chunk in body.iter_chunks(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        fh.write(chunk)
            except (BotoCoreError, ClientError) as exc:
                raise classify_s3_error(exc, f"s3://{bucket}/{key}") from exc
            if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
                raise ChecksumError(
                    f"s3://{bucket}/{key}: got {size} bytes sha256 {digest.hexdigest()[:16]}…, manifest says "
                    f"{entry['size']} bytes sha256 {entry['sha256'][:16]}…"
                )
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        report.downloaded.append(entry["path"])
        report.bytes_downloaded += size
    # The manifest goes in last: a folder with a manifest.json holds every file it lists (with ``parts``, the
    # manifest lists those parts only).
    if parts:
        data = json.dumps({"version": 1, "files": files}, indent=1).encode()
    tmp_manifest = root / f".{MANIFEST}.part"
    tmp_manifest.write_bytes(data)
    tmp_manifest.replace(root / MANIFEST)
    report.seconds = time.perf_counter() - start
    return report
