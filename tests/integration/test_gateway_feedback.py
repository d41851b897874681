"""The browser's delivery feedback through the web gateway: Ack is relayed like any unary call."""

from __future__ import annotations

import grpc

from tensorwire.streamer.v1 import streamer_pb2
from tensorwire.trainer.v1 import trainer_pb2
from tests.integration.test_gateway import (
    BINARY,
    STREAMER,
    TRAINER,
    Suite,
    _read_frame,
    framed,
    parse_frames,
    suite,
    trailers,
)

__all__ = ["suite"]  # the fixture, shared with test_gateway.py


async def test_ack_through_the_gateway_reaches_the_streamer(suite: Suite) -> None:
    start = trainer_pb2.StartRunRequest(task="spiral", seed=3).SerializeToString()
    async with suite.http.post(f"{suite.url}{TRAINER}/StartRun", data=framed(start), headers=BINARY) as r:
        run = trainer_pb2.StartRunResponse.FromString(parse_frames(await r.read())[0][1]).run
    request = streamer_pb2.SubscribeRequest(run_id=run.run_id).SerializeToString()
    response = await suite.http.post(f"{suite.url}{STREAMER}/Subscribe", data=framed(request), headers=BINARY)
    buffer = bytearray()
    try:
        frames = []
        while len(frames) < 3:
            flag, payload = await _read_frame(response, buffer)
            assert flag == 0, payload
            frames.append(streamer_pb2.Frame.FromString(payload))
        assert [f.seq for f in frames] == [1, 2, 3] and frames[0].subscription_id
        ack = streamer_pb2.AckRequest(
            subscription_id=frames[0].subscription_id, run_id=run.run_id, seq=3, received_at=1.0,
        ).SerializeToString()
        async with suite.http.post(f"{suite.url}{STREAMER}/Ack", data=framed(ack), headers=BINARY) as r:
            (_, message), (_, block) = parse_frames(await r.read())
        assert trailers(block)["grpc-status"] == "0"
        assert streamer_pb2.AckResponse.FromString(message).server_time > 1e9
        forged = streamer_pb2.AckRequest(subscription_id="forged", seq=1).SerializeToString()
        async with suite.http.post(f"{suite.url}{STREAMER}/Ack", data=framed(forged), headers=BINARY) as r:
            assert r.status == 200
            assert r.headers["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0])
            assert "no subscription 'forged'" in r.headers["grpc-message"]
    finally:
        response.close()
