"""Storage behind one interface: a local directory or an S3 prefix. Writes are complete or absent.

Local writes go to a temporary file in the target directory and are renamed into place; S3 PUTs are
atomic per object. A run's prefix is complete once its ``result.json`` exists (written last).
Every boto3 error is classified: 5xx, throttling and connection failures become ``TransientStorageError``
(retried by the Prefect tasks), everything else a permanent error naming the object and the reason. The same
transient-or-not rule (``is_transient_aws_error``) serves every AWS call, S3 and SQS alike.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from sam3d_pipeline.errors import (
    ImageTooLargeError,
    InputError,
    InputNotFoundError,
    PipelineError,
    StorageAccessError,
    TransientStorageError,
)
from sam3d_pipeline.settings import Settings, get_settings

log = logging.getLogger("sam3d_pipeline.storage")

TRANSIENT_S3_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "503",
    "500",
    "502",
    "504",
}
NOT_FOUND_S3_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}


class Storage(Protocol):
    """A place to read and write objects by key (``/``-separated, relative to ``root``)."""

    root: str

    def uri(self, key: str) -> str: ...

    def read_bytes(self, key: str) -> bytes: ...

    def write_bytes(self, key: str, data: bytes, *, content_type: str | None = None,
                    content_encoding: str | None = None) -> str: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def link(self, key: str) -> str: ...


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b.jpg`` → ``("bucket", "a/b.jpg")``.

    Raises:
        InputError: not an ``s3://bucket/...`` URI.
    """
    # Not urlparse: S3 keys may contain '?', '#' and ';', which are literal characters here.
    if not uri.startswith("s3://"):
        raise InputError(f"{uri}: not an s3://bucket/key URI")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise InputError(f"{uri}: not an s3://bucket/key URI")
    return bucket, key


def _join(prefix: str, key: str) -> str:
    key = key.lstrip("/")
    return f"{prefix.rstrip('/')}/{key}" if prefix else key


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


PART_SUFFIX = ".part"


# Folders no output root may resolve to or lie under (``/`` itself is refused too): the system's own.
SYSTEM_FOLDERS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys", "/usr")


def check_local_root(given: str | os.PathLike[str], resolved: Path) -> None:
    """Refuse a local storage root that resolves (symlinks followed) to ``/`` or into a system folder.

    Raises:
        InputError: naming the root as given and where it leads.
    """
    where = resolved.as_posix()
    if where == "/" or any(where == f or where.startswith(f + "/") for f in SYSTEM_FOLDERS):
        raise InputError(f"output root {str(given)!r} resolves to {where}: refusing to write there (choose a "
                         "folder of your own)")


class LocalStorage:
    """Objects as files under a local directory.

    A write goes to ``.<name>.<random>.part`` in the target's folder, then replaces the target. A write that
    was killed leaves its ``.part`` behind; the next write into that folder removes the ones older than
    ``stale_part_s`` (no live write is that old).
    """

    def __init__(self, root: str | os.PathLike[str], stale_part_s: float | None = None):
        self.path = Path(root).expanduser().resolve()
        check_local_root(root, self.path)
        self.root = str(self.path)
        self.stale_part_s = stale_part_s if stale_part_s is not None else get_settings().stale_part_s

    def _file(self, key: str) -> Path:
        target = (self.path / key).resolve()
        if self.path not in target.parents and target != self.path:
            raise InputError(f"{key}: key escapes the storage root {self.root}")
        return target

    def uri(self, key: str) -> str:
        return str(self._file(key))

    def read_bytes(self, key: str) -> bytes:
        target = self._file(key)
        try:
            return target.read_bytes()
        except FileNotFoundError:
            raise InputNotFoundError(f"{target}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{target}: is a directory, not a file") from None
        except PermissionError as exc:
            raise StorageAccessError(f"{target}: permission denied: {exc}") from None

    def write_bytes(self, key: str, data: bytes, *, content_type: str | None = None,
                    content_encoding: str | None = None) -> str:
        """Write ``data`` atomically (readers see the old file or the whole new one). The content type and
        encoding are S3 metadata; a local file is the stored bytes as they are."""
        target = self._file(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_parts(target.parent, self.stale_part_s)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PART_SUFFIX, dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(target)

    def exists(self, key: str) -> bool:
        return self._file(key).is_file()

    def link(self, key: str) -> str:
        """A URL a person can open: ``file://`` for local files."""
        return self._file(key).as_uri()

    def delete(self, key: str) -> None:
        self._file(key).unlink(missing_ok=True)


def remove_stale_parts(folder: Path, older_than_s: float) -> list[Path]:
    """Remove the ``.*.part`` files in ``folder`` last modified more than ``older_than_s`` ago; return them."""
    removed = []
    cutoff = time.time() - older_than_s
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(PART_SUFFIX)):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # another writer's cleanup got there first, or it is not ours to remove
            continue
    if removed:
        log.info("removed %d stale partial write(s) in %s", len(removed), folder)
    return removed


