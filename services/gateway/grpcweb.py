"""The gRPC-Web wire format, as plain functions (no I/O), after grpc/grpc's PROTOCOL-WEB.

A gRPC-Web body is a sequence of frames: one flag byte (0x00 = message, 0x80 =
trailers), a 4-byte big-endian length, the payload. Trailers travel as the last
frame, an HTTP/1-style header block (``grpc-status:0\\r\\n``). In text mode
(``application/grpc-web-text``) the body is base64: the request may be a
concatenation of padded base64 chunks, and each response frame is encoded on its
own (padded), so it can be flushed to the browser the moment it arrives.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

from tensorwire.errors import InvalidArgumentError

MESSAGE_FLAG = 0x00
TRAILER_FLAG = 0x80
COMPRESSED_FLAG = 0x01
_HEADER = struct.Struct(">BI")

GRPC_WEB = "application/grpc-web"
GRPC_WEB_TEXT = "application/grpc-web-text"


@dataclass(frozen=True)
class Mode:
    """How one request is encoded, taken from its Content-Type."""

    text: bool
    """Base64 (``grpc-web-text``) rather than binary."""
    content_type: str
    """The Content-Type to answer with (the request's own, ``+proto`` spelled out)."""


def parse_content_type(value: str | None) -> Mode | None:
    """The mode of a gRPC-Web Content-Type, or None if it is not gRPC-Web with protobuf."""
    if not value:
        return None
    base = value.split(";", 1)[0].strip().lower()
    for prefix, text in ((GRPC_WEB_TEXT, True), (GRPC_WEB, False)):
        if base == prefix or base == prefix + "+proto":
            return Mode(text=text, content_type=prefix + "+proto")
    return None


def decode_text(body: bytes) -> bytes:
    """Decode a text-mode body: base64, possibly several padded chunks back to back."""
    data = b"".join(body.split())  # line breaks are allowed in base64 bodies
    if len(data) % 4:
        raise InvalidArgumentError(
            f"grpc-web-text body is not valid base64: length {len(data)} is not a multiple of 4"
        )
    try:
        if b"=" not in data[:-2]:
            return base64.b64decode(data, validate=True)
        # Padded chunks back to back: decode each 4-character group on its own.
        return b"".join(base64.b64decode(data[i : i + 4], validate=True) for i in range(0, len(data), 4))
    except binascii.Error as exc:
        raise InvalidArgumentError(f"grpc-web-text body is not valid base64: {exc}") from None


def frame(payload: bytes, flag: int = MESSAGE_FLAG) -> bytes:
    return _HEADER.pack(flag, len(payload)) + payload


def iter_frames(body: bytes) -> Iterable[tuple[int, bytes]]:
    """The (flag, payload) frames of a binary body; a truncated body is an error."""
    offset = 0
    while offset < len(body):
        if len(body) - offset < _HEADER.size:
            raise InvalidArgumentError(
                f"gRPC-Web body ends inside a frame header ({len(body) - offset} of 5 bytes)"
            )
        flag, length = _HEADER.unpack_from(body, offset)
        offset += _HEADER.size
        if len(body) - offset < length:
            raise InvalidArgumentError(
                f"gRPC-Web frame announces {length} bytes but only {len(body) - offset} follow"
            )
        yield flag, body[offset : offset + length]
        offset += length


def single_message(body: bytes) -> bytes:
    """The one request message of a unary or server-streaming call."""
    messages = []
    for flag, payload in iter_frames(body):
        if flag & TRAILER_FLAG:
            continue  # clients may end with an empty trailer frame
        if flag & COMPRESSED_FLAG:
            raise InvalidArgumentError(
                "compressed gRPC-Web request messages are not supported (send grpc-encoding identity)"
            )
        messages.append(payload)
    if len(messages) != 1:
        raise InvalidArgumentError(
            f"a gRPC-Web request carries exactly one message, this one has {len(messages)}"
        )
    return messages[0]


def encode_grpc_message(message: str) -> str:
    """Percent-encode grpc-message as the gRPC spec asks (printable ASCII except %)."""
    return quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


def trailer_block(code: int, message: str, metadata: Iterable[tuple[str, str]] = ()) -> bytes:
    lines = [f"grpc-status:{code}"]
    if message:
        lines.append(f"grpc-message:{encode_grpc_message(message)}")
    lines += [f"{key}:{value}" for key, value in metadata]
    return ("\r\n".join(lines) + "\r\n").encode("latin-1", "replace")


def encode_out(data: bytes, mode: Mode) -> bytes:
    """Bytes as they go on the wire in ``mode`` (one padded base64 chunk in text mode)."""
    return base64.b64encode(data) if mode.text else data


_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str | None) -> float | None:
    """Seconds of a ``grpc-timeout`` header (``1500m``), None when absent."""
    if not value:
        return None
    value = value.strip()
    unit, digits = value[-1:], value[:-1]
    if unit not in _TIMEOUT_UNITS or not digits.isdigit() or len(digits) > 8:
        raise InvalidArgumentError(
            f"grpc-timeout must be 1 to 8 digits and a unit of H M S m u n, got {value!r}"
        )
    return int(digits) * _TIMEOUT_UNITS[unit]


# Request headers that are HTTP or gRPC-Web plumbing, never call metadata.
_NOT_METADATA = frozenset(
    {
        "host", "connection", "keep-alive", "content-type", "content-length", "accept",
        "accept-encoding", "accept-language", "user-agent", "origin", "referer", "cookie",
        "te", "trailer", "transfer-encoding", "upgrade", "x-grpc-web", "x-user-agent",
        "grpc-timeout", "grpc-encoding", "grpc-accept-encoding", "pragma", "cache-control",
        "priority", "dnt",
    }
)


def request_metadata(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str | bytes], ...]:
    """Call metadata from the browser's request headers (``-bin`` values decoded)."""
    out: list[tuple[str, str | bytes]] = []
    for raw_key, value in headers:
        key = raw_key.lower()
        if key in _NOT_METADATA or key.startswith(("sec-", "access-control-", ":", "grpc-")):
            continue
        if key.endswith("-bin"):
            try:
                out.append((key, base64.b64decode(value + "=" * (-len(value) % 4))))
            except binascii.Error:
                raise InvalidArgumentError(f"header {key} is not valid base64") from None
        elif not value.isascii() or not value.isprintable():
            raise InvalidArgumentError(
                f"header {key} has characters gRPC metadata cannot carry (only printable "
                "ASCII; binary values go in a header ending in -bin, base64-encoded)"
            )
        else:
            out.append((key, value))
    return tuple(out)


def response_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[tuple[str, str]]:
    """gRPC metadata as HTTP header pairs (``-bin`` values base64-encoded)."""
    out: list[tuple[str, str]] = []
    for key, value in metadata or ():
        if key.startswith(":") or key in ("content-type", "grpc-status", "grpc-message"):
            continue
        if isinstance(value, bytes):
            out.append((key, base64.b64encode(value).decode("ascii")))
        else:
            out.append((key, value))
    return out
