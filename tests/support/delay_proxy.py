"""A TCP proxy that delays every byte by a fixed time in each direction (netem is not
available here): with ``--delay-ms 150`` a connection through it has 300 ms more RTT.

Each direction is a delay line: a reader stamps each chunk with its arrival time, a
writer sends it ``delay`` later, in order. Bandwidth is not its business: throttle
what leaves ``--listen``'s port with htb (tests/support/netns.py) as for a server.

``python -m tests.support.delay_proxy --listen 54153 --target 127.0.0.1:54152 --delay-ms 150``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def feed() -> None:
        while chunk := await reader.read(65536):
            line.put_nowait((time.monotonic() + delay_s, chunk))
        line.put_nowait((time.monotonic() + delay_s, b""))

    feeder = asyncio.create_task(feed())
    try:
        while True:
            due, chunk = await line.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not chunk:
                break
            writer.write(chunk)
            await writer.drain()
    finally:
        feeder.cancel()
        with contextlib.suppress(Exception):
            writer.close()


async def serve(listen_port: int, target: str, delay_s: float) -> None:
    host, port = target.rsplit(":", 1)

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, up_w, delay_s), _pipe(up_r, client_w, delay_s),
                             return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    print(f"delaying 127.0.0.1:{listen_port} -> {target} by {delay_s * 1000:.0f} ms each way", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--delay-ms", type=float, default=150.0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.target, args.delay_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
