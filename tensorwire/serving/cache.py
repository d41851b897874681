"""A response cache for inference: the answers of identical requests, kept locally or in Redis.

Triton's response cache, in its conventions:

- the server is told which cache with ``--cache-config <cache>,<key>=<value>``,
  repeated (``local,size=<bytes>``; ``redis,host=<h>``, ``redis,port=<p>``, ...):
  :func:`parse_cache_config` turns those strings into one typed config;
- a model opts in (``response_cache { enable: true }`` in config.pbtxt,
  ``"response_cache": {"enable": true}`` in config.json);
- the key is the model's name, the **resolved** version and everything in the
  request that shapes its answer (:class:`RequestKeys`), so a new version never
  serves an old version's answers and an A/B split caches per version used.

Two backends behind one interface (:class:`ResponseCache`): ``await get(key)`` and
``put(key, value)`` on the event loop, ``lookup_from_thread(keys, loop)`` and
``put_many_from_thread(items, loop)`` for the native frontend's batch threads:

- :class:`LocalCache`: a byte-bounded LRU in the process (each ``--workers``
  process has its own), its entries in a :class:`DictStore` or, with the native
  frontend, in the frontend's own store, whose gRPC threads answer hits directly;
- :class:`RedisCache`: shared by every replica, keys with a TTL. Redis being
  down never fails a request: a failed command counts an error and reads as a
  miss, then the cache is bypassed for a backoff period (50 ms doubling to 2 s)
  after which one request probes it again, on a new connection.

Values are the answer's tensors in a small binary form (:func:`encode_tensors`),
so both backends hold bytes and the local cache's bound is exact. Writes never
make the caller wait: the local cache inserts at once, Redis writes in the
background (a bounded number at a time; beyond it writes are dropped and
counted).
"""

from __future__ import annotations

import abc
import asyncio
import binascii
import collections
import concurrent.futures
import functools
import hashlib
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from tensorwire.data.tensors import NUMPY_DTYPES

log = logging.getLogger(__name__)

# -- configuration: Triton's --cache-config ---------------------------------------------


@dataclass(frozen=True)
class LocalCacheConfig:
    """``--cache-config local,size=<bytes>``."""

    size_bytes: int
    """Bytes the entries may take (keys, values and a fixed overhead each); the least
    recently used entries are evicted to make room."""
    max_entry_bytes: int
    """An answer larger than this is served and not cached (``max_entry_size``;
    default: ``size``)."""


@dataclass(frozen=True)
class RedisCacheConfig:
    """``--cache-config redis,<key>=<value>``, one flag per key (Triton's key names)."""

    host: str
    port: int = 6379
    user: str = ""
    password: str = field(default="", repr=False)
    db: int = 0
    ttl_s: int = 600
    """Seconds an entry lives (``ttl``); 0 = until Redis evicts it."""
    max_entry_bytes: int = 1 << 20
    """An answer larger than this is served and not cached (``max_entry_size``)."""
    tls_enabled: bool = False
    cert: str = ""
    """Client certificate (PEM) for mutual TLS."""
    key: str = ""
    """Its private key (PEM)."""
    cacert: str = ""
    """CA bundle that signed the server's certificate ('' = the system's)."""
    connect_timeout_s: float = 0.5
    """``connect_timeout`` in milliseconds, as Triton."""
    socket_timeout_s: float = 0.25
    """``socket_timeout`` in milliseconds: a command slower than this counts as an error
    (and the request runs on the model)."""


CacheConfig = LocalCacheConfig | RedisCacheConfig


def _positive_int(key: str, value: str, entry: str, *, zero_ok: bool = False) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{key} must be a whole number, got {value!r} (in {entry!r})") from None
    if number < 0 or (number == 0 and not zero_ok):
        raise ValueError(f"{key} must be {'>= 0' if zero_ok else '> 0'}, got {number} (in {entry!r})")
    return number


def _bool(key: str, value: str, entry: str) -> bool:
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{key} must be true or false, got {value!r} (in {entry!r})")


_LOCAL_KEYS = ("size", "max_entry_size")
_REDIS_KEYS = ("host", "port", "user", "password", "db", "ttl", "max_entry_size", "tls_enabled",
               "cert", "key", "cacert", "connect_timeout", "socket_timeout")


def parse_cache_config(entries: Iterable[str]) -> CacheConfig | None:
    """The cache ``--cache-config`` entries describe; None when there are none.

    Each entry is ``<cache>,<key>=<value>`` (the value may hold ',' and '=', e.g. a
    password); one cache per server. Raises ValueError naming the bad entry.
    """
    cache_name = ""
    values: dict[str, tuple[str, str]] = {}
    for entry in entries:
        name, sep, pair = entry.partition(",")
        key, eq, value = pair.partition("=")
        name, key = name.strip(), key.strip()
        if not sep or not eq or not name or not key:
            raise ValueError(f"{entry!r} is not <cache>,<key>=<value> (e.g. local,size=1048576)")
        if name not in ("local", "redis"):
            raise ValueError(f"unknown cache {name!r} in {entry!r}; use local or redis")
        if cache_name and name != cache_name:
            raise ValueError(f"both {cache_name} and {name} are configured; a server has one cache")
        cache_name = name
        known = _LOCAL_KEYS if name == "local" else _REDIS_KEYS
        if key not in known:
            raise ValueError(f"unknown key {key!r} for the {name} cache in {entry!r}; known: {', '.join(known)}")
        if key in values:
            raise ValueError(f"key {key!r} of the {name} cache is given twice")
        values[key] = (value.strip(), entry)
    if not cache_name:
        return None

    def number(key: str, *, zero_ok: bool = False) -> int | None:
        if key not in values:
            return None
        value, entry = values[key]
        return _positive_int(key, value, entry, zero_ok=zero_ok)

    if cache_name == "local":
        size = number("size")
        if size is None:
            raise ValueError("the local cache needs its size: local,size=<bytes>")
        max_entry = number("max_entry_size") or size
        return LocalCacheConfig(size_bytes=size, max_entry_bytes=min(max_entry, size))
    if "host" not in values or not values["host"][0]:
        raise ValueError("the redis cache needs its host: redis,host=<name> (and redis,port=<port>)")
    port = number("port")
    if port is not None and port > 65535:
        raise ValueError(f"port must be <= 65535, got {port} (in {values['port'][1]!r})")
    defaults = RedisCacheConfig(host="")
    connect_ms, socket_ms = number("connect_timeout"), number("socket_timeout")
    return RedisCacheConfig(
        host=values["host"][0],
        port=port if port is not None else defaults.port,
        user=values.get("user", ("", ""))[0],
        password=values.get("password", ("", ""))[0],
        db=_or(number("db", zero_ok=True), defaults.db),
        ttl_s=_or(number("ttl", zero_ok=True), defaults.ttl_s),
        max_entry_bytes=_or(number("max_entry_size"), defaults.max_entry_bytes),
        tls_enabled=_bool("tls_enabled", *values["tls_enabled"]) if "tls_enabled" in values else False,
        cert=values.get("cert", ("", ""))[0],
        key=values.get("key", ("", ""))[0],
        cacert=values.get("cacert", ("", ""))[0],
        connect_timeout_s=connect_ms / 1000 if connect_ms else defaults.connect_timeout_s,
        socket_timeout_s=socket_ms / 1000 if socket_ms else defaults.socket_timeout_s,
    )


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


# -- keys --------------------------------------------------------------------------------


