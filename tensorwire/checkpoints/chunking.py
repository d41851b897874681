"""Chunked streaming of large payloads: checked, compressed when it pays, flow-controlled.

A payload (a checkpoint file, a bulk output) travels as a sequence of ``Chunk``:

- size: 64 KiB to start, then adapted to the measured throughput so one chunk is
  about ``target_chunk_s`` of link time (fast links get bigger chunks and fewer
  messages, slow links smaller ones that keep the stream responsive), between
  ``min_chunk_bytes`` and ``max_chunk_bytes``;
- integrity: a CRC32 of each chunk's uncompressed bytes, and one of the whole
  payload checked at the end; a mismatch, a gap or a reordering is ``DataLossError``;
- compression (zstd or gzip): only for chunks over ``compress_min_bytes`` and only
  when it saves at least ``min_saving`` (20 %); otherwise the raw bytes go (and
  after a few misses in a row it is only probed now and then);
- backpressure: the reader task fills a ``BoundedBuffer`` of ``buffer_bytes``
  (10 MiB); when the consumer (the gRPC stream, itself under HTTP/2 flow control)
  is slower, the reader waits instead of growing memory;
- metrics: chunks, raw and wire bytes, compression ratio, backpressure events.

``ChunkSender`` turns a file into chunks; ``ChunkReceiver`` verifies chunks and
writes them to a file. Both are plain Python over asyncio, used by the checkpoint
transfer RPC (``tensorwire.checkpoints.receiver`` and ``checkpoint_upload``) and testable without gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gzip
import os
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Generic, TypeVar

import zstandard
from prometheus_client import Counter

from tensorwire.errors import DataLossError, InvalidArgumentError

KiB = 1024
MiB = 1024 * KiB

_CHUNKS = Counter("tensorwire_chunks_total", "Chunks streamed.", ["direction"])
_RAW = Counter("tensorwire_chunk_raw_bytes_total", "Uncompressed payload bytes.", ["direction"])
_WIRE = Counter("tensorwire_chunk_wire_bytes_total", "Bytes on the wire (after compression).", ["direction"])
_BACKPRESSURE = Counter(
    "tensorwire_chunk_backpressure_total",
    "Times a producer waited because the bounded chunk buffer was full.",
    ["direction"],
)


class Compression(enum.IntEnum):
    """Values match tensorwire.transfer.v1.Compression."""

    NONE = 0
    ZSTD = 1
    GZIP = 2


@dataclass(frozen=True)
class ChunkConfig:
    """How payloads are cut, compressed and buffered."""

    chunk_bytes: int = 64 * KiB
    """Size of the first chunks, before any throughput is measured."""
    min_chunk_bytes: int = 16 * KiB
    max_chunk_bytes: int = 1 * MiB
    adaptive: bool = True
    """Adapt the chunk size to the measured throughput."""
    target_chunk_s: float = 0.02
    """Adaptive sizing aims at one chunk per this much link time."""
    compression: Compression = Compression.ZSTD
    """Codec tried on each chunk (NONE disables compression)."""
    compress_min_bytes: int = 1 * KiB
    """Chunks of this size or smaller are never compressed."""
    min_saving: float = 0.20
    """Compressed data is sent only when it is at least this much smaller."""
    zstd_level: int = 3
    buffer_bytes: int = 10 * MiB
    """Most bytes buffered between the reader and the consumer (backpressure bound)."""

    def __post_init__(self) -> None:
        if not 0 < self.min_chunk_bytes <= self.chunk_bytes <= self.max_chunk_bytes:
            raise InvalidArgumentError(
                "need 0 < min_chunk_bytes <= chunk_bytes <= max_chunk_bytes, got "
                f"{self.min_chunk_bytes}, {self.chunk_bytes}, {self.max_chunk_bytes}"
            )
        if not 0 <= self.min_saving < 1:
            raise InvalidArgumentError(f"min_saving must be in [0, 1), got {self.min_saving}")
        if self.buffer_bytes < 1:
            raise InvalidArgumentError(f"buffer_bytes must be >= 1, got {self.buffer_bytes}")
        if self.target_chunk_s <= 0:
            raise InvalidArgumentError(f"target_chunk_s must be > 0, got {self.target_chunk_s}")


@dataclass(frozen=True)
class Chunk:
    """One piece of a payload (the wire form is tensorwire.transfer.v1.Chunk)."""

    index: int
    offset: int
    data: bytes
    compression: Compression
    raw_size: int
    crc32: int


@dataclass
class StreamMetrics:
    """Counters of one direction of one stream (also exported to Prometheus)."""

    direction: str = "send"
    chunks: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    compressed_chunks: int = 0
    backpressure_events: int = 0

    def record(self, chunk: Chunk) -> None:
        self.chunks += 1
        self.raw_bytes += chunk.raw_size
        self.wire_bytes += len(chunk.data)
        if chunk.compression is not Compression.NONE:
            self.compressed_chunks += 1
        _CHUNKS.labels(self.direction).inc()
        _RAW.labels(self.direction).inc(chunk.raw_size)
        _WIRE.labels(self.direction).inc(len(chunk.data))

    def record_backpressure(self) -> None:
        self.backpressure_events += 1
        _BACKPRESSURE.labels(self.direction).inc()

    @property
    def compression_ratio(self) -> float:
        """Raw bytes per wire byte (1.0 = nothing saved)."""
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else 1.0


# ------------------------------------------------------------------ compression

_zstd_d = zstandard.ZstdDecompressor()


def compress(data: bytes, config: ChunkConfig) -> tuple[Compression, bytes]:
    """The chunk's bytes as sent: compressed only when large enough and it pays."""
    if config.compression is Compression.NONE or len(data) <= config.compress_min_bytes:
        return Compression.NONE, data
    if config.compression is Compression.ZSTD:
        packed = zstandard.ZstdCompressor(level=config.zstd_level).compress(data)
    else:
        packed = gzip.compress(data, compresslevel=6, mtime=0)
    if len(packed) <= len(data) * (1.0 - config.min_saving):
        return config.compression, packed
    return Compression.NONE, data


