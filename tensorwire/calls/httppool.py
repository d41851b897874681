"""One pooled HTTP client, for the places that really make HTTP calls: fetching
model artifacts from an http(s):// model repository.

``HttpPool`` wraps a single ``httpx.AsyncClient`` with connection limits and
keep-alive, per-request timeouts, retries with backoff on connection errors and
502/503/504 (GET/HEAD only: they are idempotent), size-capped streaming
downloads to disk, and metrics (requests, failures, retries, bytes, connections
opened, reuse rate) with a ``__repr__`` that tells them.

``HttpModelRepository`` mirrors models from a repository served over HTTP(S) by
any static file server (nginx, a bucket's website endpoint, ``python -m
http.server``), laid out like the local one (``tensorwire.serving.modelrepo``)::

    <base>/<model>/config.json
    <base>/<model>/<version>/model.pt

into a local model repository, installing each version atomically
(``modelrepo.install_weights_file``). Versions come from the config's
``version_policy`` (``specific``) or, as plain file servers cannot list folders,
by probing ``<version>/model.pt`` upwards from the newest one held locally.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import Counter

from tensorwire.calls.backoff import Backoff
from tensorwire.errors import (
    DataLossError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from tensorwire.serving import modelrepo

log = logging.getLogger(__name__)

_REQUESTS = Counter("tensorwire_http_requests_total", "HTTP requests of the pooled client.",
                    ["host", "outcome"])
_BYTES = Counter("tensorwire_http_downloaded_bytes_total", "Bytes downloaded.", ["host"])

_RETRY_STATUS = frozenset({502, 503, 504})


@dataclass(frozen=True)
class HttpPoolConfig:
    """Limits of the pooled HTTP client."""

    max_connections: int = 100
    """Open connections in all (the seed's HTTP pool maximum)."""
    max_keepalive_connections: int = 10
    """Idle connections kept for reuse (the seed's HTTP pool minimum)."""
    keepalive_expiry_s: float = 300.0
    """An idle connection is closed after this long (5 min, as the gRPC pool)."""
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    attempts: int = 4
    """Tries of an idempotent request in all."""
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    max_download_bytes: int = 8 * 1024 * 1024 * 1024


class HttpPool:
    """A shared, limited, retrying HTTP client."""

    def __init__(self, config: HttpPoolConfig = HttpPoolConfig(), *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self._backoff = Backoff(initial_s=config.backoff_s, max_s=config.max_backoff_s)
        limits = httpx.Limits(
            max_connections=config.max_connections,
            max_keepalive_connections=config.max_keepalive_connections,
            keepalive_expiry=config.keepalive_expiry_s,
        )
        timeout = httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)
        self._client = httpx.AsyncClient(limits=limits, timeout=timeout, transport=transport,
                                         follow_redirects=True,
                                         event_hooks={"request": [self._on_request]})
        self.requests = self.failures = self.retries = self.bytes = 0
        self._connections_seen: set[int] = set()

    async def _on_request(self, request: httpx.Request) -> None:
        self.requests += 1

    def _note_connection(self, response: httpx.Response) -> None:
        stream = response.extensions.get("network_stream")
        if stream is not None:
            self._connections_seen.add(id(stream))

    @property
    def connections_opened(self) -> int:
        """Distinct connections that carried a response."""
        return len(self._connections_seen)

    @property
    def reuse_rate(self) -> float:
        """Share of requests that went over an already open connection."""
        if not self.requests:
            return 0.0
        return max(0.0, (self.requests - self.connections_opened) / self.requests)

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request, retried with backoff on connection errors and 502/503/504
        when ``method`` is GET or HEAD. The body is read."""
        idempotent = method in ("GET", "HEAD")
        host = httpx.URL(url).host
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._client.request(method, url, **kwargs)
                self._note_connection(response)
                if response.status_code not in _RETRY_STATUS:
                    _REQUESTS.labels(host, str(response.status_code)).inc()
                    return response
                error: Exception = UnavailableError(f"{method} {url}: HTTP {response.status_code}")
            except httpx.TransportError as exc:
                error = UnavailableError(f"{method} {url}: {type(exc).__name__}: {exc}")
            self.failures += 1
            _REQUESTS.labels(host, "error").inc()
            if not idempotent or attempt >= self.config.attempts:
                raise error
            self.retries += 1
            await self._backoff.sleep(attempt)

    async def get_json(self, url: str) -> Any:
        response = await self.request("GET", url)
        if response.status_code == 404:
            raise NotFoundError(f"{url} does not exist (HTTP 404)")
        if response.status_code != 200:
            raise UnavailableError(f"GET {url}: HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError as exc:
            raise InvalidArgumentError(f"{url} is not JSON: {exc}") from None

    async def exists(self, url: str) -> bool:
        response = await self.request("HEAD", url)
        return response.status_code == 200

    async def download(self, url: str, dest: Path) -> int:
        """Stream ``url`` into the file ``dest`` (fsynced); returns its size.
        A body shorter than its Content-Length is DataLossError."""
        host = httpx.URL(url).host
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._client.stream("GET", url) as response:
                    self._note_connection(response)
                    if response.status_code == 404:
                        raise NotFoundError(f"{url} does not exist (HTTP 404)")
                    if response.status_code in _RETRY_STATUS:
                        raise httpx.TransportError(f"HTTP {response.status_code}")
                    if response.status_code != 200:
                        raise UnavailableError(f"GET {url}: HTTP {response.status_code}")
                    expected = response.headers.get("Content-Length")
                    size = 0
                    with open(dest, "wb") as f:
                        async for block in response.aiter_bytes(1 << 20):
                            size += len(block)
                            if size > self.config.max_download_bytes:
                                raise ResourceExhaustedError(
                                    f"{url} exceeds {self.config.max_download_bytes} bytes"
                                )
                            await asyncio.to_thread(f.write, block)
                        await asyncio.to_thread(f.flush)
                        await asyncio.to_thread(os.fsync, f.fileno())
                    if expected is not None and int(expected) != size:
                        raise DataLossError(f"{url}: got {size} of {expected} bytes")
                    self.bytes += size
                    _BYTES.labels(host).inc(size)
                    _REQUESTS.labels(host, "200").inc()
                    return size
            except httpx.TransportError as exc:
                self.failures += 1
                _REQUESTS.labels(host, "error").inc()
                if attempt >= self.config.attempts:
                    raise UnavailableError(f"GET {url}: {exc}") from None
                self.retries += 1
                await self._backoff.sleep(attempt)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> HttpPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"<HttpPool requests {self.requests}, connections {self.connections_opened}, "
            f"reuse {self.reuse_rate:.1%}, failures {self.failures}, retries {self.retries}, "
            f"{self.bytes} bytes downloaded>"
        )


class HttpModelRepository:
    """Mirrors models of an HTTP(S) model repository into a local one."""

    def __init__(self, base_url: str, local: Path, pool: HttpPool) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise InvalidArgumentError(f"model repository URL must be http(s)://..., got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.local = Path(local)
        self.pool = pool
        self._locks: dict[str, asyncio.Lock] = {}

    def _url(self, *parts: object) -> str:
        return "/".join([self.base_url, *(str(p) for p in parts)])

    async def sync(self, name: str) -> list[int]:
        """Fetch ``name``'s config and every version it lacks; returns the versions
        now held locally. Raises NotFoundError when the model is not served."""
        modelrepo.check_name(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            config = modelrepo.validate_config(await self.pool.get_json(self._url(name, "config.json")), name)
            have = set(modelrepo.list_versions(self.local, name))
            policy: modelrepo.VersionPolicy = config["version_policy"]
            if policy.kind == "specific":
                wanted = list(policy.versions)
            else:
                wanted, probe = [], max(have, default=0) + 1
                while await self.pool.exists(self._url(name, probe, modelrepo.WEIGHTS_FILE)):
                    wanted.append(probe)
                    probe += 1
            folder = self.local / name
            folder.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(modelrepo.write_config, self.local, name, config)
            for version in sorted(set(wanted) - have):
                staging = Path(tempfile.mkdtemp(prefix=".fetch-", suffix=".tmp", dir=folder))
                try:
                    weights = staging / modelrepo.WEIGHTS_FILE
                    await self.pool.download(self._url(name, version, modelrepo.WEIGHTS_FILE), weights)
                    await asyncio.to_thread(
                        modelrepo.install_weights_file, self.local, name, config["kind"], weights,
                        version=version,
                    )
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
                log.info("fetched %s version %d from %s", name, version, self.base_url)
            return modelrepo.list_versions(self.local, name)

    def __repr__(self) -> str:
        return f"<HttpModelRepository {self.base_url} -> {str(self.local)!r} via {self.pool!r}>"

