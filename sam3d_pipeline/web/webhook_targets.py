"""Where a webhook may go: its URL's syntax, the addresses its host resolves to, and a connection pinned to the
address that was checked.

A webhook URL is chosen by whoever submits a job, and the web server POSTs to it from inside its network. So a
target must be an ``http(s)`` URL whose host is, or resolves only to, **public** addresses: Python's
``ipaddress`` ``is_global``, with unspecified (``0.0.0.0``, ``::``), loopback, private, link-local (the cloud
metadata endpoints: 169.254.169.254, 169.254.170.2, fd00:ec2::254), multicast, reserved and site-local
addresses refused explicitly, IPv4 addresses inside IPv6 (``::ffff:a.b.c.d``, 6to4) judged as the IPv4 address,
and numeric spellings (``http://2852039166/``, ``http://0xa9fea9fe/``) read as the address they spell. Receivers
on private networks are allowed explicitly (:class:`TargetPolicy`: ``SAM3D_WEBHOOK_ALLOW_NETWORKS``,
``SAM3D_WEBHOOK_ALLOW_HOSTS``). The server's own services (the Prefect API, the S3 endpoint, this web server)
are refused whatever the allow-list says.

The check runs when a job is submitted and again on every attempt, where the name is resolved once, every
address is checked, and the connection goes to a checked address (:func:`post_pinned`: the URL's host still
names the ``Host`` header, TLS SNI and certificate check), so a name that resolves elsewhere between the check and
the connection (DNS rebinding) cannot move the request. Proxies from the environment are not used. Every attempt
has one deadline for all of it (resolving, connecting, sending, the answer and its body), and at most
``max_body_bytes`` of the answer's body are read.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import httpcore

from sam3d_pipeline.settings import Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int, float], list[Address]]

DEFAULT_PORTS = {"http": 80, "https": 443}
LOOPBACK_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
# What an allow-listed host name may resolve to; link-local (metadata), unspecified and multicast addresses need
# an allow-listed network.
_HOST_ALLOWS = frozenset({"private", "loopback", "shared (100.64.0.0/10)", "site-local", "not global"})
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_PATH_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))  # printable ASCII is sent as written; the rest %-encoded


class InvalidTarget(ValueError):
    """The webhook URL is not one this server sends to (its syntax); ``str()`` says why. Permanent."""


class TargetRefused(ValueError):
    """The webhook URL's host is, or resolves to, an address webhooks may not reach; ``str()`` says why.
    Permanent for this URL (it is refused at submission; at delivery the attempt is the last one)."""


class TargetUnresolved(OSError):
    """The host name did not resolve (now): transient, the next attempt resolves again."""


@dataclass(frozen=True)
class Target:
    """A parsed webhook URL.

    Attributes:
        url: the URL as given.
        scheme: ``http`` or ``https``.
        host: the host in ASCII (IDNA), lower case, IPv6 without brackets.
        port: the port (80 / 443 when the URL names none).
        target: path and query as sent on the request line (``/`` when empty; non-ASCII %-encoded).
        literal: the address when the host is one (numeric spellings included), else None (a name).
    """

    url: str
    scheme: str
    host: str
    port: int
    target: str
    literal: Address | None

    @property
    def host_header(self) -> str:
        """``Host``: the host (IPv6 in brackets), with the port unless it is the scheme's default."""
        return self._bracketed if self.port == DEFAULT_PORTS[self.scheme] else self.authority

    @property
    def authority(self) -> str:
        return f"{self._bracketed}:{self.port}"

    @property
    def _bracketed(self) -> str:
        return f"[{self.host}]" if isinstance(self.literal, ipaddress.IPv6Address) else self.host


