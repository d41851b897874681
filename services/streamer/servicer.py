"""StreamerService: protobuf <-> UpdateHub."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from tensorwire.streamer.v1 import streamer_pb2 as pb
from tensorwire.streamer.v1 import streamer_pb2_grpc as pb_grpc

from .hub import UpdateHub


class StreamerServicer(pb_grpc.StreamerServiceServicer):
    def __init__(self, hub: UpdateHub) -> None:
        self._hub = hub

    async def Subscribe(self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Frame]:
        async for now, status in self._hub.status_frames(request.run_id):
            yield pb.Frame(step=status.step, sent_at=now, status=status)
