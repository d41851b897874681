"""StreamerService: protobuf <-> UpdateHub.

``Subscribe`` writes frames the hub serialized already (the same bytes for
every subscriber), so the service is registered with a response serializer that
passes bytes through; see :func:`register`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from tensorwire.rpc.rpcnames import method_names, service_name
from tensorwire.streamer.v1 import streamer_pb2 as pb

from .hub import UpdateHub

SERVICE = service_name(pb, "StreamerService")


def _frame_bytes(frame: bytes | pb.Frame) -> bytes:
    return frame if isinstance(frame, bytes) else frame.SerializeToString()


class StreamerServicer:
    def __init__(self, hub: UpdateHub) -> None:
        self._hub = hub

    async def Subscribe(self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext) -> None:
        hub = self._hub
        await hub.prepare(request.run_id)
        sub = hub.subscribe(
            request.run_id, max_fps=request.max_fps, views=request.views,
            accept_codecs=request.accept_codecs, max_points=request.max_points,
            reuse_arrays=request.reuse_arrays, acks=request.acks,
        )
        try:
            async for out in hub.frames(sub):
                data = hub.numbered(sub, out)
                started = time.monotonic()
                try:
                    await context.write(data)  # returns once gRPC took the frame
                except Exception:
                    if context.done():
                        return  # the viewer went away mid-write: nothing to report
                    raise
                hub.record_write(sub, len(data), time.monotonic() - started, out.kind)
        finally:
            hub.unsubscribe(sub)

    async def Ack(self, request: pb.AckRequest, context: grpc.aio.ServicerContext) -> pb.AckResponse:
        reply = self._hub.ack(request.subscription_id, request.run_id, request.seq, request.received_at)
        return pb.AckResponse(
            server_time=reply.server_time, delivery_bytes_per_s=reply.delivery_bytes_per_s,
            in_flight_bytes=reply.in_flight_bytes,
        )

    async def Publish(
        self, requests: AsyncIterator[pb.PublishRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PublishResponse]:
        hub = self._hub
        pub = hub.add_publisher()

        async def consume() -> None:
            async for request in requests:
                hub.publish(request, pub)

        reader = asyncio.create_task(consume())
        try:
            while not hub.closed:
                pub.changed.clear()
                waiter = asyncio.create_task(pub.changed.wait())
                done, _ = await asyncio.wait({reader, waiter}, timeout=1.0,
                                             return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if reader in done:
                    reader.result()  # raises what the reader raised
                    return
                if pub.runs:
                    yield hub.watchers(pub.runs)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            hub.remove_publisher(pub)


def register(servicer: StreamerServicer, server: grpc.aio.Server) -> None:
    handlers = {
        "Subscribe": grpc.unary_stream_rpc_method_handler(
            servicer.Subscribe, request_deserializer=pb.SubscribeRequest.FromString,
            response_serializer=_frame_bytes,
        ),
        "Publish": grpc.stream_stream_rpc_method_handler(
            servicer.Publish, request_deserializer=pb.PublishRequest.FromString,
            response_serializer=pb.PublishResponse.SerializeToString,
        ),
        "Ack": grpc.unary_unary_rpc_method_handler(
            servicer.Ack, request_deserializer=pb.AckRequest.FromString,
            response_serializer=pb.AckResponse.SerializeToString,
        ),
    }
    # Hand-registered (Subscribe sends pre-serialized frames): exactly the proto's methods.
    assert set(handlers) == method_names(pb, "StreamerService"), sorted(handlers)
    generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(SERVICE, handlers)