@lru_cache(maxsize=8)
def _s3_client(endpoint_url: str | None, max_attempts: int, timeout_s: float):
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
        signature_version="s3v4",  # presigned links: SigV4 works in every region and carries its own lifetime
    )
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


def s3_client(settings: Settings | None = None):
    """A cached boto3 S3 client configured from settings (honours ``AWS_ENDPOINT_URL``)."""
    s = settings or get_settings()
    endpoint = s.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return _s3_client(endpoint or None, s.s3_max_attempts, s.s3_timeout_s)


def _error_code_and_status(exc: BaseException) -> tuple[str, int]:
    """The AWS error code and HTTP status of a botocore ``ClientError`` (``("", 0)`` for anything else)."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_transient_aws_error(exc: BaseException) -> bool:
    """True when a botocore error from any AWS call (S3, SQS) is worth retrying.

    Transient: 5xx and 429 answers, throttling and slow-down codes (``TRANSIENT_S3_CODES``, any code containing
    ``Throttl``), and connection failures (refused, reset, timed out). Everything else, including errors that
    are not botocore's, is permanent.
    """
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, ConnectionError | HTTPClientError):
        return True
    if isinstance(exc, ClientError):
        code, status = _error_code_and_status(exc)
        return code in TRANSIENT_S3_CODES or "Throttl" in code or status >= 500 or status == 429
    return False


def classify_s3_error(exc: BaseException, what: str) -> PipelineError:
    """Turn a botocore exception into our transient or permanent error, naming ``what`` failed.

    Raises:
        TypeError: ``exc`` is not a botocore error.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    transient = is_transient_aws_error(exc)
    if isinstance(exc, ClientError):
        code, status = _error_code_and_status(exc)
        message = exc.response.get("Error", {}).get("Message") or code
        if transient:
            return TransientStorageError(f"{what}: S3 answered {status} {code}: {message} (will retry)")
        if code in NOT_FOUND_S3_CODES or status == 404:
            return InputNotFoundError(f"{what}: not found ({code or status})")
        if status == 403:
            return StorageAccessError(f"{what}: access denied by S3 (403 {code}); check the credentials' permissions")
        return StorageAccessError(f"{what}: S3 refused the request: {status} {code}: {message}")
    if transient:
        return TransientStorageError(f"{what}: connection to S3 failed: {exc} (will retry)")
    if isinstance(exc, BotoCoreError):
        return StorageAccessError(f"{what}: S3 client error: {exc}")
    raise TypeError(f"not a botocore error: {exc!r}")


def _botocore_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


