"""Chunked streaming and checkpoint transfer (the seed's response-streamer tests),
over a real grpc.aio server on port 0 where a transport is involved."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch

from services.inference.transfer import SERVICE_NAME, ModelTransferServicer
from tensorwire.checkpoints.chunking import (
    Chunk,
    ChunkConfig,
    ChunkDecoder,
    ChunkEncoder,
    ChunkReceiver,
    ChunkSender,
    ChunkSizer,
    Compression,
    KiB,
    MiB,
)
from tensorwire.checkpoints.receiver import CheckpointReceiver
from tensorwire.checkpoints.upload import upload_checkpoint, upload_requests
from tensorwire.errors import DataLossError
from tensorwire.serving import modelrepo
from tensorwire.serving.models import build_model
from tensorwire.transfer.v1 import transfer_pb2 as pb
from tensorwire.transfer.v1 import transfer_pb2_grpc as pb_grpc
from tests.conftest import serving
from tests.support.echo_service import reset_peak_rss, running, status_kib


class TransferApp:
    """The transfer service alone, as the inference service registers it."""

    service_names = (SERVICE_NAME,)

    def __init__(self, repo: Path) -> None:
        self.receiver = CheckpointReceiver(repo)

    def register(self, server: grpc.aio.Server) -> None:
        ModelTransferServicer(self.receiver).register(server)

    async def drain(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


@contextlib.asynccontextmanager
async def transfer_server(repo: Path) -> AsyncIterator[tuple[TransferApp, grpc.aio.Channel]]:
    app = TransferApp(repo)
    async with serving(app, "transfer") as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield app, channel


def _spiral_checkpoint(path: Path) -> Path:
    """A real spiral model's weights, widened so the file spans many 16 KiB chunks."""
    torch.manual_seed(0)
    model = build_model("spiral")
    state = dict(model.state_dict())
    state["extra.weight"] = torch.randn(256, 256)
    torch.save(state, path)
    return path


def _leftovers(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) if repo.exists() else []


def test_chunk_encoding_numbers_checksums_and_compresses_only_when_it_pays() -> None:
    enc = ChunkEncoder(ChunkConfig())
    text = b"loss 0.125 acc 0.97\n" * 4000  # 80 KB, compresses well
    noise = os.urandom(64 * KiB)  # incompressible
    small = b"a" * 1024  # <= 1 KiB: never compressed, even though it would pay
    chunks = [enc.encode(text), enc.encode(noise), enc.encode(small)]
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [c.offset for c in chunks] == [0, len(text), len(text) + len(noise)]
    assert [c.compression for c in chunks] == [Compression.ZSTD, Compression.NONE, Compression.NONE]
    assert len(chunks[0].data) < len(text) * 0.1
    assert chunks[1].data is noise and chunks[2].data is small
    assert [c.crc32 for c in chunks] == [zlib.crc32(b) for b in (text, noise, small)]
    assert enc.crc32 == zlib.crc32(text + noise + small)
    gz = ChunkEncoder(ChunkConfig(compression=Compression.GZIP)).encode(text)
    assert gz.compression is Compression.GZIP and len(gz.data) < len(text) * 0.1

    # Incompressible stretches stop costing CPU: after 4 misses only every 16th
    # chunk is tried, and compression resumes once it pays again.
    probing = ChunkEncoder(ChunkConfig())
    noisy = [probing.encode(os.urandom(4 * KiB)) for _ in range(32)]
    assert all(c.compression is Compression.NONE for c in noisy)
    assert probing.compress_attempts == 5  # chunks 0-3, then the probe at chunk 16
    again = [probing.encode(text), probing.encode(text)]  # chunk 32 is a probe: it pays
    assert [c.compression for c in again] == [Compression.ZSTD, Compression.ZSTD]
    assert probing.compress_attempts == 7


def test_chunk_decoding_verifies_order_and_checksums() -> None:
    payload = os.urandom(200 * KiB) + b"\0" * (300 * KiB)
    enc = ChunkEncoder(ChunkConfig())
    chunks = [enc.encode(payload[i:i + 64 * KiB]) for i in range(0, len(payload), 64 * KiB)]
    dec = ChunkDecoder()
    assert b"".join(dec.decode(c) for c in chunks) == payload
    dec.finish(total_bytes=len(payload), crc32=zlib.crc32(payload), chunks=len(chunks))

    with pytest.raises(DataLossError, match="chunk 1 arrived where chunk 0 was expected"):
        ChunkDecoder().decode(chunks[1])
    bad = Chunk(0, 0, b"X" + chunks[0].data[1:], chunks[0].compression, chunks[0].raw_size, chunks[0].crc32)
    with pytest.raises(DataLossError, match="chunk 0 .byte 0. fails its CRC32 check"):
        ChunkDecoder().decode(bad)
    squashed = chunks[5]  # zeros: zstd-compressed
    assert squashed.compression is Compression.ZSTD
    broken = Chunk(0, 0, squashed.data[:-3], squashed.compression, squashed.raw_size, squashed.crc32)
    with pytest.raises(DataLossError, match="does not decompress"):
        ChunkDecoder().decode(broken)
    short = ChunkDecoder()
    short.decode(chunks[0])
    with pytest.raises(DataLossError, match="payload incomplete"):
        short.finish(total_bytes=len(payload), crc32=zlib.crc32(payload), chunks=len(chunks))