def decompress(compression: Compression, data: bytes, raw_size: int) -> bytes:
    """Undo ``compress``; a bad stream is DataLossError."""
    try:
        if compression == Compression.NONE:
            return data
        if compression == Compression.ZSTD:
            return _zstd_d.decompress(data, max_output_size=raw_size)
        if compression == Compression.GZIP:
            return gzip.decompress(data)
    except (zstandard.ZstdError, OSError, EOFError, zlib.error) as exc:
        raise DataLossError(f"chunk does not decompress ({Compression(compression).name}): {exc}") from None
    raise DataLossError(f"unknown chunk compression {int(compression)}")


# ---------------------------------------------------------------- encode/decode


class ChunkEncoder:
    """Numbers, checksums and compresses successive pieces of one payload.

    After ``skip_after`` chunks in a row on which compression did not pay (random
    weights), it is tried only on every ``probe_every``-th chunk until it pays
    again, so incompressible payloads do not spend CPU on it."""

    def __init__(self, config: ChunkConfig, *, skip_after: int = 4, probe_every: int = 16) -> None:
        self.config = config
        self.index = 0
        self.offset = 0
        self.crc32 = 0
        """CRC32 of everything encoded so far."""
        self.skip_after = skip_after
        self.probe_every = probe_every
        self.compress_attempts = 0
        self._misses = 0

    def _should_try(self) -> bool:
        return self._misses < self.skip_after or self.index % self.probe_every == 0

    def encode(self, raw: bytes) -> Chunk:
        crc = zlib.crc32(raw)
        codec, data = Compression.NONE, raw
        wanted = self.config.compression is not Compression.NONE
        if wanted and len(raw) > self.config.compress_min_bytes and self._should_try():
            self.compress_attempts += 1
            codec, data = compress(raw, self.config)
            self._misses = 0 if codec is not Compression.NONE else self._misses + 1
        chunk = Chunk(self.index, self.offset, data, codec, len(raw), crc)
        self.crc32 = zlib.crc32(raw, self.crc32)
        self.index += 1
        self.offset += len(raw)
        return chunk


class ChunkDecoder:
    """Checks order, decompresses and verifies chunks; then the whole payload."""

    def __init__(self, max_chunk_bytes: int = 16 * MiB) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self.index = 0
        self.offset = 0
        self.crc32 = 0

    def decode(self, chunk: Chunk) -> bytes:
        if chunk.index != self.index:
            raise DataLossError(f"chunk {chunk.index} arrived where chunk {self.index} was expected")
        if chunk.offset != self.offset:
            raise DataLossError(
                f"chunk {chunk.index} starts at byte {chunk.offset}, expected {self.offset}"
            )
        if not 0 < chunk.raw_size <= self.max_chunk_bytes:
            raise DataLossError(
                f"chunk {chunk.index} claims {chunk.raw_size} bytes (limit {self.max_chunk_bytes})"
            )
        raw = decompress(chunk.compression, chunk.data, chunk.raw_size)
        if len(raw) != chunk.raw_size:
            raise DataLossError(
                f"chunk {chunk.index} has {len(raw)} bytes, its header says {chunk.raw_size}"
            )
        if zlib.crc32(raw) != chunk.crc32:
            raise DataLossError(f"chunk {chunk.index} (byte {chunk.offset}) fails its CRC32 check")
        self.crc32 = zlib.crc32(raw, self.crc32)
        self.index += 1
        self.offset += len(raw)
        return raw

    def finish(self, *, total_bytes: int, crc32: int, chunks: int) -> None:
        """Check the whole payload against the sender's totals."""
        if chunks != self.index or total_bytes != self.offset:
            raise DataLossError(
                f"payload incomplete: got {self.index} chunks / {self.offset} bytes, "
                f"sender sent {chunks} chunks / {total_bytes} bytes"
            )
        if crc32 != self.crc32:
            raise DataLossError(
                f"payload fails its CRC32 check (got {self.crc32:08x}, sender {crc32:08x})"
            )