class S3Storage:
    """Objects under ``s3://bucket/prefix``."""

    def __init__(self, root: str, settings: Settings | None = None):
        self.bucket, self.prefix = split_s3_uri(root)
        self.prefix = self.prefix.strip("/")
        self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = s3_client(settings)
        self.link_expires_s = (settings or get_settings()).link_expires_s

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def read_bytes(self, key: str) -> bytes:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return obj["Body"].read()
        except _botocore_errors() as exc:
            raise classify_s3_error(exc, self.uri(key)) from exc

    def head(self, key: str) -> dict:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except _botocore_errors() as exc:
            raise classify_s3_error(exc, self.uri(key)) from exc

    def write_bytes(self, key: str, data: bytes, *, content_type: str | None = None,
                    content_encoding: str | None = None) -> str:
        """Put the whole object (S3 shows it complete or not at all). ``content_encoding`` (e.g. ``gzip``) is
        sent back on GET, so a browser fetching a presigned URL decompresses it itself."""
        extra = {"ContentType": content_type} if content_type else {}
        if content_encoding:
            extra["ContentEncoding"] = content_encoding
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
        except _botocore_errors() as exc:
            raise classify_s3_error(exc, self.uri(key)) from exc
        return self.uri(key)

    def link(self, key: str, expires_s: int | None = None) -> str:
        """A presigned HTTPS URL a person can open without AWS credentials, valid ``expires_s`` seconds
        (default ``SAM3D_LINK_EXPIRES_S``)."""
        try:
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)},
                ExpiresIn=expires_s or self.link_expires_s,
            )
        except _botocore_errors() as exc:
            raise classify_s3_error(exc, self.uri(key)) from exc

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except InputNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except _botocore_errors() as exc:
            raise classify_s3_error(exc, self.uri(key)) from exc


def open_storage(root: str, settings: Settings | None = None) -> Storage:
    """Storage for a local directory or an ``s3://bucket/prefix`` root."""
    if is_s3_uri(root):
        return S3Storage(root, settings)
    return LocalStorage(root)


def list_uris(uri: str, settings: Settings | None = None) -> list[str]:
    """Every object under an S3 prefix, as ``s3://bucket/key`` URIs in S3's key order (all pages).

    Args:
        uri: ``s3://bucket`` or ``s3://bucket/prefix``; the prefix is a plain key prefix (``s3://b/shop`` also
            lists ``shop-2/...``), as S3 compares it.
        settings: storage settings (endpoint, attempts, timeouts).

    Raises:
        InputError: not an ``s3://bucket/...`` URI.
        TransientStorageError: S3 5xx/throttling/connection failures.
        InputNotFoundError, StorageAccessError: no such bucket, access denied, other refusals.
    """
    bucket, prefix = split_s3_uri(uri)
    client = s3_client(settings)
    uris: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            uris.extend(f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", []))
    except _botocore_errors() as exc:
        raise classify_s3_error(exc, f"listing {uri}") from exc
    return uris


def local_path_error(uri: str, exc: OSError) -> PipelineError:
    """What is wrong with a local path, in words (a symlink loop is not "no such file")."""
    reasons = {
        errno.ENOENT: (InputNotFoundError, "no such file"),
        errno.ELOOP: (InputError, "symbolic link loop (a link that points back to itself)"),
        errno.ENOTDIR: (InputNotFoundError, "a part of the path is a file, not a folder"),
        errno.EACCES: (StorageAccessError, "permission denied"),
        errno.EPERM: (StorageAccessError, "permission denied"),
        errno.ENAMETOOLONG: (InputError, "path is too long"),
        errno.EISDIR: (InputError, "is a directory, not a file"),
    }
    cls, reason = reasons.get(exc.errno, (InputError, exc.strerror or type(exc).__name__))
    return cls(f"{uri}: {reason}")


def read_input(uri: str, settings: Settings | None = None) -> bytes:
    """Read an input file (local path or ``s3://bucket/key``), refusing files over ``max_input_bytes``.

    Raises:
        InputNotFoundError, ImageTooLargeError, StorageAccessError: permanent.
        TransientStorageError: S3 5xx/throttling/connection failures.
    """
    s = settings or get_settings()
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        if not key:
            raise InputError(f"{uri}: no object key")
        store = S3Storage(f"s3://{bucket}", s)
        size = int(store.head(key).get("ContentLength", 0))
        if size > s.max_input_bytes:
            raise ImageTooLargeError(f"{uri}: {size:,} bytes exceeds SAM3D_MAX_INPUT_BYTES={s.max_input_bytes:,}")
        return store.read_bytes(key)
    path = Path(uri).expanduser()
    try:
        info = path.stat()
    except OSError as exc:
        raise local_path_error(uri, exc) from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{uri}: not a regular file")
    size = info.st_size
    if size > s.max_input_bytes:
        raise ImageTooLargeError(f"{uri}: {size:,} bytes exceeds SAM3D_MAX_INPUT_BYTES={s.max_input_bytes:,}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise local_path_error(uri, exc) from None
