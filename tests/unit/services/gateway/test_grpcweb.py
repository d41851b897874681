"""The gRPC-Web wire format of the gateway, without sockets."""

from __future__ import annotations

import base64

import pytest

from services.gateway import grpcweb
from tensorwire.errors import InvalidArgumentError


def test_content_types() -> None:
    binary = grpcweb.parse_content_type("application/grpc-web+proto")
    assert binary == grpcweb.Mode(text=False, content_type="application/grpc-web+proto")
    assert grpcweb.parse_content_type("application/grpc-web") == binary
    text = grpcweb.parse_content_type("application/grpc-web-text; charset=utf-8")
    assert text == grpcweb.Mode(text=True, content_type="application/grpc-web-text+proto")
    assert grpcweb.parse_content_type("application/grpc-web+json") is None
    assert grpcweb.parse_content_type("application/json") is None
    assert grpcweb.parse_content_type(None) is None


def test_single_message_round_trip() -> None:
    body = grpcweb.frame(b"hello")
    assert body == b"\x00\x00\x00\x00\x05hello"
    assert grpcweb.single_message(body) == b"hello"
    assert grpcweb.single_message(grpcweb.frame(b"")) == b""
    # A trailing empty trailer frame is allowed.
    assert grpcweb.single_message(body + grpcweb.frame(b"", grpcweb.TRAILER_FLAG)) == b"hello"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"\x00\x00\x00", "inside a frame header"),
        (b"\x00\x00\x00\x00\x09abc", "announces 9 bytes but only 3 follow"),
        (b"", "exactly one message, this one has 0"),
        (grpcweb.frame(b"a") + grpcweb.frame(b"b"), "exactly one message, this one has 2"),
        (b"\x01\x00\x00\x00\x01x", "compressed"),
    ],
)
def test_bad_bodies_name_the_problem(body: bytes, words: str) -> None:
    with pytest.raises(InvalidArgumentError, match=words):
        grpcweb.single_message(body)


def test_text_bodies_single_and_concatenated_chunks() -> None:
    body = grpcweb.frame(b"payload!")
    assert grpcweb.decode_text(base64.b64encode(body)) == body
    chunks = base64.b64encode(body[:4]) + base64.b64encode(body[4:])  # both padded
    assert b"=" in chunks[:-2]
    assert grpcweb.decode_text(chunks) == body
    assert grpcweb.decode_text(base64.b64encode(body)[:8] + b"\r\n" + base64.b64encode(body)[8:]) == body
    with pytest.raises(InvalidArgumentError, match="not a multiple of 4"):
        grpcweb.decode_text(b"abcde")
    with pytest.raises(InvalidArgumentError, match="not valid base64"):
        grpcweb.decode_text(b"ab!d")


def test_trailers_and_messages() -> None:
    block = grpcweb.trailer_block(5, "run 'x' not found: 100% gone\n", [("x-run", "x")])
    assert block == b"grpc-status:5\r\ngrpc-message:run 'x' not found: 100%25 gone%0A\r\nx-run:x\r\n"
    assert grpcweb.trailer_block(0, "") == b"grpc-status:0\r\n"
    text = grpcweb.Mode(text=True, content_type="")
    assert base64.b64decode(grpcweb.encode_out(b"\x80abc", text)) == b"\x80abc"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), ("", None), ("5S", 5.0), ("1500m", 1.5), ("2M", 120.0), ("1H", 3600.0),
     ("250u", 0.00025), ("7n", 7e-9)],
)
def test_timeouts(value: str | None, seconds: float | None) -> None:
    if seconds is None:
        assert grpcweb.parse_timeout(value) is None
    else:
        assert grpcweb.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5", "S", "-1S", "123456789S", "1.5S", "10x"])
def test_bad_timeouts(value: str) -> None:
    with pytest.raises(InvalidArgumentError, match="grpc-timeout"):
        grpcweb.parse_timeout(value)


def test_metadata_filtering() -> None:
    headers = [
        ("Content-Type", "application/grpc-web+proto"), ("X-Grpc-Web", "1"), ("Origin", "http://a"),
        ("Authorization", "Bearer t"), ("X-Request-Id", "r1"), ("Sec-Fetch-Mode", "cors"),
        ("grpc-timeout", "1S"), ("Trace-Bin", base64.b64encode(b"\x00\x01").decode().rstrip("=")),
    ]
    assert grpcweb.request_metadata(headers) == (
        ("authorization", "Bearer t"), ("x-request-id", "r1"), ("trace-bin", b"\x00\x01"),
    )
    assert grpcweb.response_metadata([("x-a", "1"), ("d-bin", b"\xff"), ("content-type", "x")]) == [
        ("x-a", "1"), ("d-bin", "/w=="),
    ]
