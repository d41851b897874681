"""What the gateway checks before a request reaches a route.

- **Host allow-list** (against DNS rebinding): a page served from
  ``http://evil.example`` whose name was re-pointed at 127.0.0.1 sends
  ``Host: evil.example``; only the listen address and localhost names (plus
  ``--allowed-hosts``) are answered.
- **Origin**: a gRPC-Web call from a browser needs the page's own origin or one
  of ``--cors-origins`` (the CORS middleware); a call with a browser's
  ``Sec-Fetch-Site: cross-site``/``same-site`` but no Origin is refused too. Calls
  with no browser context (curl, services) pass: they hold no one's cookies.
- **Rate limit** on control calls (the operator and admin methods of
  ``tensorwire.rpc.auth.METHOD_ROLES``), per bearer token, or per peer address without one.
- **Security headers** on every answer: a CSP without inline script, nosniff,
  no referrer, no framing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import web

from tensorwire.rpc.auth import METHOD_ROLES, Role
from tensorwire.rpc.tls import ServerTls

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_EXPOSED_HEADERS = "grpc-status, grpc-message, grpc-status-details-bin"
_ALLOWED_HEADERS = (
    "content-type, x-grpc-web, x-user-agent, grpc-timeout, authorization, "
    "grpc-accept-encoding, connect-protocol-version"
)
CORS_HEADERS: web.RequestKey[dict[str, str]] = web.RequestKey("cors_headers", dict)
"""CORS headers the middleware granted this request; the proxy adds them to its answer."""

SECURITY_HEADERS = {
    # The page's own script and style files only; inline <style> is the first paint
    # (no inline script anywhere); images drawn from canvases are data:/blob: URLs.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
RPC_SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff"}
"""On gRPC-Web answers: never a document (nothing to frame, script or open), and
on a 64 kbit/s link the page's ~400 bytes of policy on every Ack answer (two a
second) were a tenth of the link."""

CONTROL_METHODS = frozenset(
    path for path, role in METHOD_ROLES.items() if role in (Role.OPERATOR, Role.ADMIN)
)
"""Methods that change state (``/package.Service/Method``)."""


def hostname(host_header: str) -> str:
    """``example.org:8080`` -> ``example.org``; ``[::1]:8080`` -> ``::1``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def default_hosts(listen_host: str) -> frozenset[str]:
    hosts = {"localhost", "127.0.0.1", "::1"}
    if listen_host not in ("", "0.0.0.0", "::"):
        hosts.add(listen_host.lower().strip("[]"))
    return frozenset(hosts)


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimiter:
    """A token bucket per key: ``rate_per_s`` sustained, ``burst`` at once."""

    rate_per_s: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    max_keys: int = 10_000
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def allow(self, key: str) -> bool:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:  # bounded: forget the idlest
                oldest = min(self._buckets, key=lambda k: self._buckets[k].at)
                del self._buckets[oldest]
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate_per_s)
        bucket.at = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True


def caller_key(request: web.Request) -> str:
    """Who is calling, for the rate limit: the token's digest, else the peer address."""
    auth = request.headers.get("Authorization", "")
    if auth:
        return "token:" + hashlib.sha256(auth.encode("utf-8", "replace")).hexdigest()[:32]
    return "peer:" + (request.remote or "?")


class Guard:
    """The gateway's request checks, as one aiohttp middleware."""

    def __init__(self, *, allowed_hosts: Iterable[str], limiter: RateLimiter,
                 on_limited: Callable[[web.Request], web.StreamResponse],
                 tls: ServerTls | None = None) -> None:
        self.tls = tls
        hosts = {h.strip().lower().strip("[]") for h in allowed_hosts if h.strip()}
        self.any_host = "*" in hosts
        self.hosts = frozenset(hosts - {"*"})
        self.limiter = limiter
        self._on_limited = on_limited

    @staticmethod
    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        """``on_response_prepare``: the security headers, also on streamed answers."""
        rpc = response.content_type.startswith("application/grpc-web")
        for key, value in (RPC_SECURITY_HEADERS if rpc else SECURITY_HEADERS).items():
            response.headers.setdefault(key, value)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.tls is not None:
            self.tls.maybe_reload()  # a rotated certificate serves the next connection
        host = hostname(request.host or "")
        if not self.any_host and host not in self.hosts:
            return web.Response(
                status=403, text=f"host {host!r} is not served here (DNS rebinding guard); "
                "add it with --allowed-hosts",
            )
        if request.method == "POST":
            site = request.headers.get("Sec-Fetch-Site", "")
            if "Origin" not in request.headers and site in ("cross-site", "same-site"):
                return web.Response(status=403, text="a cross-site call without an Origin header")
            if request.path in CONTROL_METHODS and not self.limiter.allow(caller_key(request)):
                return self._on_limited(request)
        return await handler(request)


class Cors:
    """The CORS policy: the page's own origin always, others from an allow-list."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.rstrip("/") for o in origins if o != "*")

    def allowed(self, request: web.Request, origin: str) -> bool:
        return self.any or origin in self.origins or origin == f"{request.scheme}://{request.host}"

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        allowed = self.allowed(request, origin)
        if request.method == "OPTIONS":
            if not allowed:
                return web.Response(status=403, text=f"origin {origin} is not allowed")
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get(
                    "Access-Control-Request-Headers", _ALLOWED_HEADERS),
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            })
        if not allowed:
            return web.Response(status=403, text=f"origin {origin} is not allowed")
        request[CORS_HEADERS] = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": _EXPOSED_HEADERS,
            "Vary": "Origin",
        }
        return await handler(request)