def test_chunk_size_adapts_to_measured_throughput() -> None:
    now = [0.0]
    sizer = ChunkSizer(ChunkConfig(), clock=lambda: now[0])
    assert sizer.size == 64 * KiB
    sizer.record(0)
    for _ in range(20):  # 100 MB/s: 20 ms of link time is 2 MB -> the 1 MiB cap
        now[0] += 0.1
        sizer.record(10 * MiB)
    assert sizer.size == 1 * MiB
    for _ in range(40):  # 200 kB/s (a slow link): the 16 KiB floor
        now[0] += 0.1
        sizer.record(20 * KiB)
    assert sizer.size == 16 * KiB
    for _ in range(40):  # 10 MB/s -> ~200 KB -> 256 KiB
        now[0] += 0.1
        sizer.record(1_000_000)
    assert sizer.size == 256 * KiB
    fixed = ChunkSizer(ChunkConfig(adaptive=False), clock=lambda: now[0])
    for _ in range(5):
        now[0] += 0.1
        fixed.record(10 * MiB)
    assert fixed.size == 64 * KiB and fixed.throughput_bps is not None


async def test_backpressure_bounds_what_the_reader_runs_ahead() -> None:
    size = 8 * MiB
    source = io.BytesIO(os.urandom(size))
    config = ChunkConfig(buffer_bytes=256 * KiB, adaptive=False)
    sender = ChunkSender(source, config)
    chunks = sender.chunks()
    consumed = 0
    first = await anext(chunks)
    consumed += first.raw_size
    for _ in range(1000):  # the reader fills the buffer, then must wait
        if sender.metrics.backpressure_events:
            break
        await asyncio.sleep(0.001)
    assert sender.metrics.backpressure_events >= 1
    ahead = source.tell() - consumed
    assert ahead <= config.buffer_bytes + config.chunk_bytes, ahead
    async for chunk in chunks:  # a slow reader, one chunk per loop turn
        consumed += chunk.raw_size
        assert source.tell() - consumed <= config.buffer_bytes + config.chunk_bytes
        await asyncio.sleep(0)
    assert consumed == size and sender.finished
    assert sender.peak_buffered_bytes <= config.buffer_bytes
    assert sender.crc32 == zlib.crc32(source.getvalue())


@pytest.mark.parametrize("compression", [Compression.ZSTD, Compression.GZIP])
async def test_compression_enabled(compression: Compression, tmp_path: Path) -> None:
    sparse = {f"layer{i}": torch.zeros(256, 256) for i in range(8)}  # 2 MB of zeros
    sparse["layer0"][0, :10] = torch.arange(10.0)
    path = tmp_path / "sparse.pt"
    torch.save(sparse, path)
    async with transfer_server(tmp_path / "repo") as (_app, channel):
        result = await upload_checkpoint(
            channel, path, model="sparse", kind="spiral", config=ChunkConfig(compression=compression)
        )
    assert result.version == 1 and result.bytes == path.stat().st_size
    assert result.wire_bytes < result.bytes * 0.2  # zeros compress far beyond 20 %
    installed = modelrepo.weights_path(tmp_path / "repo", "sparse", 1)
    assert installed.read_bytes() == path.read_bytes()
    assert torch.equal(modelrepo.load_state_dict(installed)["layer0"], sparse["layer0"])


async def test_compression_disabled_and_incompressible_payloads_go_raw(tmp_path: Path) -> None:
    noisy = tmp_path / "noisy.pt"
    torch.manual_seed(1)
    torch.save({"w": torch.randn(512, 512)}, noisy)  # random floats: zstd saves < 20 %
    async with transfer_server(tmp_path / "repo") as (_app, channel):
        off = await upload_checkpoint(channel, noisy, model="m", kind="spiral",
                                      config=ChunkConfig(compression=Compression.NONE))
        on = await upload_checkpoint(channel, noisy, model="m", kind="spiral")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await upload_checkpoint(channel, noisy, model="m", kind="spiral", version=2)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert err.value.details() == "model 'm' already has version 2"
    assert off.wire_bytes == off.bytes
    # compression was tried on every chunk and (but for pickle/zip headers) did not pay
    assert on.bytes * 0.99 < on.wire_bytes <= on.bytes
    assert (off.version, on.version) == (1, 2)
    assert modelrepo.list_versions(tmp_path / "repo", "m") == [1, 2]


