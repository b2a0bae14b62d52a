"""The Prefect clients this project opens itself: one TLS context for all of them.

Prefect builds a new ``ssl.SSLContext`` for every client it opens, loading the CA bundle each time (about 22 ms on
this project's 2-core machine, and ~35 ms for a client's whole start), even for an ``http://`` API. The job API
and the review routes open a client for every request (code inside a flow run reuses the run's own client);
passing one context, built once per process the way Prefect builds it (``PREFECT_API_TLS_INSECURE_SKIP_VERIFY``,
``PREFECT_API_SSL_CERT_FILE``, else certifi's bundle), makes opening a client nearly free.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=4)
def _context(skip_verify: bool, cert_file: str) -> ssl.SSLContext:
    if skip_verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=cert_file)


def tls_context() -> ssl.SSLContext:
    """The TLS context of this process's Prefect clients, for the current settings (built once per settings)."""
    import certifi
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

    return _context(bool(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value()),
                    PREFECT_API_SSL_CERT_FILE.value() or certifi.where())


@contextmanager
def sync_client(**httpx_settings: Any) -> Iterator[Any]:
    """Prefect's sync client (``get_client(sync_client=True)``) with the shared TLS context."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True, httpx_settings={"verify": tls_context(), **httpx_settings}) as client:
        yield client
