"""Upload one file with tensorwire.checkpoints and print what the sender saw, as JSON.

    python -m tests.support.upload_client --target 127.0.0.1:PORT --file F [--buffer-bytes N]

Used by the slow-link test, which runs it inside a network namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc

from tensorwire.checkpoints.chunking import ChunkConfig, ChunkSender
from tensorwire.checkpoints.upload import upload_requests
from tensorwire.transfer.v1 import transfer_pb2_grpc as pb_grpc


async def _main(argv: list[str]) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--file", required=True, type=Path)
    parser.add_argument("--buffer-bytes", type=int, default=ChunkConfig().buffer_bytes)
    args = parser.parse_args(argv)
    config = ChunkConfig(buffer_bytes=args.buffer_bytes)
    senders: list[ChunkSender] = []
    sizes: list[int] = []
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = pb_grpc.ModelTransferServiceStub(channel)

        async def requests():  # type: ignore[no-untyped-def]
            async for request in upload_requests(args.file, model="slow", kind="spiral",
                                                 config=config, sender_out=senders):
                if request.WhichOneof("part") == "chunk":
                    sizes.append(request.chunk.raw_size)
                yield request

        started = time.perf_counter()
        reply = await stub.UploadModel(requests(), timeout=120, wait_for_ready=True)
        elapsed = time.perf_counter() - started
    sender = senders[0]
    return {
        "elapsed_s": elapsed,
        "bytes": reply.bytes,
        "version": reply.version,
        "chunks": len(sizes),
        "sizes": sizes,
        "first_chunk_bytes": sizes[0],
        "last_chunk_bytes": sizes[-2] if len(sizes) > 1 else sizes[0],
        "final_size_bytes": sender.sizer.size,
        "throughput_bps": sender.sizer.throughput_bps,
        "backpressure_events": sender.metrics.backpressure_events,
        "peak_buffered_bytes": sender.peak_buffered_bytes,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_main(sys.argv[1:]))), flush=True)