class NamedArray(Protocol):
    """A request's or answer's tensor (``tensorwire.data.tensors.Tensor`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def datatype(self) -> str: ...

    @property
    def array(self) -> np.ndarray: ...


_LEN = struct.Struct("<I")


def _text(h: Any, text: str) -> None:
    data = text.encode()
    h.update(_LEN.pack(len(data)))
    h.update(data)


def _prefixed(text: str) -> bytes:
    data = text.encode()
    return _LEN.pack(len(data)) + data


_SHAPES = tuple(struct.Struct(f"<{n}q") for n in range(256))
"""Packers of a shape with 0..255 dims (a value stores ndim in one byte; the codec caps it at 16)."""


def _tensor_head(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    """What a key hashes before a tensor's data: its name, datatype and shape,
    length-prefixed. The same few repeat: remembered, unless the client sent long
    names (keys are computed before validation: they must not fill memory)."""
    if len(name) + len(datatype) <= 256:
        return _known_tensor_head(name, datatype, shape)
    return _prefixed(name) + _prefixed(datatype) + _LEN.pack(len(shape)) + _SHAPES[len(shape)].pack(*shape)


@functools.lru_cache(maxsize=4096)
def _known_tensor_head(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    return _prefixed(name) + _prefixed(datatype) + _LEN.pack(len(shape)) + _SHAPES[len(shape)].pack(*shape)


@functools.lru_cache(maxsize=4096)
def _value_head(name: str, datatype: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    """What :func:`encode_tensors` writes before a tensor's data."""
    name_b, datatype_b = name.encode(), datatype.encode()
    return (_TENSOR.pack(len(name_b), len(datatype_b), len(shape), nbytes) + name_b + datatype_b
            + _SHAPES[len(shape)].pack(*shape))


class RequestKeys:
    """Cache keys of one model version's requests.

    The key is a BLAKE2b-128 digest of the model's name, its resolved version, a
    fingerprint of what the version is (the repository's config fingerprint) and
    the request: each input's name, datatype, shape and bytes (inputs in name
    order, so the order a client lists them in does not matter: the Python and
    the native frontend compute the same key), and the requested output names,
    every part length-prefixed so two different requests cannot feed the hash the
    same bytes.

    Why BLAKE2b: the cache is shared by every client (and, with Redis, every
    replica), so a key collision would hand one client another client's answer;
    the hash must resist collisions someone *crafts*, which rules out xxHash/CityHash
    (fast but not collision-resistant). BLAKE2b is a cryptographic hash in Python's
    standard library (no new dependency), faster than SHA-256 on 64-bit CPUs
    without SHA extensions (~1 GB/s on one core), and its 128-bit digest keeps the
    chance of an accidental collision negligible (2^-64 after 2^32 entries). The
    model's part is hashed once; each request copies that state and adds its own
    bytes, so a small request costs about a microsecond.
    """

    __slots__ = ("_base", "parts")

    def __init__(self, model: str, version: int | str, fingerprint: str = "") -> None:
        self.parts = (model, str(version), fingerprint)
        """What the keys start from (the native frontend builds the same base from them)."""
        base = hashlib.blake2b(digest_size=16, person=b"tw-response-v1")
        for part in self.parts:
            _text(base, part)
        self._base = base

    def key(self, inputs: Sequence[NamedArray], outputs: Sequence[str] = ()) -> bytes:
        """The key of a request with these inputs and requested outputs (empty = all)."""
        h = self._base.copy()
        head = _LEN.pack(len(inputs))
        if len(inputs) > 1:
            inputs = sorted(inputs, key=_name)
        for tensor in inputs:
            array = tensor.array
            head += _tensor_head(tensor.name, tensor.datatype, array.shape)
            if array.dtype == object:
                h.update(head)
                head = b""
                for element in array.reshape(-1):
                    data = element if isinstance(element, bytes) else str(element).encode()
                    h.update(_LEN.pack(len(data)))
                    h.update(data)
            else:
                contiguous = array if array.flags.c_contiguous else np.ascontiguousarray(array)
                h.update(head + _LEN.pack(contiguous.nbytes))
                h.update(contiguous.data)
                head = b""
        head += _LEN.pack(len(outputs))
        for name in outputs:
            head += _prefixed(name)
        h.update(head)
        return h.digest()


    def batch_keys(self, inputs: Sequence[tuple[str, str]], columns: Sequence[np.ndarray],
                   bounds: Sequence[int], outputs: Sequence[Sequence[str]]) -> list[bytes]:
        """The key of each request of a batch, the same as :meth:`key` gives: request
        ``i`` is rows ``bounds[i]:bounds[i + 1]`` of every column (``inputs``: each
        column's name and datatype; fixed-size datatypes) and asked for ``outputs[i]``.
        What repeats between the requests (heads, shapes, output names) is packed once."""
        order = sorted(range(len(inputs)), key=lambda j: inputs[j][0])
        data = []
        for j in order:
            column = np.ascontiguousarray(columns[j])
            row_bytes = column.nbytes // column.shape[0] if column.shape[0] else 0
            data.append((inputs[j][0], inputs[j][1], column.shape[1:], row_bytes,
                         column.reshape(-1).view(np.uint8).data))
        heads: dict[int, list[bytes]] = {}
        tails: dict[tuple[str, ...], bytes] = {}
        keys = []
        for i, wanted in enumerate(outputs):
            start, stop = bounds[i], bounds[i + 1]
            rows = stop - start
            head = heads.get(rows)
            if head is None:
                head = heads[rows] = [_tensor_head(name, datatype, (rows, *inner)) + _LEN.pack(rows * row_bytes)
                                      for name, datatype, inner, row_bytes, _ in data]
                head[0] = _LEN.pack(len(inputs)) + head[0]
            tail = tails.get(tuple(wanted))
            if tail is None:
                tail = tails[tuple(wanted)] = _LEN.pack(len(wanted)) + b"".join(_prefixed(n) for n in wanted)
            h = self._base.copy()
            for part, (_, _, _, row_bytes, raw) in zip(head, data):
                h.update(part)
                h.update(raw[start * row_bytes : stop * row_bytes])
            h.update(tail)
            keys.append(h.digest())
        return keys


def _name(tensor: NamedArray) -> str:
    return tensor.name


# -- values: an answer's tensors as bytes --------------------------------------------------

_FORMAT = 1
_HEAD = struct.Struct("<BH")  # format, tensor count
_TENSOR = struct.Struct("<HBBQ")  # name length, datatype length, ndim, data bytes


def encode_tensors(tensors: Sequence[NamedArray]) -> bytes:
    """An answer's tensors as one bytes value (names, datatypes, shapes, data)."""
    parts = [_HEAD.pack(_FORMAT, len(tensors))]
    for tensor in tensors:
        array = tensor.array
        if array.dtype == object:
            chunks = []
            for element in array.reshape(-1):
                data = element if isinstance(element, bytes) else str(element).encode()
                chunks += [_LEN.pack(len(data)), data]
            payload = b"".join(chunks)
        else:
            dtype = NUMPY_DTYPES[tensor.datatype]
            payload = (array if array.dtype == dtype else array.astype(dtype)).tobytes()  # C order
        parts += [_value_head(tensor.name, tensor.datatype, array.shape, len(payload)), payload]
    return b"".join(parts)


def encode_requests(columns: Sequence[tuple[str, str, np.ndarray]], bounds: Sequence[int],
                    requests: Iterable[int]) -> list[bytes]:
    """:func:`encode_tensors` of rows ``bounds[i]:bounds[i + 1]`` of each (name,
    datatype, column) for each request ``i`` of ``requests``: a native batch's
    answers, the columns C-contiguous in their datatype's dtype and fixed-size. Each
    column's bytes are taken once, the heads of requests with as many rows packed once."""
    prefix = _HEAD.pack(_FORMAT, len(columns))
    data = [(name, datatype, column.shape[1:], column.nbytes // column.shape[0] if column.shape[0] else 0,
             column.tobytes()) for name, datatype, column in columns]
    heads: dict[int, list[bytes]] = {}
    out = []
    for i in requests:
        start, stop = bounds[i], bounds[i + 1]
        head = heads.get(stop - start)
        if head is None:
            n = stop - start
            head = heads[n] = [_value_head(name, datatype, (n, *inner), n * row_bytes)
                               for name, datatype, inner, row_bytes, _ in data]
        parts = [prefix]
        for part, (_, _, _, row_bytes, raw) in zip(head, data):
            parts += (part, raw[start * row_bytes : stop * row_bytes])
        out.append(b"".join(parts))
    return out


