"""The Prefect clients this project opens: one TLS context for all of them.

Prefect builds a new ``ssl.SSLContext`` for every client it opens, loading the CA bundle each time (about 22 ms on
this project's 2-core machine, and ~35 ms for a client's whole start), even for an ``http://`` API. The job API
and the review routes open a client for every request (code inside a flow run reuses the run's own client);
passing one context, built once per process the way Prefect builds it (``PREFECT_API_TLS_INSECURE_SKIP_VERIFY``,
``PREFECT_API_SSL_CERT_FILE``, else certifi's bundle), makes opening a client nearly free. In the local stack's
warm flow-run processes, Prefect's own clients take it too (:func:`share_tls_context`).
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


def share_tls_context() -> None:
    """Make every Prefect client this process opens afterwards (Prefect's own too: the flow engine's, its task
    runs', its log and event workers') take :func:`tls_context` instead of building one, unless it is given one.

    For the local stack's warm flow-run processes (``stack/warm_runs.py``): a run opens about twenty clients, and
    building their contexts was about 0.4 s of CPU per run, some of it before the run reaches Running. The context
    is the one Prefect would build for the same settings (``PrefectClient.__init__`` of the pinned Prefect builds it
    the same way, and httpx uses a given context as it is).
    """
    from prefect.client import orchestration

    for cls in (orchestration.PrefectClient, orchestration.SyncPrefectClient):
        init = cls.__init__
        if getattr(init, "shares_tls_context", False):
            continue

        def shared(self: Any, api: Any, *args: Any, _init: Any = init, httpx_settings: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            settings = dict(httpx_settings or {})
            if not isinstance(settings.get("verify"), ssl.SSLContext):
                settings["verify"] = tls_context()
            _init(self, api, *args, httpx_settings=settings, **kwargs)

        shared.shares_tls_context = True  # type: ignore[attr-defined]
        cls.__init__ = shared  # type: ignore[method-assign]


@contextmanager
def sync_client(**httpx_settings: Any) -> Iterator[Any]:
    """Prefect's sync client (``get_client(sync_client=True)``) with the shared TLS context."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True, httpx_settings={"verify": tls_context(), **httpx_settings}) as client:
        yield client
