"""Storage: local directory and S3 (a real moto server over HTTP), complete-or-absent writes, error classes."""

from __future__ import annotations

import os

import pytest

from sam3d_pipeline.errors import (
    ImageTooLargeError,
    InputError,
    InputNotFoundError,
    StorageAccessError,
    TransientStorageError,
    is_transient,
)
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import LocalStorage, S3Storage, open_storage, read_input, split_s3_uri


def test_local_write_is_atomic_and_readable(tmp_path):
    store = open_storage(str(tmp_path / "root"))
    assert isinstance(store, LocalStorage)
    uri = store.write_bytes("a/b/c.bin", b"hello")
    assert uri == str(tmp_path / "root" / "a" / "b" / "c.bin")
    assert store.read_bytes("a/b/c.bin") == b"hello" and store.exists("a/b/c.bin")
    assert oct(os.stat(uri).st_mode & 0o777) != oct(0o600)  # honours the umask, not mkstemp's 0600
    assert not [p for p in (tmp_path / "root" / "a" / "b").iterdir() if p.name.endswith(".part")]
    store.delete("a/b/c.bin")
    assert not store.exists("a/b/c.bin")
    assert store.link("x.png").startswith("file://")


def test_local_failed_write_leaves_nothing(tmp_path, monkeypatch):
    store = LocalStorage(tmp_path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes("out.bin", b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


def test_local_keys_cannot_escape_the_root(tmp_path):
    with pytest.raises(InputError, match="escapes the storage root"):
        LocalStorage(tmp_path / "root").write_bytes("../evil.txt", b"x")


def test_local_read_errors(tmp_path):
    with pytest.raises(InputNotFoundError, match="no such file"):
        read_input(str(tmp_path / "missing.jpg"))
    with pytest.raises(InputError, match="not a regular file"):
        read_input(str(tmp_path))
    big = tmp_path / "big.jpg"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(ImageTooLargeError, match="2,048 bytes exceeds SAM3D_MAX_INPUT_BYTES=1,024"):
        read_input(str(big), Settings(max_input_bytes=1024))


def test_split_s3_uri():
    assert split_s3_uri("s3://bucket/a/b c.jpg") == ("bucket", "a/b c.jpg")
    assert split_s3_uri("s3://bucket/what?#1;x.jpg") == ("bucket", "what?#1;x.jpg")
    assert split_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(InputError, match="not an s3://bucket/key URI"):
        split_s3_uri("http://bucket/key")


@pytest.mark.slow
def test_s3_round_trip_against_moto_server(s3):
    client, bucket = s3
    store = open_storage(f"s3://{bucket}/outputs/")
    assert isinstance(store, S3Storage) and store.root == f"s3://{bucket}/outputs"
    uri = store.write_bytes("run/result.json", b"{}", content_type="application/json")
    assert uri == f"s3://{bucket}/outputs/run/result.json"
    head = client.head_object(Bucket=bucket, Key="outputs/run/result.json")
    assert head["ContentType"] == "application/json"
    assert store.read_bytes("run/result.json") == b"{}"
    assert store.exists("run/result.json") and not store.exists("run/other.json")
    assert store.link("run/result.json").startswith("http")
    store.delete("run/result.json")
    assert not store.exists("run/result.json")


@pytest.mark.slow
def test_s3_input_read_and_limits(s3):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="photos/a b+c.jpg", Body=b"x" * 3000)
    assert read_input(f"s3://{bucket}/photos/a b+c.jpg") == b"x" * 3000
    with pytest.raises(ImageTooLargeError, match="3,000 bytes"):
        read_input(f"s3://{bucket}/photos/a b+c.jpg", Settings(max_input_bytes=100))
    with pytest.raises(InputNotFoundError, match=f"s3://{bucket}/photos/missing.jpg: not found"):
        read_input(f"s3://{bucket}/photos/missing.jpg")
    with pytest.raises(InputNotFoundError):
        read_input("s3://no-such-bucket-here/x.jpg")


@pytest.mark.slow
def test_s3_errors_are_classified(s3, faulty_s3):
    client, bucket = s3
    store = open_storage(f"s3://{bucket}/out")
    faulty_s3.fail_next(1, 503, "SlowDown")
    with pytest.raises(TransientStorageError, match="503 SlowDown") as info:
        store.write_bytes("k", b"v")
    assert is_transient(info.value)
    faulty_s3.fail_next(1, 500, "InternalError")
    with pytest.raises(TransientStorageError):
        store.read_bytes("k")
    faulty_s3.fail_next(1, 403, "AccessDenied")
    with pytest.raises(StorageAccessError, match=r"access denied by S3 \(403 AccessDenied\)") as info:
        store.write_bytes("k", b"v")
    assert not is_transient(info.value)
    store.write_bytes("k", b"v")  # the proxy forwards once no failure is queued
    assert store.read_bytes("k") == b"v"


@pytest.mark.slow
def test_s3_connection_refused_is_transient(monkeypatch):
    from .servers import free_port

    monkeypatch.setenv("SAM3D_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("SAM3D_S3_MAX_ATTEMPTS", "1")
    from sam3d_pipeline.settings import get_settings

    get_settings.cache_clear()
    with pytest.raises(TransientStorageError, match="connection to S3 failed"):
        open_storage("s3://bucket/out").write_bytes("k", b"v")


def test_gzip_encoded_embeddings_reach_a_browser_decompressed_and_python_decodes_them(s3):
    """Stored gzip-encoded with Content-Encoding metadata: a presigned GET (what the review page fetches) is
    decompressed by the HTTP client, and ``embeddings.decode`` reads the stored bytes directly."""
    import numpy as np
    import requests

    from sam3d_pipeline.backends.sam3 import embeddings

    _, bucket = s3
    store = open_storage(f"s3://{bucket}/out")
    rng = np.random.default_rng(0)
    tensors = {"image_embed": rng.standard_normal((1, 8, 16, 16)).astype(np.float32)}
    blob = embeddings.encode(tensors)
    store.write_bytes("p/review/embeddings.bin", embeddings.compress(blob), content_type="application/octet-stream",
                      content_encoding="gzip")
    assert store.head("p/review/embeddings.bin")["ContentEncoding"] == "gzip"
    fetched = requests.get(store.link("p/review/embeddings.bin", expires_s=60), timeout=10)
    assert fetched.status_code == 200 and fetched.headers["Content-Encoding"] == "gzip"
    assert fetched.content == blob  # undone by the client, as a browser does
    decoded = embeddings.decode(store.read_bytes("p/review/embeddings.bin"))
    assert np.abs(decoded["image_embed"] - tensors["image_embed"]).max() < 0.2


@pytest.mark.slow
def test_list_uris_lists_a_key_prefix_in_key_order(s3):
    from sam3d_pipeline.storage import list_uris

    client, bucket = s3
    for key in ("shop/b.png", "shop/a.png", "shop/deep/c.png", "shop-2/d.png", "other/e.png"):
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    assert list_uris(f"s3://{bucket}/shop/") == [f"s3://{bucket}/shop/{k}" for k in ("a.png", "b.png", "deep/c.png")]
    assert list_uris(f"s3://{bucket}/shop") == [*list_uris(f"s3://{bucket}/shop-"), *list_uris(f"s3://{bucket}/shop/")]
    assert len(list_uris(f"s3://{bucket}")) == 5
    assert list_uris(f"s3://{bucket}/nothing-here/") == []
    with pytest.raises(InputNotFoundError, match="listing s3://no-such-bucket-here/x"):
        list_uris("s3://no-such-bucket-here/x")
    with pytest.raises(InputError, match="not an s3://bucket/key URI"):
        list_uris("/local/folder")


@pytest.mark.slow
def test_one_transient_rule_for_every_aws_call(s3, faulty_s3):
    """``is_transient_aws_error`` (the events bridge's rule for SQS and S3) agrees with ``classify_s3_error``."""
    from botocore.exceptions import BotoCoreError, ClientError

    from sam3d_pipeline.storage import classify_s3_error, is_transient_aws_error, s3_client

    from .servers import free_port

    _, bucket = s3
    client = s3_client()

    def failure(status: int, code: str) -> ClientError:
        faulty_s3.fail_next(1, status, code)
        with pytest.raises(ClientError) as info:
            client.put_object(Bucket=bucket, Key="k", Body=b"v")
        return info.value

    cases = {(503, "SlowDown"): True, (500, "InternalError"): True, (429, "TooManyRequests"): True,
             (400, "ThrottlingException"): True, (400, "RequestTimeout"): True,
             (403, "AccessDenied"): False, (404, "NoSuchBucket"): False, (400, "InvalidArgument"): False}
    for (status, code), transient in cases.items():
        exc = failure(status, code)
        assert is_transient_aws_error(exc) is transient, (status, code)
        assert is_transient(classify_s3_error(exc, "k")) is transient, (status, code)
    refused = s3_client(Settings(s3_endpoint_url=f"http://127.0.0.1:{free_port()}", s3_max_attempts=1))
    with pytest.raises(BotoCoreError) as info:
        refused.put_object(Bucket=bucket, Key="k", Body=b"v")
    assert is_transient_aws_error(info.value) and is_transient(classify_s3_error(info.value, "k"))
    assert not is_transient_aws_error(ValueError("not an AWS error"))