class DecodedGroup(NamedTuple):
    """Values laid out alike (the same names, datatypes and shapes, in order): which of
    the values, and each tensor's arrays of all of them, one after the other along the
    first axis."""

    members: list[int]
    tensors: list[tuple[str, str, np.ndarray]]


def decode_values(values: Sequence[bytes]) -> tuple[list[DecodedGroup], list[tuple[int, Exception]]]:
    """:func:`decode_tensors` of many values at once (a native batch's hits): a value
    laid out like an earlier one (the same length and the same bytes outside its
    tensors' data: names, datatypes, shapes) joins that one's group, so a group costs
    one array per tensor, not one per value. Returns the groups and the values that
    could not be read (index, error)."""
    # per group: the first value, its non-data byte ranges, its data ranges, the layout
    templates: list[tuple[bytes, list[tuple[int, int]], list[tuple[int, int]], list[tuple[str, str, tuple[int, ...]]]]]
    templates = []
    members: list[list[int]] = []
    alone: list[DecodedGroup] = []  # values with BYTES tensors: decoded one by one
    failed: list[tuple[int, Exception]] = []
    for index, value in enumerate(values):
        for (template, heads, _, _), group in zip(templates, members):
            if len(value) == len(template) and all(value[a:b] == template[a:b] for a, b in heads):
                group.append(index)
                break
        else:
            try:
                tensors = decode_tensors(value)
            except (ValueError, KeyError, struct.error, UnicodeDecodeError) as exc:
                failed.append((index, exc))
                continue
            if any(datatype == "BYTES" or array.ndim == 0 for _, datatype, array in tensors):
                alone.append(DecodedGroup([index], tensors))
                continue
            data, end = [], len(value)
            for name, datatype, array in reversed(tensors):  # each tensor: its head, then its data
                data.append((end - array.nbytes, end))
                end -= array.nbytes + len(_value_head(name, datatype, array.shape, array.nbytes))
            data.reverse()
            heads, at = [], 0
            for start, stop in data:
                heads.append((at, start))
                at = stop
            templates.append((value, heads, data, [(name, datatype, array.shape) for name, datatype, array in tensors]))
            members.append([index])
    groups = alone
    for (_, _, data, layout), group in zip(templates, members):
        tensors_out = []
        for (start, stop), (name, datatype, shape) in zip(data, layout):
            joined = b"".join(values[i][start:stop] for i in group)
            array = np.frombuffer(joined, dtype=NUMPY_DTYPES[datatype]).reshape(len(group) * shape[0], *shape[1:])
            tensors_out.append((name, datatype, array))
        groups.append(DecodedGroup(group, tensors_out))
    return groups, failed