def parse_url(url: str) -> Target:
    """Parse and check a webhook URL's syntax (no network).

    Raises:
        InvalidTarget: not ``http(s)://``, no host, a control character, space or backslash anywhere, user
            credentials, a bad port, a malformed IPv6 literal or host name.
    """
    scheme_text, sep, _ = url.partition("://")
    if not sep or scheme_text.lower() not in DEFAULT_PORTS:
        raise InvalidTarget("must be an http:// or https:// URL")
    for i, char in enumerate(url):
        if ord(char) <= 0x20 or ord(char) == 0x7F or char == "\\":
            raise InvalidTarget(f"must not contain {char!r} (position {i}): control characters, spaces and "
                                "backslashes are not allowed in a webhook URL")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535", a non-numeric port
        raise InvalidTarget(f"not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if "@" in parts.netloc:
        raise InvalidTarget("must not carry credentials (user:password@); the signature authenticates webhooks")
    if port == 0:
        raise InvalidTarget("port 0 is not a port")
    host = parts.hostname or ""
    if not host:
        raise InvalidTarget("must name a host")
    literal: Address | None
    if parts.netloc.startswith("["):
        try:
            literal = ipaddress.IPv6Address(host)
        except ValueError:
            literal = None
        if literal is None or "%" in host:  # a zone (fe80::1%eth0) names an interface of this machine
            raise InvalidTarget(f"[{host}] is not an IPv6 address a webhook can name")
    else:
        literal = _ipv4_literal(host)
        if literal is None:
            host = _ascii_host(host)
    path = urllib.parse.quote(parts.path or "/", safe=_PATH_SAFE)
    query = urllib.parse.quote(parts.query, safe=_PATH_SAFE)
    return Target(url=url, scheme=scheme, host=str(literal) if literal is not None else host,
                  port=port or DEFAULT_PORTS[scheme], target=path + (f"?{query}" if parts.query else ""),
                  literal=literal)


def _ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a host spells in any form ``inet_aton`` (and so the system's resolver) reads:
    ``169.254.169.254``, ``2852039166``, ``0xa9fea9fe``, ``0251.0376.0251.0376``, ``169.254.43518``."""
    if not re.fullmatch(r"[0-9a-fx.]+", host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _ascii_host(host: str) -> str:
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidTarget(f"{host!r} is not a valid host name") from None
    labels = ascii_host.removesuffix(".").split(".")
    if len(ascii_host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise InvalidTarget(f"{host!r} is not a valid host name")
    return ascii_host


def non_public(address: Address) -> str | None:
    """Why ``address`` is not a public one (``loopback``, ``private``, ``link-local``, ...), or None when it is.
    An IPv4 address inside an IPv6 one (``::ffff:a.b.c.d``, 6to4) is judged as the IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None and (why := non_public(embedded)) is not None:
            return why
    for attribute, name in (("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
                            ("is_link_local", "link-local"), ("is_multicast", "multicast"),
                            ("is_reserved", "reserved"), ("is_private", "private")):
        if getattr(address, attribute):
            return name
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    if address in ipaddress.ip_network("100.64.0.0/10"):
        return "shared (100.64.0.0/10)"
    if not address.is_global:
        return "not global"
    return None


def _in(address: Address, networks: Iterable[Network]) -> bool:
    embedded = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return any(address in net or (embedded is not None and embedded in net) for net in networks)


# Resolving runs in these threads, so one attempt's deadline bounds it (getaddrinfo itself has no timeout).
_RESOLVERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sam3d-webhook-dns")


def resolve_host(host: str, port: int, timeout_s: float) -> list[Address]:
    """Every address ``host`` resolves to (the system resolver), in its order, without duplicates.

    Raises:
        TargetUnresolved: no address, or no answer within ``timeout_s``.
    """
    future = _RESOLVERS.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=max(timeout_s, 0.001))
    except FutureTimeout:
        raise TargetUnresolved(f"{host} did not resolve within {timeout_s:g} s") from None
    except (OSError, UnicodeError) as exc:
        raise TargetUnresolved(f"{host} did not resolve: {exc}") from None
    found: list[Address] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise TargetUnresolved(f"{host} did not resolve to any address")
    return found


@dataclass(frozen=True)
class TargetPolicy:
    """Which addresses webhooks may reach: public ones, plus the allow-lists; never the server's own services.

    Attributes:
        allow_networks: non-public networks receivers may be in (``SAM3D_WEBHOOK_ALLOW_NETWORKS``).
        allow_hosts: host names (lower case, no trailing dot) whose private or loopback addresses receivers may
            have (``SAM3D_WEBHOOK_ALLOW_HOSTS``); link-local, multicast and unspecified ones need a network.
        refused: (network, port) of the server's own services: refused whatever the allow-lists say.
        resolver: host, port, timeout (s) → addresses (the system resolver; tests pass their own).
    """

    allow_networks: tuple[Network, ...] = ()
    allow_hosts: frozenset[str] = frozenset()
    refused: tuple[tuple[Network, int], ...] = ()
    resolver: Resolver = field(default=resolve_host, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings, environ: Mapping[str, str] | None = None,
                      resolver: Resolver = resolve_host) -> TargetPolicy:
        """The policy of ``settings`` (``webhook.allow_networks``, ``webhook.allow_hosts``), refusing the
        services named by ``web_url``, ``review_page_url``, ``s3_endpoint_url`` and, from ``environ`` (the
        process environment by default), ``AWS_ENDPOINT_URL[_S3|_SQS]`` and ``PREFECT_API_URL`` / ``_UI_URL``.

        Raises:
            ValueError: an allow-list entry that is not a network or host name (names the setting).
        """
        env = os.environ if environ is None else environ
        services = [settings.web_url, settings.review_page_url, settings.s3_endpoint_url,
                    *(env.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_SQS",
                                           "PREFECT_API_URL", "PREFECT_UI_URL"))]
        if environ is None:
            services.append(_prefect_api_url())
        return _policy(settings.webhook.allow_networks, settings.webhook.allow_hosts,
                       tuple(sorted({u for u in services if u})), resolver)

    def refusal(self, target: Target, address: Address) -> str | None:
        """Why a webhook to ``target`` may not connect to ``address``, or None when it may."""
        for net, port in self.refused:
            if port == target.port and _in(address, [net]):
                return (f"{target.authority} is one of this server's own services (the Prefect API, "
                        "the S3 endpoint or the web server), never a webhook receiver")
        if _in(address, self.allow_networks):
            return None
        why = non_public(address)
        if why is None:
            return None
        if why in _HOST_ALLOWS and target.literal is None and target.host.removesuffix(".") in self.allow_hosts:
            return None
        what = f"{address} is" if target.literal is not None else f"{target.host} resolves to"
        article = "an" if why[0] in "aeiou" else "a"
        return (f"{what} {article} {why} address, which webhooks may not reach (receivers on private networks are "
                "allowed with SAM3D_WEBHOOK_ALLOW_NETWORKS or SAM3D_WEBHOOK_ALLOW_HOSTS)")

    def addresses(self, target: Target, timeout_s: float) -> list[Address]:
        """The addresses a webhook to ``target`` may connect to: the literal, or every address the name resolves
        to, each one checked (one refused address refuses the name).

        Raises:
            TargetRefused: an address webhooks may not reach.
            TargetUnresolved: the name did not resolve (within ``timeout_s``).
        """
        found = [target.literal] if target.literal is not None else self.resolver(target.host, target.port,
                                                                                   timeout_s)
        for address in found:
            if (why := self.refusal(target, address)) is not None:
                raise TargetRefused(why)
        return found

    def check_url(self, url: str, timeout_s: float = 5.0) -> Target:
        """Parse ``url`` and check where it goes (at submission).

        Raises:
            InvalidTarget, TargetRefused, TargetUnresolved.
        """
        target = parse_url(url)
        self.addresses(target, timeout_s)
        return target


def _prefect_api_url() -> str | None:
    try:
        from prefect.settings import PREFECT_API_URL
    except ImportError:  # Prefect is a dependency; without it there is no API to protect
        return None
    return PREFECT_API_URL.value() or None


@lru_cache(maxsize=16)
def _policy(networks: str, hosts: str, services: tuple[str, ...], resolver: Resolver) -> TargetPolicy:
    allow_networks = []
    for entry in filter(None, (e.strip() for e in networks.split(","))):
        try:
            allow_networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"SAM3D_WEBHOOK_ALLOW_NETWORKS: {entry!r} is not a network (write CIDRs such as "
                             "10.0.0.0/16 or fd00::/8, separated by commas)") from None
    allow_hosts = set()
    for entry in filter(None, (e.strip().lower() for e in hosts.split(","))):
        try:
            allow_hosts.add(_ascii_host(entry).removesuffix("."))
        except InvalidTarget:
            raise ValueError(f"SAM3D_WEBHOOK_ALLOW_HOSTS: {entry!r} is not a host name") from None
    return TargetPolicy(tuple(allow_networks), frozenset(allow_hosts), _service_endpoints(services, resolver),
                        resolver)