class ChunkSizer:
    """Chooses the next chunk size from the measured throughput.

    Throughput is measured over windows of ``window_s`` or 8 chunks, whichever
    ends first, capped at the average since the first chunk; a slower window is
    believed at once, a faster one folded in gradually (EWMA). The size is the power of two nearest
    ``throughput * target_chunk_s``, within the configured bounds; it at most
    doubles per window (the first chunks fill socket buffers and look fast) and
    shrinks at once.
    """

    def __init__(self, config: ChunkConfig, clock: Callable[[], float] = time.monotonic,
                 window_s: float = 0.05) -> None:
        self.config = config
        self.size = config.chunk_bytes
        self.throughput_bps: float | None = None
        self._clock = clock
        self._window_s = window_s
        self._window_start: float | None = None
        self._window_bytes = 0
        self._start, self._total = 0.0, 0

    def record(self, nbytes: int) -> None:
        """``nbytes`` more raw bytes were consumed downstream."""
        now = self._clock()
        if self._window_start is None:
            self._window_start, self._window_bytes = now, 0
            self._start, self._total = now, 0
            return
        self._window_bytes += nbytes
        self._total += nbytes
        elapsed = now - self._window_start
        # A window closes after window_s, or after 8 chunks on a link so fast that
        # the whole payload might pass within one window.
        if elapsed < self._window_s and (self._window_bytes < 8 * self.size or elapsed <= 0):
            return
        # A window can fall inside a burst (gRPC drains the stream in bursts while
        # its flow-control window is open), so it is never believed above the
        # average since the start: buffers fill once, the link's rate stays.
        rate = min(self._window_bytes / elapsed, self._total / max(now - self._start, 1e-9))
        if self.throughput_bps is None or rate < self.throughput_bps:
            # Slower: believe it at once (the first chunks go into socket buffers
            # and look fast; a slow link must not keep megabyte chunks).
            self.throughput_bps = rate
        else:
            self.throughput_bps = 0.7 * self.throughput_bps + 0.3 * rate
        self._window_start, self._window_bytes = now, 0
        if self.config.adaptive:
            want = max(1.0, self.throughput_bps * self.config.target_chunk_s)
            size = 1 << round(want).bit_length() - 1
            if want >= size * 1.5:
                size <<= 1
            size = min(size, 2 * self.size)  # grow at most 2x per window, shrink at once
            self.size = max(self.config.min_chunk_bytes, min(self.config.max_chunk_bytes, size))


# ------------------------------------------------------------------ backpressure

T = TypeVar("T")


