"""A pool of grpc.aio channels per target, shared by every caller in a process.

One gRPC channel is one HTTP/2 connection (per address), and an HTTP/2 connection
carries at most ``MAX_CONCURRENT_STREAMS`` calls at once (100 on most servers and
proxies); calls beyond it wait in the client. The pool keeps several *distinct*
channels to a target and hands out the least busy one::

    async with ChannelPool("inference:8001", max_size=4) as pool:
        async with pool.acquire() as channel:
            reply = await stub_for(channel).ModelInfer(request)

How it behaves:

- Every channel gets a unique channel argument (``tensorwire.pool_channel``), so
  gRPC's global subchannel sharing cannot fold them onto one TCP connection.
- ``acquire()`` picks the open channel with the fewest calls in flight. When even
  that one is near ``max_streams_per_channel`` and the pool is below ``max_size``,
  a new channel is opened; at ``max_size`` the least busy channel is used anyway
  (gRPC queues the call) and the pick counts as ``saturated``.
- A channel unused for ``idle_timeout_s`` is closed (never below ``min_size``).
- A channel older than ``max_age_s`` is retired: it takes no new calls, the calls
  on it finish (graceful drain), then it closes. Its replacement connects afresh,
  so long-lived clients re-balance onto new pods behind a Service.
- Every ``health_check_interval_s`` each channel runs grpc.health.v1 ``Check``;
  a channel that fails is retired the same way and replaced.
- Targets: ``host:port``, a comma list ``a:1,b:2`` or ``dns:///name:port`` (every
  address of the name, re-resolved at each health pass: a headless Service's pods).
  Channels are spread over the addresses; ``min_size`` grows to one per address.

All state lives in one list of ``PooledChannel``; the transitions are synchronous
methods that *return* the channels to close, and the closing happens after, in
tasks the pool owns (the model is httpcore's connection pool). Time comes from an
injectable ``clock`` so tests move it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import itertools
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter, Gauge

from tensorwire.calls.periodic import Periodic
from tensorwire.errors import InvalidArgumentError, UnavailableError
from tensorwire.rpc.auth import ClientSecurity

log = logging.getLogger(__name__)

CHANNEL_ID_ARG = "tensorwire.pool_channel"
"""The channel argument that makes each pooled channel distinct."""

_CREATED = Counter(
    "tensorwire_channel_pool_created_total", "Channels opened by the pool.", ["target"]
)
_ACQUIRED = Counter(
    "tensorwire_channel_pool_acquired_total",
    "Channel acquisitions, by whether an existing channel was reused.",
    ["target", "reused"],
)
_FAILED = Counter(
    "tensorwire_channel_pool_failed_total",
    "Calls that ended UNAVAILABLE on a pooled channel (connection failures).",
    ["target"],
)
_HEALTH = Counter(
    "tensorwire_channel_pool_health_checks_total",
    "grpc.health.v1 checks of pooled channels, by result.",
    ["target", "result"],
)
_CLOSED = Counter(
    "tensorwire_channel_pool_closed_total",
    "Channels closed by the pool, by reason (idle, max_age, unhealthy, gone, pool_closed).",
    ["target", "reason"],
)
_SIZE = Gauge("tensorwire_channel_pool_size", "Open channels (not draining).", ["target"])
_IN_USE = Gauge("tensorwire_channel_pool_in_use", "Calls and streams in flight.", ["target"])

_id_counter = itertools.count(1)


class ChannelState(enum.Enum):
    OPEN = "open"
    """Takes new calls."""
    DRAINING = "draining"
    """Retired (max age, failed health check, address gone): in-flight calls finish, no new ones."""
    CLOSED = "closed"


@dataclass
class PooledChannel:
    """One channel of the pool and what the pool knows about it."""

    id: int
    address: str
    channel: grpc.aio.Channel
    created_at: float
    last_used_at: float
    active: int = 0
    """Calls/streams currently holding this channel."""
    uses: int = 0
    state: ChannelState = ChannelState.OPEN
    reason: str = ""
    """Why it is draining or closed."""

    def __repr__(self) -> str:
        extra = f", {self.reason}" if self.reason else ""
        return (
            f"<PooledChannel #{self.id} {self.address} [{self.state.value}{extra}], "
            f"{self.active} active, {self.uses} uses>"
        )


@dataclass(frozen=True)
class PoolMetrics:
    """A snapshot of a pool's counters."""

    created: int
    """Channels opened."""
    reused: int
    """Acquisitions served by an already open channel."""
    failed: int
    """Calls that ended UNAVAILABLE (connection failures)."""
    size: int
    """Open channels now (draining ones not counted)."""
    in_use: int
    """Calls and streams in flight now."""
    health_pass: int
    health_fail: int
    saturated: int
    """Acquisitions at max_size where every channel was near its stream limit."""
    retired: int
    """Channels retired for max age or a failed health check."""
    closed_idle: int
    """Channels closed after idle_timeout_s."""
    acquisitions: int
    """Every ``acquire()`` so far."""

    @property
    def reuse_rate(self) -> float:
        """Share of acquisitions served by an already open channel (0..1)."""
        return self.reused / self.acquisitions if self.acquisitions else 0.0


