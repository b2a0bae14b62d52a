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


SHARED = """
import ssl
from prefect.client.orchestration import get_client
from sam3d_pipeline.prefect_client import share_tls_context, tls_context

def context(client):
    return client._client._transport._pool._ssl_context

before = context(get_client())
share_tls_context()
share_tls_context()  # once is enough: not wrapped twice
own = ssl.create_default_context()
clients = [get_client(), get_client(), get_client(sync_client=True)]
print(before is not tls_context(), all(context(c) is tls_context() for c in clients),
      context(get_client(httpx_settings={"verify": own})) is own)
"""


def test_shared_in_a_process_every_prefect_client_takes_it_unless_given_one():
    """``share_tls_context`` (the warm flow-run processes) changes Prefect's clients in its own process only: run it
    in one."""
    import os
    import subprocess
    import sys

    env = os.environ | {"PREFECT_API_URL": "http://127.0.0.1:9/api"}  # never contacted: the clients only open
    out = subprocess.run([sys.executable, "-c", SHARED], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True"]
