"""The project's own Prefect clients share one TLS context, built as Prefect builds its own."""

import ssl

import certifi
from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings

from sam3d_pipeline.prefect_client import sync_client, tls_context


def test_one_context_per_settings_verifying_like_prefects_own():
    with temporary_settings(updates={PREFECT_API_TLS_INSECURE_SKIP_VERIFY: False,
                                     PREFECT_API_SSL_CERT_FILE: certifi.where()}):
        ctx = tls_context()
        assert tls_context() is ctx  # built once
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        loaded = ssl.create_default_context(cafile=certifi.where()).cert_store_stats()
        assert ctx.cert_store_stats() == loaded  # the configured bundle, as Prefect loads it
    with temporary_settings(updates={PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
        insecure = tls_context()
        assert insecure is not ctx and insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname


def test_the_client_uses_it(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never contacted: the client only opens
    with temporary_settings(updates={PREFECT_API_TLS_INSECURE_SKIP_VERIFY: False}):
        with sync_client(timeout=3) as client:
            pool = client._client._transport._pool
            assert pool._ssl_context is tls_context()