def _service_endpoints(urls: Iterable[str], resolver: Resolver) -> tuple[tuple[Network, int], ...]:
    """(network, port) of each service URL's non-public addresses; a loopback or unspecified address stands for
    every loopback address (a service bound to 0.0.0.0 answers on all of them)."""
    endpoints: set[tuple[Network, int]] = set()
    for url in urls:
        try:
            target = parse_url(url)
            found = [target.literal] if target.literal is not None else resolver(target.host, target.port, 2.0)
        except (InvalidTarget, TargetUnresolved):
            continue
        for address in found:
            embedded = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
            plain = embedded or address
            if plain.is_loopback or plain.is_unspecified:
                endpoints.update((net, target.port) for net in LOOPBACK_NETWORKS)
                endpoints.add((ipaddress.ip_network("0.0.0.0/32"), target.port))
                endpoints.add((ipaddress.ip_network("::/128"), target.port))
            elif non_public(address) is not None:
                endpoints.add((ipaddress.ip_network(plain), target.port))
    return tuple(sorted(endpoints, key=lambda e: (e[0].version, str(e[0]), e[1])))


# ---- the pinned connection ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What one POST got.

    Attributes:
        status_code: the receiver's HTTP status, or None when it sent none.
        error: why the attempt failed (None when the receiver answered and its whole answer was read); with a
            status, the answer was not acceptable as sent (too long, not finished in time).
        timed_out: the deadline passed.
    """

    status_code: int | None
    error: str | None = None
    timed_out: bool = False


_ssl_lock = threading.Lock()
_ssl_context: ssl.SSLContext | None = None


def default_ssl_context() -> ssl.SSLContext:
    """httpx's verifying context (certifi's CAs, ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` honoured), made once."""
    global _ssl_context
    with _ssl_lock:
        if _ssl_context is None:
            import httpx

            _ssl_context = httpx.create_ssl_context()
        return _ssl_context


def post_pinned(target: Target, addresses: list[Address], body: bytes, headers: Mapping[str, str],
                deadline: float, max_body_bytes: int, ssl_context: ssl.SSLContext | None = None) -> Answer:
    """POST ``body`` to ``target`` over a connection to one of ``addresses`` (checked by the caller; tried in
    order), with the URL's host in ``Host``, TLS SNI and the certificate check. Everything (connecting, TLS,
    sending, the answer's headers and body) ends by ``deadline`` (``time.monotonic()``); at most
    ``max_body_bytes`` of the body are read. Redirects are not followed; the connection is closed after.

    Returns:
        The :class:`Answer`; it never raises for what the network or the receiver did.
    """
    backend = _PinnedBackend(addresses, deadline)
    sent = [(b"Host", target.host_header.encode()), (b"Content-Length", str(len(body)).encode()),
            (b"Connection", b"close"), *((k.encode(), v.encode()) for k, v in headers.items())]
    url = httpcore.URL(scheme=target.scheme.encode(), host=target.host.encode(), port=target.port,
                       target=target.target.encode())
    left = max(deadline - time.monotonic(), 0.001)
    status: int | None = None
    try:
        with httpcore.ConnectionPool(ssl_context=ssl_context or (default_ssl_context() if target.scheme == "https"
                                                                 else None),
                                     max_connections=1, network_backend=backend) as pool, \
                pool.stream("POST", url, headers=sent, content=body,
                            extensions={"timeout": {"connect": left, "read": left, "write": left,
                                                    "pool": left}}) as response:
            status = response.status
            declared = _content_length(response.headers)
            if declared is not None and declared > max_body_bytes:
                return Answer(status, f"answered {status} with a {declared}-byte body, over the "
                                      f"{max_body_bytes}-byte limit (not read)")
            read = 0
            for chunk in response.iter_stream():
                read += len(chunk)
                if read > max_body_bytes:
                    return Answer(status, f"answered {status} with a body over the {max_body_bytes}-byte limit "
                                          "(not read further)")
    except httpcore.TimeoutException:
        return Answer(status, None, timed_out=True)
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
        return Answer(status, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    return Answer(status)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _left(timeout: float | None, deadline: float, expired: type[Exception]) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the attempt's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write ends by the attempt's deadline (a receiver dripping one byte at a
    time cannot stretch it: each wait gets only the time left)."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner, self._deadline = inner, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, self._deadline, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, self._deadline, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname,
                                      _left(timeout, self._deadline, httpcore.ConnectTimeout))
        return _DeadlineStream(inner, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects to the checked addresses, whatever host the request names (that host stays in ``Host`` and TLS);
    never resolves a name."""

    def __init__(self, addresses: list[Address], deadline: float) -> None:
        self._addresses, self._deadline = list(addresses), deadline
        self._tcp = httpcore.SyncBackend()
        self.connected_to: Address | None = None

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        error: Exception = httpcore.ConnectError("no address to connect to")
        for address in self._addresses:
            try:
                stream = self._tcp.connect_tcp(str(address), port,
                                               _left(timeout, self._deadline, httpcore.ConnectTimeout),
                                               local_address, socket_options)
            except httpcore.ConnectError as exc:  # refused or unreachable: the next address
                error = exc
                continue
            peer = ipaddress.ip_address(str(stream.get_extra_info("server_addr")[0]).split("%", 1)[0])
            if peer != address:
                stream.close()
                raise httpcore.ConnectError(f"connected to {peer}, not the checked {address}")
            self.connected_to = address
            return _DeadlineStream(stream, self._deadline)
        raise error

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("webhooks never use unix sockets")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