def _format_host_port(host: str, port: int | str) -> str:
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def _split_host_port(target: str, original: str) -> tuple[str, int]:
    if target.startswith("["):
        host, sep, port = target[1:].partition("]:")
    else:
        host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgumentError(
            f"target {original!r}: {target!r} is not host:port (port 1-65535)"
        )
    return host, int(port)


Connect = Callable[[str, Sequence[tuple[str, Any]], "grpc.ChannelCredentials | None",
                    "Sequence[grpc.aio.ClientInterceptor] | None"], grpc.aio.Channel]
"""How the pool makes one channel: (address, options, credentials, interceptors)."""


def grpc_connect(address: str, options: Sequence[tuple[str, Any]],
                 credentials: grpc.ChannelCredentials | None,
                 interceptors: Sequence[grpc.aio.ClientInterceptor] | None) -> grpc.aio.Channel:
    """A grpc.aio channel: TLS when ``credentials`` are given, plaintext otherwise."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


def _dns_host_port(target: str) -> tuple[str, int]:
    """Host and port of a ``dns:[//authority/]name:port`` target."""
    rest = target.strip()[4:]
    if rest.startswith("//"):
        rest = rest[2:].split("/", 1)[1] if "/" in rest[2:] else rest[2:]
    return _split_host_port(rest, target)


def _dns_name(target: str) -> str:
    return _dns_host_port(target)[0]


def resolve_targets(target: str) -> list[str]:
    """The addresses behind a target, as ``host:port`` strings.

    ``"host:port"`` gives itself, ``"a:1,b:2"`` each entry, ``"dns:///name:port"``
    every address DNS has for ``name`` (sorted, deduplicated), e.g. the pods of a
    Kubernetes headless Service. Raises InvalidArgumentError for a malformed target
    and UnavailableError when the name does not resolve.
    """
    if not isinstance(target, str) or not target.strip():
        raise InvalidArgumentError(f"target must be host:port, a:1,b:2 or dns:///name:port, got {target!r}")
    target = target.strip()
    if target.startswith("dns:"):
        host, port = _dns_host_port(target)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise UnavailableError(f"cannot resolve {host!r} (target {target!r}): {exc}") from None
        addresses = {_format_host_port(str(info[4][0]), port) for info in infos}
        return sorted(addresses)
    out: list[str] = []
    for part in target.split(","):
        part = part.strip()
        if not part:
            continue
        host, port = _split_host_port(part, target)
        address = _format_host_port(host.strip("[]"), port)
        if address not in out:
            out.append(address)
    if not out:
        raise InvalidArgumentError(f"target {target!r} names no address")
    return out


class ChannelPool:
    """Distinct grpc.aio channels to one target, handed out least-busy first."""

    def __init__(
        self,
        target: str,
        *,
        min_size: int = 1,
        max_size: int = 8,
        max_streams_per_channel: int = 100,
        idle_timeout_s: float = 300.0,
        max_age_s: float = 600.0,
        health_check_interval_s: float = 30.0,
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        security: ClientSecurity | None = None,
        health_service: str = "",
        health_check_timeout_s: float = 5.0,
        close_grace_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        name: str | None = None,
        connect: Connect | None = None,
    ) -> None:
        """
        :param target: ``host:port``, ``a:1,b:2`` or ``dns:///name:port``.
        :param min_size: channels kept open even when idle (raised to the number of
            addresses, capped at ``max_size``).
        :param max_size: most open channels.
        :param max_streams_per_channel: the server's HTTP/2 concurrent-stream limit;
            a new channel opens when the least busy one is within 10 % of it.
        :param idle_timeout_s: close a channel unused this long (0 = never).
        :param max_age_s: retire (drain, then close) a channel this old (0 = never).
        :param health_check_interval_s: grpc.health.v1 check period (0 = no checks).
        :param options: grpc channel arguments for every channel.
        :param credentials: TLS credentials; None = plaintext (or ``security``'s).
        :param security: bearer token and TLS of the calling program; its token goes
            into every call that brings no ``authorization`` metadata of its own.
        :param health_service: the service name asked in health checks ("" = server).
        :param health_check_timeout_s: deadline of one health check.
        :param close_grace_s: in-flight calls get this long when the pool closes.
        :param clock: monotonic seconds; tests pass a fake one.
        :param name: label in metrics and logs (default: the target).
        :param connect: makes one channel (address, options, credentials, interceptors);
            grpc.aio's by default, a scripted fake in socket-free tests.
        """
        if not 0 <= min_size <= max_size or max_size < 1:
            raise InvalidArgumentError(
                f"need 0 <= min_size <= max_size and max_size >= 1, got min_size={min_size}, "
                f"max_size={max_size}"
            )
        if max_streams_per_channel < 1:
            raise InvalidArgumentError(
                f"max_streams_per_channel must be >= 1, got {max_streams_per_channel}"
            )
        for label, value in (
            ("idle_timeout_s", idle_timeout_s),
            ("max_age_s", max_age_s),
            ("health_check_interval_s", health_check_interval_s),
            ("health_check_timeout_s", health_check_timeout_s),
            ("close_grace_s", close_grace_s),
        ):
            if value < 0:
                raise InvalidArgumentError(f"{label} must be >= 0, got {value}")
        self.target = target
        self.name = name or target
        self._dns = target.strip().startswith("dns:")
        # Static targets are parsed now, so a bad one fails at construction.
        self._addresses: list[str] | None = None if self._dns else resolve_targets(target)
        self._min_size = min_size
        self._max_size = max_size
        self._max_streams = max_streams_per_channel
        self._grow_at = max(1, max_streams_per_channel - max(1, max_streams_per_channel // 10))
        self._idle_timeout_s = idle_timeout_s
        self._max_age_s = max_age_s
        self._health_interval_s = health_check_interval_s
        self._health_timeout_s = health_check_timeout_s
        self._health_service = health_service
        self._close_grace_s = close_grace_s
        self._options = tuple(options)
        if credentials is None and security is not None:
            credentials = security.channel_credentials()
        self._credentials = credentials
        self._interceptors = security.interceptors() if security is not None else ()
        self._tls_name = _dns_name(target) if self._dns else ""
        self._clock = clock
        self._connect = connect or grpc_connect

        self._channels: list[PooledChannel] = []
        self._address_failures: dict[str, int] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._maintainer: Periodic | None = None
        self._resolve_lock: asyncio.Lock | None = None
        self._closed = False
        self._last_health_at: float | None = None

        self._created = self._acquisitions = self._reused = self._failed = 0
        self._health_pass = self._health_fail = self._saturated = 0
        self._retired = self._closed_idle = 0

    # ---------------------------------------------------------------- public API

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[grpc.aio.Channel]:
        """Hold the least busy channel for one call or one long-lived stream."""
        if self._closed:
            raise UnavailableError(f"channel pool for {self.target!r} is closed")
        if self._addresses is None:
            await self._resolve()
        self._ensure_maintainer()
        # The floor (one channel per address) from the first call on, not from the
        # first maintenance pass: otherwise every replica but one idles until then.
        self._top_up()
        pooled, created = self._assign()
        self._acquisitions += 1
        if not created:
            self._reused += 1
        _ACQUIRED.labels(self.name, "true" if not created else "false").inc()
        _IN_USE.labels(self.name).inc()
        try:
            yield pooled.channel
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._failed += 1
                _FAILED.labels(self.name).inc()
            raise
        finally:
            _IN_USE.labels(self.name).dec()
            self._schedule_close(self._release(pooled))

    async def maintain(self) -> None:
        """One maintenance pass: close idle, retire aged, re-resolve DNS, health-check
        when due, and top up to ``min_size``. The pool's own task calls it
        periodically; tests call it after moving the clock."""
        if self._closed:
            return
        now = self._clock()
        due = self._health_interval_s > 0 and (
            self._last_health_at is None or now - self._last_health_at >= self._health_interval_s
        )
        if self._dns and (due or self._addresses is None):
            await self._resolve()
        self._schedule_close(self._sweep(now))
        self._top_up()
        if due:
            await self.check_health()

    async def check_health(self) -> tuple[int, int]:
        """Health-check every open channel now; retire and replace the failing ones.
        Returns (passed, failed)."""
        self._last_health_at = self._clock()
        targets = [c for c in self._channels if c.state is ChannelState.OPEN]
        results = await asyncio.gather(*(self._check_one(c) for c in targets))
        passed = sum(results)
        failed = len(results) - passed
        to_close: list[PooledChannel] = []
        for pooled, ok in zip(targets, results):
            if ok:
                self._address_failures[pooled.address] = 0
                continue
            self._address_failures[pooled.address] = self._address_failures.get(pooled.address, 0) + 1
            to_close += self._retire(pooled, "unhealthy")
        self._top_up()
        self._schedule_close(to_close)
        return passed, failed

    @property
    def metrics(self) -> PoolMetrics:
        return PoolMetrics(
            created=self._created,
            reused=self._reused,
            failed=self._failed,
            size=self.size,
            in_use=sum(c.active for c in self._channels),
            health_pass=self._health_pass,
            health_fail=self._health_fail,
            saturated=self._saturated,
            retired=self._retired,
            closed_idle=self._closed_idle,
            acquisitions=self._acquisitions,
        )

    @property
    def size(self) -> int:
        """Open channels (draining ones not counted)."""
        return sum(1 for c in self._channels if c.state is ChannelState.OPEN)

    @property
    def channels(self) -> tuple[PooledChannel, ...]:
        """Every channel not yet closed (open and draining), oldest first."""
        return tuple(self._channels)

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(self._addresses or ())

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Close every channel (in-flight calls get ``close_grace_s``) and stop maintenance."""
        if self._closed:
            return
        self._closed = True
        if self._maintainer is not None:
            await self._maintainer.aclose()
            self._maintainer = None
        doomed = list(self._channels)
        for pooled in doomed:
            pooled.state, pooled.reason = ChannelState.CLOSED, "pool_closed"
        self._channels.clear()
        _SIZE.labels(self.name).set(0)
        await asyncio.gather(
            *(self._close_channel(c, self._close_grace_s) for c in doomed), *list(self._closing)
        )

    async def __aenter__(self) -> ChannelPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        draining = sum(1 for c in self._channels if c.state is ChannelState.DRAINING)
        in_use = sum(c.active for c in self._channels)
        busy = sum(1 for c in self._channels if c.active and c.state is ChannelState.OPEN)
        m = self.metrics
        return (
            f"<ChannelPool {self.name!r} [{state}] "
            f"Channels: {self.size} open ({busy} busy, {self.size - busy} idle), {draining} draining | "
            f"Calls: {in_use} in flight | created {m.created}, reused {m.reused}, "
            f"reuse {m.reuse_rate:.1%}, failed {m.failed}, "
            f"health {m.health_pass} pass / {m.health_fail} fail>"
        )

    # ------------------------------------------------- state machine (synchronous)

    def _assign(self) -> tuple[PooledChannel, bool]:
        """Pick the channel for one acquisition; opens one when needed. No awaits."""
        now = self._clock()
        to_close = self._sweep(now)
        open_channels = [c for c in self._channels if c.state is ChannelState.OPEN]
        best = min(open_channels, key=lambda c: (c.active, c.id), default=None)
        if best is None or (best.active >= self._grow_at and len(open_channels) < self._max_size):
            best = self._open(now)
        elif best.active >= self._grow_at:
            self._saturated += 1
        created = best.uses == 0  # a connection's first call is not a reuse
        best.active += 1
        best.uses += 1
        best.last_used_at = now
        self._schedule_close(to_close)
        return best, created

    def _release(self, pooled: PooledChannel) -> list[PooledChannel]:
        pooled.active -= 1
        pooled.last_used_at = self._clock()
        if pooled.state is ChannelState.DRAINING and pooled.active == 0:
            return self._drop(pooled)
        return []

    def _sweep(self, now: float) -> list[PooledChannel]:
        """Retire aged channels, close idle ones; returns the channels to close now."""
        to_close: list[PooledChannel] = []
        for pooled in list(self._channels):
            if pooled.state is not ChannelState.OPEN:
                continue
            if self._max_age_s and now - pooled.created_at >= self._max_age_s:
                to_close += self._retire(pooled, "max_age")
        floor = self._floor()
        idle = sorted(
            (
                c
                for c in self._channels
                if c.state is ChannelState.OPEN
                and c.active == 0
                and self._idle_timeout_s
                and now - c.last_used_at >= self._idle_timeout_s
            ),
            key=lambda c: c.last_used_at,
        )
        for pooled in idle:
            if self.size <= floor:
                break
            pooled.state, pooled.reason = ChannelState.DRAINING, "idle"
            self._closed_idle += 1
            to_close += self._drop(pooled)
        return to_close

    def _retire(self, pooled: PooledChannel, reason: str) -> list[PooledChannel]:
        pooled.state, pooled.reason = ChannelState.DRAINING, reason
        if reason in ("max_age", "unhealthy"):
            self._retired += 1
        log.info("channel pool %s: retiring %r (%s)", self.name, pooled, reason)
        return self._drop(pooled) if pooled.active == 0 else []

    def _drop(self, pooled: PooledChannel) -> list[PooledChannel]:
        """Remove a channel from the pool; returns it for closing."""
        self._channels.remove(pooled)
        _CLOSED.labels(self.name, pooled.reason or "unknown").inc()
        pooled.state = ChannelState.CLOSED
        _SIZE.labels(self.name).set(self.size)
        return [pooled]

    def _floor(self) -> int:
        return min(self._max_size, max(self._min_size, len(self._addresses or ())))

    def _top_up(self) -> None:
        """Open channels up to the floor (``min_size``, one per address)."""
        if self._closed or self._addresses is None:
            return
        now = self._clock()
        while self.size < self._floor():
            self._open(now)

    def _pick_address(self) -> str:
        assert self._addresses
        counts = {a: 0 for a in self._addresses}
        for c in self._channels:
            if c.state is ChannelState.OPEN and c.address in counts:
                counts[c.address] += 1
        # Fewest recent health failures first, then fewest channels, then list order.
        order = {a: i for i, a in enumerate(self._addresses)}
        return min(
            self._addresses,
            key=lambda a: (self._address_failures.get(a, 0), counts[a], order[a]),
        )

    def _open(self, now: float) -> PooledChannel:
        address = self._pick_address()
        channel_id = next(_id_counter)
        options = (*self._options, (CHANNEL_ID_ARG, channel_id))
        interceptors = self._interceptors or None
        if self._credentials is not None and self._tls_name:
            # A pod dialled by IP is shown a certificate for its Service's name.
            options = (*options, ("grpc.ssl_target_name_override", self._tls_name))
        channel = self._connect(address, options, self._credentials, interceptors)
        pooled = PooledChannel(channel_id, address, channel, created_at=now, last_used_at=now)
        self._channels.append(pooled)
        self._created += 1
        _CREATED.labels(self.name).inc()
        _SIZE.labels(self.name).set(self.size)
        return pooled

    # ------------------------------------------------------------------- I/O side

    async def _resolve(self) -> None:
        if self._resolve_lock is None:
            self._resolve_lock = asyncio.Lock()
        async with self._resolve_lock:
            try:
                addresses = await asyncio.to_thread(resolve_targets, self.target)
            except UnavailableError:
                if self._addresses is None:
                    raise
                log.warning("channel pool %s: re-resolving failed; keeping %s", self.name, self._addresses)
                return
            self._addresses = addresses
            gone = [
                c for c in self._channels if c.state is ChannelState.OPEN and c.address not in addresses
            ]
            to_close: list[PooledChannel] = []
            for pooled in gone:
                to_close += self._retire(pooled, "gone")
            self._schedule_close(to_close)

    async def _check_one(self, pooled: PooledChannel) -> bool:
        stub = health_pb2_grpc.HealthStub(pooled.channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=self._health_service),
                timeout=self._health_timeout_s,
            )
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as exc:
            ok = False
            log.info("channel pool %s: health check of %r failed: %s", self.name, pooled, exc.code().name)
        except asyncio.CancelledError:
            raise
        except Exception:  # a channel closed under us, etc.
            ok = False
        if ok:
            self._health_pass += 1
        else:
            self._health_fail += 1
        _HEALTH.labels(self.name, "pass" if ok else "fail").inc()
        return ok

    def _ensure_maintainer(self) -> None:
        if self._maintainer is not None or self._closed:
            return
        periods = [p for p in (self._health_interval_s, self._idle_timeout_s / 2, self._max_age_s / 4) if p > 0]
        if not periods:
            return
        self._maintainer = Periodic(self.maintain, max(0.05, min(periods)),
                                    name=f"channel-pool {self.name} maintenance").start()

    def _schedule_close(self, doomed: list[PooledChannel]) -> None:
        for pooled in doomed:
            task = asyncio.get_running_loop().create_task(self._close_channel(pooled, None))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close_channel(self, pooled: PooledChannel, grace_s: float | None) -> None:
        try:
            await pooled.channel.close(grace_s)
        except Exception:  # closing must never fail the caller
            log.exception("channel pool %s: closing %r failed", self.name, pooled)