async def test_corrupted_transfer_is_data_loss_and_installs_nothing(tmp_path: Path) -> None:
    ckpt = _spiral_checkpoint(tmp_path / "spiral.pt")
    repo = tmp_path / "repo"

    async def corrupted() -> AsyncIterator[pb.UploadModelRequest]:
        async for request in upload_requests(ckpt, model="spiral", kind="spiral",
                                             config=ChunkConfig(chunk_bytes=16 * KiB, adaptive=False)):
            if request.WhichOneof("part") == "chunk" and request.chunk.index == 1:
                data = bytearray(request.chunk.data)
                data[100] ^= 0xFF  # one bit flip in transit
                request.chunk.data = bytes(data)
                yield request
                # Nothing after it: a message still being written when the server's
                # refusal arrives fails in grpc's client core, which then reports its own
                # INTERNAL ("Failed execute_batch") instead of the server's status (CI,
                # once). The refusal is what this test is about.
                await asyncio.Event().wait()
            yield request

    async with transfer_server(repo) as (app, channel):
        stub = pb_grpc.ModelTransferServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UploadModel(corrupted(), timeout=30)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        assert "chunk 1" in err.value.details() and "CRC32" in err.value.details()
        assert app.receiver.refused == 1
    assert _leftovers(repo) == []


async def test_stream_interruption_is_aborted_and_installs_nothing(tmp_path: Path) -> None:
    ckpt = _spiral_checkpoint(tmp_path / "spiral.pt")
    repo = tmp_path / "repo"
    modelrepo.write_version(repo, "spiral", "spiral", torch.load(ckpt, weights_only=True))
    before = _leftovers(repo)

    async def cut_short() -> AsyncIterator[pb.UploadModelRequest]:
        async for request in upload_requests(ckpt, model="spiral", kind="spiral",
                                             config=ChunkConfig(chunk_bytes=16 * KiB, adaptive=False)):
            if request.WhichOneof("part") == "trailer":
                return  # the sender goes away before finishing
            yield request

    gate = asyncio.Event()

    async def stalls() -> AsyncIterator[pb.UploadModelRequest]:
        async for request in upload_requests(ckpt, model="spiral", kind="spiral",
                                             config=ChunkConfig(chunk_bytes=16 * KiB, adaptive=False)):
            if request.WhichOneof("part") == "chunk" and request.chunk.index == 2:
                gate.set()
                await asyncio.Event().wait()  # never finishes: the caller cancels
            yield request

    async with transfer_server(repo) as (app, channel):
        stub = pb_grpc.ModelTransferServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UploadModel(cut_short(), timeout=30)
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert "without its trailer; nothing installed" in err.value.details()

        call = stub.UploadModel(stalls(), timeout=30)
        await asyncio.wait_for(gate.wait(), 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(1000):  # the server notices the cancellation and cleans up
            if app.receiver.refused == 2:
                break
            await asyncio.sleep(0.005)
        assert app.receiver.refused == 2
    assert _leftovers(repo) == before
    assert modelrepo.list_versions(repo, "spiral") == [1]


@pytest.mark.slow
async def test_large_checkpoint_100mb_with_bounded_memory(tmp_path: Path) -> None:
    """A 100 MB checkpoint goes from this process to a receiver process over a real
    gRPC stream; neither process's peak RSS grows by 32 MB."""
    ckpt = tmp_path / "big.pt"
    torch.manual_seed(2)
    torch.save({f"w{i}": torch.randn(1024, 1024) for i in range(25)}, ckpt)  # 25 x 4 MiB
    size = ckpt.stat().st_size
    assert size > 100 * 1000 * 1000
    repo = tmp_path / "repo"
    with running("--repository", str(repo)) as (port, pid):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await upload_checkpoint(channel, _spiral_checkpoint(tmp_path / "warm.pt"),
                                    model="warm", kind="spiral")  # warm up both ends
            base_sender, base_receiver = status_kib("self", "VmRSS"), status_kib(pid, "VmRSS")
            reset_peak_rss("self")
            reset_peak_rss(pid)
            result = await upload_checkpoint(channel, ckpt, model="big", kind="spiral", timeout_s=240)
            sender_mib = (status_kib("self", "VmHWM") - base_sender) / 1024
            receiver_mib = (status_kib(pid, "VmHWM") - base_receiver) / 1024
    assert result.bytes == size and result.chunks > 0
    installed = modelrepo.weights_path(repo, "big", 1)
    assert installed.stat().st_size == size
    with open(ckpt, "rb") as a, open(installed, "rb") as b:
        crc_a = crc_b = 0
        while block := a.read(4 * MiB):
            crc_a = zlib.crc32(block, crc_a)
        while block := b.read(4 * MiB):
            crc_b = zlib.crc32(block, crc_b)
    assert crc_a == crc_b == result.crc32
    assert sender_mib < 32, f"sender peak RSS grew {sender_mib:.1f} MiB"
    assert receiver_mib < 32, f"receiver peak RSS grew {receiver_mib:.1f} MiB"


async def test_receiver_refuses_more_than_announced(tmp_path: Path) -> None:
    sink = io.BytesIO()
    receiver = ChunkReceiver(sink, max_total_bytes=1000)
    enc = ChunkEncoder(ChunkConfig())
    await receiver.feed(enc.encode(b"a" * 600))
    with pytest.raises(DataLossError, match="exceeds its announced size of 1000"):
        await receiver.feed(enc.encode(b"b" * 600))