def decode_tensors(value: bytes) -> list[tuple[str, str, np.ndarray]]:
    """(name, datatype, array) of each tensor of an :func:`encode_tensors` value; the
    arrays are read-only views of ``value``. Raises ValueError on a foreign value."""
    view = memoryview(value)
    fmt, count = _HEAD.unpack_from(view, 0)
    if fmt != _FORMAT:
        raise ValueError(f"cached value has format {fmt}, this server reads {_FORMAT}")
    offset = _HEAD.size
    out = []
    for _ in range(count):
        name_len, dt_len, ndim, nbytes = _TENSOR.unpack_from(value, offset)
        offset += _TENSOR.size
        name = value[offset : offset + name_len].decode()
        offset += name_len
        datatype = value[offset : offset + dt_len].decode()
        offset += dt_len
        shape = _SHAPES[ndim].unpack_from(value, offset)
        offset += 8 * ndim
        if datatype == "BYTES":
            elements, end, at = [], offset + nbytes, offset
            while at < end:
                (length,) = _LEN.unpack_from(view, at)
                elements.append(bytes(view[at + 4 : at + 4 + length]))
                at += 4 + length
            array = np.empty(len(elements), dtype=object)
            array[:] = elements
            array = array.reshape(shape)
        else:
            dtype = NUMPY_DTYPES[datatype]
            array = np.frombuffer(value, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
            array = array.reshape(shape)
        offset += nbytes
        out.append((name, datatype, array))
    if offset != len(value):
        raise ValueError(f"cached value has {len(value) - offset} bytes after its tensors")
    return out


# -- the caches ----------------------------------------------------------------------------


@dataclass
class CacheStats:
    """Counters of one cache (Prometheus reads them at scrape time)."""

    hits: int = 0
    misses: int = 0
    """Lookups that found nothing (including those bypassed or failed)."""
    inserts: int = 0
    inserted_bytes: int = 0
    evictions: int = 0
    """Entries dropped to make room (local)."""
    too_large: int = 0
    """Answers not cached because they exceed the entry limit."""
    errors: int = 0
    """Failed backend commands (Redis: connection, timeout, refused command)."""
    bypassed: int = 0
    """Lookups and writes skipped while the backend is down (backoff)."""
    dropped_writes: int = 0
    """Writes dropped because too many were already in flight."""
    commands: int = 0
    """Round trips to the backend (Redis: one MGET serves several lookups, one script
    call several writes)."""


class ResponseCache(abc.ABC):
    """The one interface inference uses: ``await get(key)``, ``put(key, value)``."""

    kind: str = ""
    """"local" or "redis": the ``cache`` label of its metrics."""
    thread_timeout_s: float = 5.0
    """How long :meth:`lookup_from_thread` waits for the event loop before it reads misses."""
    remote: bool = False
    """Whether a lookup waits on the network (Redis): the native frontend then lets one
    more batch of a model run while another waits for its lookups."""

    def __init__(self, max_entry_bytes: int) -> None:
        self.max_entry_bytes = max_entry_bytes
        self.stats = CacheStats()
        self._count_lock = threading.Lock()

    def count(self, **deltas: int) -> None:
        """Add to ``stats`` (``hits=2, misses=1``...) from any thread: the event loop and
        the native frontend's threads count at once (a bare ``+=`` can lose updates)."""
        stats = self.stats
        with self._count_lock:
            for name, delta in deltas.items():
                setattr(stats, name, getattr(stats, name) + delta)

    def count_lookups(self, found: int, looked_up: int) -> None:
        """``count(hits=found, misses=looked_up - found)`` without its generality (every
        lookup of the local cache, every native batch's misses)."""
        stats = self.stats
        with self._count_lock:
            stats.hits += found
            stats.misses += looked_up - found

    def unreadable(self, count: int = 1) -> None:
        """``count`` entries were found but could not be read: each counts as an error
        and as a miss (the model answers), not as a hit."""
        self.count(hits=-count, misses=count, errors=count)

    @abc.abstractmethod
    async def get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None (missing, or the backend failed)."""

    @abc.abstractmethod
    def put(self, key: bytes, value: bytes) -> None:
        """Store ``value`` without making the caller wait; an entry over
        ``max_entry_bytes`` is not stored (``stats.too_large``)."""

    def lookup_from_thread(self, keys: Sequence[bytes], loop: asyncio.AbstractEventLoop) -> list[bytes | None]:
        """``get`` of each key, from a thread that is not ``loop``'s (the native
        frontend's batch threads): blocks until answered. This default runs the
        lookups on ``loop`` (one hop for all of them)."""
        future = asyncio.run_coroutine_threadsafe(self._get_many(keys), loop)
        try:
            return future.result(timeout=self.thread_timeout_s)
        except concurrent.futures.TimeoutError:  # the loop is stuck: misses, not a stuck batch
            future.cancel()
            self.stats.errors += 1
            return [None] * len(keys)

    async def _get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return list(await asyncio.gather(*(self.get(key) for key in keys)))

    def lookup_aside(self, keys: Sequence[bytes], done: Callable[[list[bytes | None]], None]) -> None:
        """Look ``keys`` up without anyone waiting (on the loop): ``done(values)`` runs
        on the loop once answered (None: missing or failed). Counted as lookups. For
        the misses that do not wait for the cache (:class:`HitRate`)."""
        asyncio.get_running_loop().create_task(self._get_many(keys)).add_done_callback(
            lambda task: done(task.result() if not task.cancelled() and task.exception() is None
                              else [None] * len(keys)))

    def lookup_aside_from_thread(self, keys: Sequence[bytes], done: Callable[[list[bytes | None]], None],
                                 loop: asyncio.AbstractEventLoop) -> None:
        """:meth:`lookup_aside` from a thread that is not ``loop``'s (``done`` runs on
        ``loop``); this default hops to the loop at once."""
        loop.call_soon_threadsafe(self.lookup_aside, keys, done)

    def put_many_from_thread(self, items: Sequence[tuple[bytes, bytes]], loop: asyncio.AbstractEventLoop) -> None:
        """``put`` of each (key, value) from a thread that is not ``loop``'s, in one hop
        (one wake-up of the loop for a whole batch); does not wait."""
        if items:
            loop.call_soon_threadsafe(self._put_many, items)

    def _put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        for key, value in items:
            self.put(key, value)

    async def flush(self) -> None:  # noqa: B027 - a backend without buffered writes keeps it
        """Wait until every write made so far has reached the backend."""

    async def aclose(self) -> None:  # noqa: B027 - a backend with nothing to release keeps it
        """Release the backend (pending writes are awaited)."""

    @property
    def held_bytes(self) -> int | None:
        """Bytes held (the local cache's own count; None when the backend keeps it)."""
        return None

    @property
    def entries(self) -> int | None:
        return None

    @property
    def up(self) -> bool:
        """False while the backend is considered down (Redis, during backoff)."""
        return True

    def _fits(self, value: bytes) -> bool:
        if len(value) > self.max_entry_bytes:
            self.stats.too_large += 1
            return False
        return True


ENTRY_OVERHEAD_BYTES = 160
"""What the local cache counts per entry beyond its key and value bytes, estimated for
CPython 3.11: two bytes objects' headers (33 bytes each), the dict's entry and index
(~32) and the ordered dict's link node (~56), rounded up."""


class EntryStore(Protocol):
    """Where a :class:`LocalCache` keeps its entries: a byte-bounded LRU, each entry
    costing its key's and value's bytes plus ``ENTRY_OVERHEAD_BYTES``. Thread-safe.
    :class:`DictStore` here, or the native frontend's (``_native.LruStore``, whose
    batch threads then answer hits without Python)."""

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Each key's value (None: absent); the found ones become the most recent."""
        ...

    def put_many(self, items: Sequence[tuple[bytes, bytes]], max_entry_bytes: int) -> tuple[int, int, int, int]:
        """Store each (key, value), evicting the least recently used to make room; a
        value over ``max_entry_bytes``, or that cannot fit at all, is not stored.
        Returns (inserted, inserted value bytes, evicted, too large)."""
        ...

    @property
    def held_bytes(self) -> int: ...

    @property
    def entries(self) -> int: ...


class DictStore:
    """:class:`EntryStore` in Python: an ordered dict behind a lock that is only ever
    held for dict operations (uncontended, ~0.1 us)."""

    def __init__(self, size_bytes: int, overhead: int = ENTRY_OVERHEAD_BYTES) -> None:
        self.size_bytes = size_bytes
        self._overhead = overhead
        self._entries: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def _cost(self, key: bytes, value: bytes) -> int:
        return len(key) + len(value) + self._overhead

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._lock:
            entries = self._entries
            values = [entries.get(key) for key in keys]
            for key, value in zip(keys, values):
                if value is not None:
                    entries.move_to_end(key)
        return values

    def put_many(self, items: Sequence[tuple[bytes, bytes]], max_entry_bytes: int) -> tuple[int, int, int, int]:
        inserted = inserted_bytes = evicted = too_large = 0
        with self._lock:
            entries = self._entries
            for key, value in items:
                cost = self._cost(key, value)
                if len(value) > max_entry_bytes or cost > self.size_bytes:
                    too_large += 1
                    continue
                old = entries.pop(key, None)
                if old is not None:
                    self._bytes -= self._cost(key, old)
                while self._bytes + cost > self.size_bytes:
                    evicted_key, evicted_value = entries.popitem(last=False)
                    self._bytes -= self._cost(evicted_key, evicted_value)
                    evicted += 1
                entries[key] = value
                self._bytes += cost
                inserted += 1
                inserted_bytes += len(value)
        return inserted, inserted_bytes, evicted, too_large

    @property
    def held_bytes(self) -> int:
        return self._bytes

    @property
    def entries(self) -> int:
        return len(self._entries)


class LocalCache(ResponseCache):
    """A byte-bounded LRU in this process (its entries in an :class:`EntryStore`).
    The event loop and the native frontend's batch threads use it directly; with the
    native frontend, its gRPC threads too (:meth:`use_store`)."""

    kind = "local"

    def __init__(self, size_bytes: int, max_entry_bytes: int | None = None) -> None:
        if size_bytes <= 0:
            raise ValueError(f"size_bytes must be > 0, got {size_bytes}")
        super().__init__(min(max_entry_bytes or size_bytes, size_bytes))
        self.size_bytes = size_bytes
        self.store: EntryStore = DictStore(size_bytes)

    def use_store(self, store: EntryStore) -> None:
        """Keep the entries in ``store`` from now on (made for ``size_bytes`` and
        ``ENTRY_OVERHEAD_BYTES``); only while the cache is still empty."""
        if self.store.entries:
            raise RuntimeError("the local cache's store can only be replaced while it is empty")
        self.store = store

    def __repr__(self) -> str:
        return (f"<LocalCache {self.entries} entries, {self.held_bytes}/{self.size_bytes} bytes, "
                f"hits={self.stats.hits} misses={self.stats.misses} evictions={self.stats.evictions}>")

    async def get(self, key: bytes) -> bytes | None:
        (value,) = self.store.get_many((key,))
        self.count_lookups(value is not None, 1)
        return value

    def _lookup(self, keys: Sequence[bytes]) -> list[bytes | None]:
        values = self.store.get_many(keys)
        self.count_lookups(len(values) - values.count(None), len(values))
        return values

    def lookup_from_thread(self, keys: Sequence[bytes], loop: asyncio.AbstractEventLoop) -> list[bytes | None]:
        """Every key at once, in the calling thread (a native batch's lookups)."""
        return self._lookup(keys)

    def put_many_from_thread(self, items: Sequence[tuple[bytes, bytes]], loop: asyncio.AbstractEventLoop) -> None:
        self._put_many(items)

    def _put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Every item at once (a native batch's answers)."""
        inserted, inserted_bytes, evicted, too_large = self.store.put_many(items, self.max_entry_bytes)
        self.count(inserts=inserted, inserted_bytes=inserted_bytes, evictions=evicted, too_large=too_large)

    def put(self, key: bytes, value: bytes) -> None:
        self._put_many(((key, value),))

    @property
    def held_bytes(self) -> int:
        return self.store.held_bytes

    @property
    def entries(self) -> int:
        return self.store.entries


class HitRate:
    """How often a model version's recent lookups found an entry, and so whether its
    misses wait for the cache (``racing`` False: lookup first, the model on a miss) or
    race it (True: the model starts at once; one request in ``SAMPLE_EVERY`` is looked
    up aside, only to keep this rate current). Waiting costs a remote cache's round
    trip on every miss while saving the model only on the rare hit; racing costs the
    hits' forwards.

    The rate is a mean over about the last ``WINDOW`` lookups (exponentially weighted),
    with hysteresis: racing below ``RACE_BELOW``, lookup-first again above
    ``WAIT_ABOVE``. It starts at ``WAIT_ABOVE`` (lookup-first until misses show).
    Updated where lookups answer: the event loop (a remote cache), or also a native
    batch thread (the local cache); a lost update between threads is harmless. Only a
    remote cache's misses race (a local lookup is a dict access).

    While racing (hits rare, any cache), a miss's answer is stored only the second
    time its key is seen (:meth:`admit`, TinyLFU's "doorkeeper"): with hits this rare,
    most answers are never asked for again, and storing each (encode, an insert or a
    Redis write) was most of what the cache cost a request. A request that repeats
    is stored at its second sighting, and its hits then show in the rate."""

    WINDOW = 256
    RACE_BELOW = 0.05
    WAIT_ABOVE = 0.10
    SAMPLE_EVERY = 8
    """While racing, one request (or native batch) in this many is looked up aside."""
    SEEN_MAX = 16_384
    """Keys the doorkeeper remembers (about 1 MB); when full it starts over."""

    __slots__ = ("_seen", "_turn", "consult_s", "racing", "ratio", "skipped")

    def __init__(self) -> None:
        self.ratio = self.WAIT_ABOVE
        self.racing = False
        self.consult_s = 0.0
        """What consulting the cache costs a request that misses while racing (its key,
        lookup, doorkeeper and write; a batch's time over its requests), a mean over about
        the last ``WINDOW`` such requests; 0 until measured (:meth:`note_consulted`)."""
        self.skipped = 0
        """Requests that left the cache alone while racing (services/inference/cached.py;
        a lost count between threads is harmless)."""
        self._turn = 0
        self._seen: set[bytes] = set()

    def sample(self) -> bool:
        """While racing: whether this request's (or batch's) lookup goes aside; the
        others are not looked up at all (a lost count between threads is harmless).
        A cheap model's requests not sampled leave the cache alone altogether
        (services/inference/cached.py)."""
        self._turn += 1
        return self._turn % self.SAMPLE_EVERY == 0

    def add(self, values: Sequence[bytes | None]) -> None:
        """Note a lookup's answers (None: a miss)."""
        self.add_found(len(values) - values.count(None), len(values))

    def note_consulted(self, seconds: float, requests: int) -> None:
        """Consulting the cache took ``seconds`` for ``requests`` misses while racing."""
        if requests > 0:
            weight = min(1.0, requests / self.WINDOW)
            per_request = seconds / requests
            self.consult_s = per_request if not self.consult_s else (
                self.consult_s + weight * (per_request - self.consult_s))

    def add_found(self, found: int, looked_up: int) -> None:
        """Note ``looked_up`` lookups of which ``found`` hit."""
        if not looked_up:
            return
        weight = min(1.0, looked_up / self.WINDOW)
        self.ratio += weight * (found / looked_up - self.ratio)
        if self.racing:
            self.racing = self.ratio <= self.WAIT_ABOVE
            if not self.racing:
                self._seen.clear()
        else:
            self.racing = self.ratio < self.RACE_BELOW

    def admit(self, key: bytes) -> bool:
        """Whether a miss's answer is stored: always while lookups come first; while
        racing, only when ``key`` was seen before (its first sighting is noted).
        Any thread (set operations are atomic; a sighting lost to a race costs one
        more forward)."""
        if not self.racing:
            return True
        seen = self._seen
        if key in seen:
            return True
        if len(seen) >= self.SEEN_MAX:
            seen.clear()
        seen.add(key)
        return False

    def admit_many(self, keys: Sequence[bytes]) -> list[int]:
        """:meth:`admit` of each of ``keys`` (a native batch's misses): the indexes of
        those whose answers are stored."""
        if not self.racing:
            return list(range(len(keys)))
        seen = self._seen
        admitted = [i for i, key in enumerate(keys) if key in seen]
        if len(seen) + len(keys) > self.SEEN_MAX:
            seen.clear()
        seen.update(keys)
        return admitted


KEY_PREFIX = "tensorwire:response:"
"""Every key the Redis cache writes starts with this (``redis-cli --scan --pattern``)."""
HANDOVER_DELAY_S = 0.05
"""How long what a native batch thread hands over (its writes, its lookups aside) may
wait for the loop to take it along with a lookup, before a timer does."""
ASIDE_DELAY_S = 0.05
"""How long lookups aside (:class:`HitRate`) may gather before their MGET goes."""
ASIDE_KEYS = 64
"""Keys of lookups aside that send their MGET at once."""
MAX_PENDING_WRITES = 1024
"""Redis writes waiting or in flight at once; more are dropped (and counted), never queued."""


_SET_MANY = """
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if ttl > 0 then
    redis.call('SET', key, ARGV[i + 1], 'EX', ttl)
  else
    redis.call('SET', key, ARGV[i + 1])
  end
end
return #KEYS
"""
"""Many ``SET key value [EX ttl]`` in one call (KEYS: keys; ARGV: ttl, then the values)."""
_SET_MANY_SHA = hashlib.sha1(_SET_MANY.encode()).hexdigest()


def _set_command(writes: Sequence[tuple[bytes, bytes]], ttl_s: int, *, load: bool = False) -> tuple[Any, ...]:
    """One command storing ``writes``: a SET, or the script (by its SHA1; ``load``: its
    text, which Redis then keeps)."""
    if len(writes) == 1:
        (key, value), = writes
        return ("SET", key, value, "EX", ttl_s) if ttl_s else ("SET", key, value)
    return ("EVAL" if load else "EVALSHA", _SET_MANY if load else _SET_MANY_SHA, len(writes),
            *(key for key, _ in writes), ttl_s, *(value for _, value in writes))


_KEY_PREFIX = KEY_PREFIX.encode()


def _redis_key(key: bytes) -> bytes:
    return _KEY_PREFIX + binascii.hexlify(key)


def _resolve(future: asyncio.Future[list[bytes | None]], values: list[bytes | None]) -> None:
    if not future.done():  # its request may have been cancelled meanwhile
        future.set_result(values)


class RedisReplyError(Exception):
    """Redis answered a command with an error (``-ERR ...``, ``-NOSCRIPT ...``, ``-WRONGPASS ...``)."""


class _RedisProtocol(asyncio.Protocol):
    """One connection to Redis, pipelined: :meth:`call` writes a round trip's commands
    at once and its future gets their replies (parsed by hiredis, in C), in order."""

    def __init__(self) -> None:
        import hiredis

        self._parser = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._waiting: collections.deque[tuple[int, list[Any], asyncio.Future[list[Any]]]] = collections.deque()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        while self._waiting:
            reply = self._parser.gets()
            if reply is False:  # incomplete: the rest comes with the next data
                return
            count, replies, future = self._waiting[0]
            replies.append(reply)
            if len(replies) == count:
                self._waiting.popleft()
                if not future.done():
                    future.set_result(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("connection closed by Redis")
        while self._waiting:
            future = self._waiting.popleft()[2]
            if not future.done():
                future.set_exception(ConnectionError(f"redis connection lost: {self.lost}"))

    def call(self, packed: bytes, count: int) -> asyncio.Future[list[Any]]:
        """Send ``count`` commands (packed together); the future gets their replies."""
        assert self._transport is not None
        future = asyncio.get_running_loop().create_future()
        if self.lost is not None:
            future.set_exception(ConnectionError(f"redis connection lost: {self.lost}"))
            return future
        self._waiting.append((count, [], future))
        self._transport.write(packed)
        return future

    def abort(self) -> None:
        """Drop the connection (a command timed out: later replies would be misread)."""
        self.lost = self.lost or ConnectionError("connection dropped after a timeout")
        if self._transport is not None:
            self._transport.abort()


class _RedisLink:
    """The cache's connection to Redis: made on demand (authenticated, database
    selected), shared by every round trip, dropped on a timeout or an error and
    made again by the next round trip. Replaces a client library: the cache sends
    MGET, SET and EVAL(SHA) only, and a round trip here costs less than half of
    redis-py's CPU (no pool, no per-command reader; ~60 vs ~135 us per MGET here,
    redis-py with hiredis)."""

    def __init__(self, config: RedisCacheConfig) -> None:
        import hiredis

        self.config = config
        self.pack = hiredis.pack_command
        self._protocol: _RedisProtocol | None = None
        self._connecting: asyncio.Future[_RedisProtocol] | None = None

    async def call(self, *commands: tuple[Any, ...]) -> list[Any]:
        """The replies to ``commands``, sent in one write; a reply error comes back as
        a :class:`RedisReplyError` in its place. Raises on a connection error or a
        timeout (``socket_timeout``)."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._connect()
        packed = b"".join(self.pack(command) for command in commands)
        try:
            async with asyncio.timeout(self.config.socket_timeout_s):
                return _reply_errors(await protocol.call(packed, len(commands)))
        except TimeoutError:
            protocol.abort()
            raise TimeoutError(f"redis did not answer within {self.config.socket_timeout_s * 1000:g} ms") from None

    async def _connect(self) -> _RedisProtocol:
        if self._connecting is None:  # one connect at a time; concurrent round trips wait for it
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, done: asyncio.Future[_RedisProtocol]) -> None:
        self._connecting = None
        if not done.cancelled() and done.exception() is None:
            self._protocol = done.result()

    async def _open(self) -> _RedisProtocol:
        config = self.config
        context = None
        if config.tls_enabled:
            import ssl

            context = ssl.create_default_context(cafile=config.cacert or None)
            if config.cert:
                context.load_cert_chain(config.cert, config.key or None)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(config.connect_timeout_s):
            transport, protocol = await loop.create_connection(_RedisProtocol, config.host, config.port,
                                                               ssl=context)
        hello: list[tuple[Any, ...]] = []
        if config.password:
            hello.append(("AUTH", config.user, config.password) if config.user else ("AUTH", config.password))
        if config.db:
            hello.append(("SELECT", config.db))
        if hello:
            try:
                async with asyncio.timeout(config.socket_timeout_s):
                    replies = await protocol.call(b"".join(self.pack(c) for c in hello), len(hello))
                for reply in _reply_errors(replies):
                    if isinstance(reply, RedisReplyError):
                        raise reply
            except BaseException:
                transport.close()
                raise
        return protocol

    def close(self) -> None:
        if self._protocol is not None:
            self._protocol.abort()
            self._protocol = None


def _reply_errors(replies: list[Any]) -> list[Any]:
    import hiredis

    return [RedisReplyError(str(r)) if isinstance(r, hiredis.ReplyError) else r for r in replies]


@dataclass(frozen=True)
class RedisPending:
    """A snapshot of :attr:`RedisCache.pending`."""

    commands: int
    """Round trips in flight."""
    lookups: int
    """Lookups waiting for the next MGET (aside or not)."""
    writes: int
    """Writes the loop queued or sent, not yet answered."""
    handed: int
    """Writes batch threads handed over, not yet taken by the loop."""


class RedisCache(ResponseCache):
    """Entries in Redis with a TTL, shared by every replica; an outage reads as misses.

    Round trips are shared: one ``MGET`` is in flight at a time and the lookups made
    meanwhile (a request's key, or a native batch's keys as one group) wait for it and
    go together in the next (no timer: an idle server's lookup goes at once, a busy
    one's fill the next MGET, as the request batcher fills batches). Writes (nobody
    waits for them) ride along: the next MGET's round trip carries them after it, as
    one script call (``SET key value EX ttl`` for each); those no MGET took within
    ``write_delay_s`` go on their own. Under load a request's share is a fraction of a
    round trip, which is what costs on the server's CPU (Python and two system calls
    per round trip), not Redis. The connection is this module's own (:class:`_RedisLink`:
    pipelined, hiredis in C), not a client library's. A standalone Redis (or a
    primary), not Redis Cluster: one call's keys may lie in different slots.

    After a failed command the cache is bypassed for a backoff period (``initial_backoff_s``
    doubling to ``max_backoff_s``); then the next lookup probes Redis (one at a time) and
    a success ends the outage; lookups that were waiting for the next MGET when one
    failed are misses at once (bypassed). A broken or timed-out connection is dropped
    and a new one made by the next round trip. ``stats.errors`` counts failed round
    trips (one MGET may have carried several lookups).

    Each round trip is a task whose end, however it comes (an answer, an error, a
    cancellation, even one before the task started: a shutdown's), answers every lookup
    it carried (misses unless Redis answered) and lets the next MGET go; ``flush``
    waits for the tasks without cancelling them when it is cancelled itself.
    """

    kind = "redis"
    remote = True

    def __init__(
        self,
        config: RedisCacheConfig,
        *,
        initial_backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        write_delay_s: float = 0.005,
        clock: Any = time.monotonic,
    ) -> None:
        super().__init__(config.max_entry_bytes)
        self.config = config
        # A lookup fails by itself after the socket timeouts; this only guards a stuck loop.
        self.thread_timeout_s = config.connect_timeout_s + config.socket_timeout_s + 1.0
        # No retries: a failed command is a miss now, not seconds of backoff on the
        # request's path; this class does the backing off.
        self._link = _RedisLink(config)
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._backoff_s = initial_backoff_s
        self._clock = clock
        self._down_until: float | None = None
        """None while Redis answers; else when the next probe may go."""
        self._probing = False
        self._lookups: list[tuple[Sequence[bytes], Any]] = []
        """Lookups waiting for their MGET: (keys of a request or a batch, deliver(values))."""
        self._mget_in_flight = False
        self._writes: list[tuple[bytes, bytes]] = []
        """Writes of this loop iteration, waiting for their pipeline."""
        self._pending_writes = 0
        """Writes waiting or in flight."""
        self._write_delay_s = write_delay_s
        self._write_timer: asyncio.TimerHandle | None = None
        self._handed: list[tuple[bytes, bytes]] = []
        """Writes the native frontend's batch threads handed over, not yet taken by the loop."""
        self._handed_dropped = 0
        """Writes the batch threads dropped (over ``MAX_PENDING_WRITES``), not yet counted."""
        self._handed_lock = threading.Lock()
        self._handover_armed = False
        """Whether the hand-over timer is armed (or being armed): writes and lookups aside alike."""
        self._commands: set[asyncio.Task[None]] = set()
        self._aside: list[tuple[Sequence[bytes], Any]] = []
        """Lookups aside gathering for their MGET: (keys, deliver(values))."""
        self._aside_keys = 0
        self._aside_timer: asyncio.TimerHandle | None = None
        self._aside_handed: list[tuple[Sequence[bytes], Callable[[list[bytes | None]], None]]] = []
        """Lookups aside the batch threads handed over, not yet taken by the loop."""

    def __repr__(self) -> str:
        state = "up" if self._down_until is None else f"down (retry in {self._retry_in_s():.2f}s)"
        pending = self.pending
        return (f"<RedisCache {self.config.host}:{self.config.port}/{self.config.db} {state}, "
                f"{pending.commands} commands and {pending.writes} writes in flight, "
                f"hits={self.stats.hits} misses={self.stats.misses} errors={self.stats.errors}>")

    @property
    def pending(self) -> RedisPending:
        """What waits or is in flight now (a snapshot; the loop's thread)."""
        with self._handed_lock:
            handed = len(self._handed)
            asides = len(self._aside_handed)
        return RedisPending(len(self._commands), len(self._lookups) + len(self._aside) + asides,
                            self._pending_writes, handed)

    def _retry_in_s(self) -> float:
        return 0.0 if self._down_until is None else max(0.0, self._down_until - self._clock())

    @property
    def up(self) -> bool:
        return self._down_until is None

    def _may_try(self) -> bool:
        """Whether a command may go to Redis now (claims the probe while it is down)."""
        if self._down_until is None:
            return True
        if self._probing or self._clock() < self._down_until:
            return False
        self._probing = True
        return True

    def _failed(self, what: str, exc: BaseException) -> None:
        self.stats.errors += 1
        if self._down_until is None:
            log.warning("redis cache %s:%d unreachable (%s failed: %s); requests run on the model",
                        self.config.host, self.config.port, what, exc)
        else:
            self._backoff_s = min(self._backoff_s * 2, self._max_backoff_s)
        self._down_until = self._clock() + self._backoff_s
        self._probing = False

    def _succeeded(self) -> None:
        if self._down_until is not None:
            log.info("redis cache %s:%d reachable again", self.config.host, self.config.port)
        self._down_until = None
        self._probing = False
        self._backoff_s = self._initial_backoff_s

    def _spawn(self, command: Any, done: Any) -> None:
        """Run ``command`` as a task; ``done(task)`` runs once it ended, however it ended
        (cancelled before it started included: its own ``finally`` never runs then)."""
        task = asyncio.get_running_loop().create_task(command)
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)
        task.add_done_callback(done)

    async def get(self, key: bytes) -> bytes | None:
        if not self._may_try():
            self.stats.bypassed += 1
            self.stats.misses += 1
            return None
        future: asyncio.Future[list[bytes | None]] = asyncio.get_running_loop().create_future()
        self._queue_lookup((key,), functools.partial(_resolve, future))
        (value,) = await future
        if value is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return value

    def lookup_from_thread(self, keys: Sequence[bytes], loop: asyncio.AbstractEventLoop) -> list[bytes | None]:
        """The keys join the next MGET as one group: one hop to the loop, no task per key."""
        done: concurrent.futures.Future[list[bytes | None]] = concurrent.futures.Future()
        loop.call_soon_threadsafe(self._lookup_for_thread, keys, done)
        try:
            return done.result(timeout=self.thread_timeout_s)
        except concurrent.futures.TimeoutError:  # the loop is stuck: misses, not a stuck batch
            done.cancel()
            self.stats.errors += 1
            return [None] * len(keys)

    def _lookup_for_thread(self, keys: Sequence[bytes],
                           done: concurrent.futures.Future[list[bytes | None]]) -> None:
        self._take_handed()  # the writes of earlier batches ride along with this lookup
        if not done.set_running_or_notify_cancel():
            return
        if not self._may_try():
            self.stats.bypassed += len(keys)
            self.stats.misses += len(keys)
            done.set_result([None] * len(keys))
            return
        self._queue_lookup(keys, functools.partial(self._deliver_to_thread, done))

    def _deliver_to_thread(self, done: concurrent.futures.Future[list[bytes | None]],
                           values: list[bytes | None]) -> None:
        found = sum(value is not None for value in values)
        self.stats.hits += found
        self.stats.misses += len(values) - found
        done.set_result(values)

    def lookup_aside(self, keys: Sequence[bytes], done: Callable[[list[bytes | None]], None]) -> None:
        """The keys join an MGET like a waiting lookup's, ``done(values)`` when it answered;
        as nobody waits for them, they gather first, for ``ASIDE_DELAY_S`` or until
        ``ASIDE_KEYS`` keys wait: a round trip for several of them, not one each (the
        misses that do not wait come one per request, each loop iteration)."""
        self._aside.append((keys, functools.partial(self._deliver_aside, done)))
        self._aside_keys += len(keys)
        if self._aside_keys >= ASIDE_KEYS:
            self._send_aside()
        elif self._aside_timer is None:
            self._aside_timer = asyncio.get_running_loop().call_later(ASIDE_DELAY_S, self._send_aside)

    def _send_aside(self) -> None:
        if self._aside_timer is not None:
            self._aside_timer.cancel()
            self._aside_timer = None
        self._take_handed()
        batch, self._aside, self._aside_keys = self._aside, [], 0
        for keys, deliver in batch:  # _send_lookups gates them (misses within a backoff)
            self._queue_lookup(keys, deliver)

    def _deliver_aside(self, done: Callable[[list[bytes | None]], None], values: list[bytes | None]) -> None:
        found = sum(value is not None for value in values)
        self.stats.hits += found
        self.stats.misses += len(values) - found
        done(values)

    # -- what the native frontend's batch threads hand over --------------------
    def put_many_from_thread(self, items: Sequence[tuple[bytes, bytes]], loop: asyncio.AbstractEventLoop) -> None:
        """Handed over without waking the loop: the next batch's lookup (a hop to the
        loop anyway) takes them along, else the hand-over timer (:meth:`_hand_over`).
        Within the same bound as the loop's writes: with ``MAX_PENDING_WRITES`` writes
        handed over or in flight, more are dropped (and counted), never queued."""
        if not items:
            return
        with self._handed_lock:
            room = MAX_PENDING_WRITES - self._pending_writes - len(self._handed)  # the loop's count: read, not written
            if len(items) > room:
                self._handed_dropped += len(items) - max(room, 0)
                items = items[: max(room, 0)]
            self._handed += items
            arm = self._arm(bool(items))
        self._hand_over(arm, loop)

    def lookup_aside_from_thread(self, keys: Sequence[bytes], done: Callable[[list[bytes | None]], None],
                                 loop: asyncio.AbstractEventLoop) -> None:
        """Handed over like the writes: a hop to the loop for each sampled native batch
        (~120 a second at 5,000 requests a second) cost the loop ~5 us per request, and
        the batch threads the GIL hand-overs it forced."""
        with self._handed_lock:
            self._aside_handed.append((keys, done))
            arm = self._arm(True)
        self._hand_over(arm, loop)

    def _arm(self, wanted: bool) -> bool:
        """(``_handed_lock`` held) Whether this hand-over arms the timer: the first one
        since the timer last found nothing."""
        arm = wanted and not self._handover_armed
        self._handover_armed = self._handover_armed or arm
        return arm

    def _hand_over(self, arm: bool, loop: asyncio.AbstractEventLoop) -> None:
        """One wake-up of the loop per ``HANDOVER_DELAY_S`` at most, not one per batch:
        the first hand-over arms a timer that takes what was handed over meanwhile."""
        if not arm:
            return
        try:
            loop.call_soon_threadsafe(self._arm_handover)
        except RuntimeError:  # the loop is closed (shutdown): nothing will take them
            with self._handed_lock:
                self._handed.clear()
                self._aside_handed.clear()
                self._handover_armed = False
            raise

    def _arm_handover(self) -> None:
        asyncio.get_running_loop().call_later(HANDOVER_DELAY_S, self._handover_due)

    def _handover_due(self) -> None:
        with self._handed_lock:  # taken, and disarmed when empty, at once: a later hand-over arms again
            taken = self._take_locked()
            if not (taken[0] or taken[2]):
                self._handover_armed = False
        self._absorb(*taken)
        if taken[0]:
            self._send_writes()  # no lookup came to take them: they have waited long enough
        if self._aside:  # handed over (now, or taken along with a lookup since): due too
            self._send_aside()
        if taken[0] or taken[2]:
            self._arm_handover()

    def _take_handed(self) -> None:
        """On the loop: what the batch threads handed over joins the loop's own writes
        and lookups aside."""
        if self._handed or self._handed_dropped or self._aside_handed:
            with self._handed_lock:
                taken = self._take_locked()
            self._absorb(*taken)

    def _take_locked(self) -> tuple[list[tuple[bytes, bytes]], int,
                                    list[tuple[Sequence[bytes], Callable[[list[bytes | None]], None]]]]:
        taken = self._handed, self._handed_dropped, self._aside_handed
        self._handed, self._handed_dropped, self._aside_handed = [], 0, []
        return taken

    def _absorb(self, items: list[tuple[bytes, bytes]], dropped: int,
                asides: list[tuple[Sequence[bytes], Callable[[list[bytes | None]], None]]]) -> None:
        self.stats.dropped_writes += dropped
        self._put_many(items)
        for keys, done in asides:
            self._aside.append((keys, functools.partial(self._deliver_aside, done)))
            self._aside_keys += len(keys)

    def _queue_lookup(self, keys: Sequence[bytes], deliver: Any) -> None:
        """``deliver(values)`` once the MGET that carries ``keys`` answered (None: missing
        or failed)."""
        self._lookups.append((keys, deliver))
        if not self._mget_in_flight:
            self._mget_in_flight = True  # claimed now; sent once this loop iteration's lookups joined
            asyncio.get_running_loop().call_soon(self._send_lookups)

    def _send_lookups(self) -> None:
        """The lookups queued meanwhile, in one MGET; without one in flight afterwards
        when there are none, or when Redis failed since they were queued (within the
        backoff they are misses at once, not a doomed round trip)."""
        batch, self._lookups = self._lookups, []
        if not batch:
            self._mget_in_flight = False
            return
        # A probe claimed by one of these lookups goes; else the gate decides now.
        if not (self._probing or self._may_try()):
            self._mget_in_flight = False
            self.stats.bypassed += sum(len(keys) for keys, _ in batch)
            _deliver_misses(batch)
            return
        trip = _RoundTrip(batch, self._take_writes())
        self._spawn(self._mget(trip), functools.partial(self._mget_ended, trip))

    async def _mget(self, trip: _RoundTrip) -> None:
        """One round trip: the MGET of ``trip``'s keys and, in the same write after it,
        the writes waiting (nobody waits for those; Redis answers them in microseconds)."""
        values: Any = []
        stored: Any = None
        self.stats.commands += 1
        try:
            mget = ("MGET", *(_redis_key(key) for group, _ in trip.lookups for key in group))
            if trip.writes:
                values, stored = await self._link.call(mget, _set_command(trip.writes, self.config.ttl_s))
            else:
                (values,) = await self._link.call(mget)
            if isinstance(values, Exception):
                raise values
        except asyncio.CancelledError as exc:
            self._probing = False
            values, stored = [], exc
            raise
        except Exception as exc:  # connection errors, timeouts, refusals: never the request's failure
            self._failed("MGET", exc)
            values, stored = [], exc
        else:
            self._succeeded()
        finally:
            self._finish(trip, values, stored)

    def _mget_ended(self, trip: _RoundTrip, task: asyncio.Task[None]) -> None:
        """The round trip's task ended: when it was cancelled before it started, its
        ``finally`` never ran, and its lookups are answered here (misses)."""
        if not trip.finished:
            self._probing = False
            self._finish(trip, [], asyncio.CancelledError())

    def _finish(self, trip: _RoundTrip, values: Any, stored: Any) -> None:
        """Answer ``trip``'s lookups (misses where ``values`` has none), account for its
        writes, then send the lookups that came meanwhile (or let the next MGET go)."""
        if trip.finished:
            return
        trip.finished = True
        try:
            at = 0
            for group, deliver in trip.lookups:
                n = len(group)
                try:
                    deliver(values[at : at + n] if at + n <= len(values) else [None] * n)
                except Exception:  # one waiter's failure must not strand the others
                    log.exception("response cache: delivering a lookup failed")
                at += n
            if trip.writes:
                self._written(trip.writes, stored)
        finally:
            self._send_lookups()

    def _written(self, writes: list[tuple[bytes, bytes]], reply: Any, *, loaded: bool = False) -> None:
        """Account for a write command's ``reply`` (or the error that stopped it)."""
        if (isinstance(reply, RedisReplyError) and str(reply).startswith("NOSCRIPT") and not loaded
                and self._down_until is None):
            self._spawn_set(writes, load=True)  # Redis restarted and lost the script
            return
        self._pending_writes -= len(writes)
        if isinstance(reply, asyncio.CancelledError):  # the server is closing: not Redis's failure
            return
        if isinstance(reply, BaseException):
            if self._down_until is None:  # else the round trip's failure was counted already
                self._failed("SET", reply)
            return
        self.stats.inserts += len(writes)
        self.stats.inserted_bytes += sum(len(value) for _, value in writes)

    def put(self, key: bytes, value: bytes) -> None:
        if not self._fits(value):
            return
        if self._down_until is not None:
            self.stats.bypassed += 1
            return
        if self._pending_writes >= MAX_PENDING_WRITES:
            self.stats.dropped_writes += 1
            return
        self._pending_writes += 1
        self._writes.append((_redis_key(key), value))
        if len(self._writes) == 1:
            self._write_timer = asyncio.get_running_loop().call_later(self._write_delay_s, self._send_writes)

    def _take_writes(self) -> list[tuple[bytes, bytes]]:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        batch, self._writes = self._writes, []
        return batch

    def _send_writes(self) -> None:
        """The writes that no MGET took along within ``write_delay_s``, on their own;
        none while Redis is down (queued before a round trip failed, they are bypassed,
        not sent on a doomed command during the backoff: the lookups probe Redis)."""
        batch = self._take_writes()
        if not batch:
            return
        if self._down_until is not None:
            self._pending_writes -= len(batch)
            self.stats.bypassed += len(batch)
            return
        self._spawn_set(batch)

    def _spawn_set(self, batch: list[tuple[bytes, bytes]], *, load: bool = False) -> None:
        self._spawn(self._set(batch, load=load), functools.partial(self._set_ended, batch, load))

    async def _set(self, batch: list[tuple[bytes, bytes]], *, load: bool = False) -> Any:
        """The reply to the writes (or the error that stopped them)."""
        self.stats.commands += 1
        try:
            (reply,) = await self._link.call(_set_command(batch, self.config.ttl_s, load=load))
        except Exception as exc:
            return exc
        return reply

    def _set_ended(self, batch: list[tuple[bytes, bytes]], load: bool, task: asyncio.Task[Any]) -> None:
        """Accounts for the writes however their task ended (cancelled, even before it
        started: they leave the pending count all the same)."""
        reply = asyncio.CancelledError() if task.cancelled() else task.exception() or task.result()
        self._written(batch, reply, loaded=load)

    async def flush(self) -> None:
        await asyncio.sleep(0)  # runs what other threads scheduled
        self._take_handed()
        while self._commands or self._lookups or self._writes or self._aside or self._aside_handed:
            self._send_aside()  # now, not after their delay
            self._send_writes()  # now, not after the write delay
            await asyncio.sleep(0)  # lets the scheduled lookups start
            if self._commands:
                # wait, not gather: when this wait (or whoever awaits flush) is cancelled,
                # the commands are not, and every lookup is still answered
                await asyncio.wait(list(self._commands))

    async def aclose(self) -> None:
        await self.flush()
        self._link.close()


@dataclass(slots=True)
class _RoundTrip:
    """An MGET's lookups ((keys, deliver(values)) each) and the writes riding with it."""

    lookups: list[tuple[Sequence[bytes], Any]]
    writes: list[tuple[bytes, bytes]]
    finished: bool = False
    """Whether the lookups were answered (by the task, or when it ended without running)."""


def _deliver_misses(lookups: Iterable[tuple[Sequence[bytes], Any]]) -> None:
    for keys, deliver in lookups:
        deliver([None] * len(keys))


def open_cache(config: CacheConfig | None) -> ResponseCache | None:
    """The cache a config describes (None: no cache)."""
    if config is None:
        return None
    if isinstance(config, LocalCacheConfig):
        return LocalCache(config.size_bytes, config.max_entry_bytes)
    return RedisCache(config)


def describe_cache(config: CacheConfig | None) -> str:
    """For the start-up log (no password)."""
    if config is None:
        return "no response cache"
    if isinstance(config, LocalCacheConfig):
        return f"local response cache of {config.size_bytes} bytes"
    return (f"redis response cache at {config.host}:{config.port}/{config.db} "
            f"(ttl {config.ttl_s}s{', TLS' if config.tls_enabled else ''})")