@dataclass
class BoundedBuffer(Generic[T]):
    """An async FIFO bounded in bytes: ``put`` waits while it is full.

    One item larger than the limit is still accepted when the buffer is empty, so
    the stream always makes progress.
    """

    limit_bytes: int
    metrics: StreamMetrics | None = None
    _items: deque[tuple[T, int]] = field(default_factory=deque)
    _bytes: int = 0
    _done: bool = False
    _error: BaseException | None = None
    _cond: asyncio.Condition = field(default_factory=asyncio.Condition)
    peak_bytes: int = 0

    async def wait_for_space(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more fit (a producer calls it before reading more)."""
        async with self._cond:
            if self._bytes and self._bytes + nbytes > self.limit_bytes:
                if self.metrics is not None:
                    self.metrics.record_backpressure()
                await self._cond.wait_for(
                    lambda: not self._bytes or self._bytes + nbytes <= self.limit_bytes
                )

    async def put(self, item: T, nbytes: int) -> None:
        await self.wait_for_space(nbytes)
        async with self._cond:
            self._items.append((item, nbytes))
            self._bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            self._cond.notify_all()

    async def get(self) -> T | None:
        """The next item; None once the producer closed and everything was taken."""
        async with self._cond:
            await self._cond.wait_for(lambda: self._items or self._done or self._error)
            if self._items:
                item, nbytes = self._items.popleft()
                self._bytes -= nbytes
                self._cond.notify_all()
                return item
            if self._error is not None:
                raise self._error
            return None

    async def close(self, error: BaseException | None = None) -> None:
        """The producer is done (or failed with ``error``, raised to the consumer)."""
        async with self._cond:
            self._done = True
            self._error = error
            self._cond.notify_all()


# --------------------------------------------------------------- sender/receiver


class ChunkSender:
    """Reads a file in a background task and yields its chunks, flow-controlled.

    ``async for chunk in sender.chunks(): ...``; afterwards ``crc32``,
    ``total_bytes`` and ``chunk_count`` describe the whole payload. The reader
    task is owned: it ends with the iteration, or is cancelled by ``aclose()``.
    """

    def __init__(self, source: BinaryIO, config: ChunkConfig = ChunkConfig(), *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.metrics = StreamMetrics("send")
        self.sizer = ChunkSizer(config, clock)
        self._source = source
        self._encoder = ChunkEncoder(config)
        self._buffer: BoundedBuffer[Chunk] = BoundedBuffer(config.buffer_bytes, self.metrics)
        self._reader: asyncio.Task[None] | None = None
        self._finished = False

    @property
    def crc32(self) -> int:
        return self._encoder.crc32

    @property
    def total_bytes(self) -> int:
        return self._encoder.offset

    @property
    def chunk_count(self) -> int:
        return self._encoder.index

    @property
    def finished(self) -> bool:
        """True once every chunk was yielded."""
        return self._finished

    @property
    def peak_buffered_bytes(self) -> int:
        return self._buffer.peak_bytes

    def _read_and_encode(self, size: int) -> Chunk | None:
        raw = self._source.read(size)
        return self._encoder.encode(raw) if raw else None

    async def _read(self) -> None:
        try:
            while True:
                # Wait for room first, then read at the size chosen *now*: nothing is
                # read ahead of the bound, and a new size applies at once.
                await self._buffer.wait_for_space(self.sizer.size)
                chunk = await asyncio.to_thread(self._read_and_encode, self.sizer.size)
                if chunk is None:
                    break
                await self._buffer.put(chunk, len(chunk.data))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await self._buffer.close(exc)
            return
        await self._buffer.close()

    async def chunks(self) -> AsyncIterator[Chunk]:
        if self._reader is not None:
            raise RuntimeError("ChunkSender.chunks() can be iterated once")
        self._reader = asyncio.get_running_loop().create_task(self._read())
        try:
            while (chunk := await self._buffer.get()) is not None:
                self.metrics.record(chunk)
                yield chunk
                # Resumed: the consumer took the chunk (the stream accepted it).
                self.sizer.record(chunk.raw_size)
            self._finished = True
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class ChunkReceiver:
    """Verifies incoming chunks and writes them to ``sink`` (no extra buffering:
    while a write is in progress the next chunk is not read, so the transport's
    flow control pushes back on the sender)."""

    def __init__(self, sink: BinaryIO, *, max_chunk_bytes: int = 16 * MiB,
                 max_total_bytes: int | None = None) -> None:
        self.metrics = StreamMetrics("receive")
        self._sink = sink
        self._decoder = ChunkDecoder(max_chunk_bytes)
        self._max_total = max_total_bytes

    @property
    def total_bytes(self) -> int:
        return self._decoder.offset

    @property
    def chunk_count(self) -> int:
        return self._decoder.index

    @property
    def crc32(self) -> int:
        return self._decoder.crc32

    def _decode_and_write(self, chunk: Chunk) -> None:
        raw = self._decoder.decode(chunk)
        self._sink.write(raw)

    async def feed(self, chunk: Chunk) -> None:
        if self._max_total is not None and self._decoder.offset + chunk.raw_size > self._max_total:
            raise DataLossError(
                f"payload exceeds its announced size of {self._max_total} bytes at chunk {chunk.index}"
            )
        self.metrics.record(chunk)
        await asyncio.to_thread(self._decode_and_write, chunk)

    async def finish(self, *, total_bytes: int, crc32: int, chunks: int) -> None:
        """Verify the whole payload and flush it to stable storage."""
        self._decoder.finish(total_bytes=total_bytes, crc32=crc32, chunks=chunks)

        def sync() -> None:
            self._sink.flush()
            with contextlib.suppress(AttributeError, OSError):
                os.fsync(self._sink.fileno())

        await asyncio.to_thread(sync)
