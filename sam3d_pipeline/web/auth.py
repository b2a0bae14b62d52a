"""Bearer tokens: every job API and review call sends ``Authorization: Bearer <token>`` (the scheme in any case).

Tokens come from settings (``SAM3D_API_TOKEN``; the review page's ``SAM3D_REVIEW_TOKEN`` is accepted too) and are
compared in constant time. A token in the URL query is refused on every path (query strings end up in logs and
browser history); pages take theirs from the URL fragment (``#token=...``), which browsers never send.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable, Iterable

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

REALM = 'Bearer realm="sam3d"'
QUERY_TOKEN_REFUSED = ("a token in the URL query is refused (query strings end up in logs and browser history): send "
                       "it as 'Authorization: Bearer <token>', or open the page as /#token=<token>")


def new_token() -> str:
    return secrets.token_urlsafe(24)


def token_matches(authorization: str | None, tokens: Iterable[str]) -> bool:
    """True when the ``Authorization`` header is ``Bearer <one of tokens>`` (any case of the scheme, spaces
    around the token ignored)."""
    scheme, _, given = (authorization or "").strip().partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        return False
    matched = False
    for token in tokens:  # every token is compared, so the time taken does not say which one matched
        matched |= hmac.compare_digest(given.encode(), token.encode())
    return matched


def bearer(tokens: Iterable[str]) -> Callable[[Request], None]:
    """A FastAPI dependency refusing a request without one of ``tokens`` (401 with ``WWW-Authenticate``)."""
    known = tuple(t for t in tokens if t)
    if not known:
        raise ValueError("the web server needs at least one token")

    scheme = HTTPBearer(auto_error=False, description="The server's token (SAM3D_API_TOKEN).")

    def authorised(request: Request, _: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        # ``scheme`` only documents the header in the OpenAPI schema; the header is checked here.
        if not token_matches(request.headers.get("authorization"), known):
            raise HTTPException(status_code=401, detail="missing or wrong token (send 'Authorization: Bearer "
                                "<token>')", headers={"WWW-Authenticate": REALM})

    return authorised
