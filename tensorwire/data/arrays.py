"""Packing numpy arrays into ``tensorwire.common.v1.Array``: never floats as text.

An array is reduced in precision first (float16, or uint8 quantized as
``value = offset + scale * byte``), then optionally byte-shuffled (all first
bytes of every element, then all second bytes: float16 exponents line up and
compress far better), then compressed. ``CODEC_DEFLATE`` is zlib's format, which
every browser decodes natively (``DecompressionStream("deflate")``);
``CODEC_ZSTD`` is smaller and faster for Python peers.

Decoding in a browser: inflate ``data`` if ``codec`` is DEFLATE; if
``shuffled``, un-shuffle with element size 2 (F16/U16) or 4 (F32/I32); read
little-endian elements; for ``DTYPE_U8`` map each byte ``b`` to
``offset + scale * b``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import zstandard

from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.errors import DataLossError, InvalidArgumentError

_NUMPY: dict[int, np.dtype[Any]] = {
    cpb.DTYPE_F32: np.dtype("<f4"),
    cpb.DTYPE_F16: np.dtype("<f2"),
    cpb.DTYPE_U8: np.dtype("u1"),
    cpb.DTYPE_I32: np.dtype("<i4"),
    cpb.DTYPE_U16: np.dtype("<u2"),
}
_ZSTD_C = zstandard.ZstdCompressor(level=3)
_ZSTD_D = zstandard.ZstdDecompressor()


def shuffle(raw: bytes, itemsize: int) -> bytes:
    """Group byte 0 of every element, then byte 1, ... (a lossless transpose)."""
    if itemsize == 1:
        return raw
    return np.frombuffer(raw, np.uint8).reshape(-1, itemsize).T.tobytes()


def unshuffle(raw: bytes, itemsize: int) -> bytes:
    if itemsize == 1:
        return raw
    return np.frombuffer(raw, np.uint8).reshape(itemsize, -1).T.tobytes()


def compress(raw: bytes, codec: int) -> bytes:
    if codec == cpb.CODEC_DEFLATE:
        return zlib.compress(raw, 6)
    if codec == cpb.CODEC_ZSTD:
        return _ZSTD_C.compress(raw)
    return raw


def decompress(data: bytes, codec: int) -> bytes:
    try:
        if codec == cpb.CODEC_DEFLATE:
            return zlib.decompress(data)
        if codec == cpb.CODEC_ZSTD:
            return _ZSTD_D.decompress(data)
    except (zlib.error, zstandard.ZstdError) as exc:
        raise DataLossError(f"array data does not decompress ({cpb.Codec.Name(codec)}): {exc}") from None
    return data


def encode(
    name: str,
    values: np.ndarray,
    dtype: int = cpb.DTYPE_F16,
    codec: int = cpb.CODEC_DEFLATE,
    shuffled: bool = True,
) -> cpb.Array:
    """``values`` as a packed Array of ``dtype``, compressed with ``codec``."""
    values = np.asarray(values)
    if dtype not in _NUMPY:
        raise InvalidArgumentError(f"cannot encode array {name!r} as dtype {dtype}")
    scale, offset = 0.0, 0.0
    if dtype == cpb.DTYPE_U8 and values.dtype.kind == "f":
        lo = float(values.min()) if values.size else 0.0
        hi = float(values.max()) if values.size else 0.0
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        offset = lo
        packed = np.rint((values - lo) / scale).clip(0, 255).astype(np.uint8)
    else:
        packed = values.astype(_NUMPY[dtype], copy=False)
    itemsize = _NUMPY[dtype].itemsize
    raw = np.ascontiguousarray(packed).tobytes()
    do_shuffle = shuffled and itemsize > 1
    if do_shuffle:
        raw = shuffle(raw, itemsize)
    return cpb.Array(
        name=name, dtype=dtype, shape=list(values.shape), data=compress(raw, codec),  # type: ignore[arg-type]
        codec=codec, shuffled=do_shuffle, scale=scale, offset=offset,  # type: ignore[arg-type]
    )


def decode(array: cpb.Array) -> np.ndarray:
    """The values of ``array`` (float32 for F16/U8-quantized, else its own type)."""
    if array.dtype not in _NUMPY:
        raise InvalidArgumentError(f"array {array.name!r} has unknown dtype {array.dtype}")
    np_dtype = _NUMPY[array.dtype]
    raw = decompress(array.data, array.codec)
    if array.shuffled:
        raw = unshuffle(raw, np_dtype.itemsize)
    count = int(np.prod(array.shape)) if array.shape else 1
    if len(raw) != count * np_dtype.itemsize:
        raise DataLossError(
            f"array {array.name!r}: {len(raw)} bytes for shape {list(array.shape)} of {np_dtype}"
        )
    values = np.frombuffer(raw, np_dtype).reshape(tuple(array.shape))
    if array.dtype == cpb.DTYPE_U8 and array.scale:
        return (array.offset + array.scale * values.astype(np.float32)).astype(np.float32)
    if array.dtype == cpb.DTYPE_F16:
        return values.astype(np.float32)
    return values


def recode(array: cpb.Array, codec: int) -> cpb.Array:
    """The same array compressed with another codec (bytes otherwise unchanged)."""
    if array.codec == codec:
        return array
    out = cpb.Array()
    out.CopyFrom(array)
    out.data = compress(decompress(array.data, array.codec), codec)
    out.codec = codec  # type: ignore[assignment]  # protobuf enum fields take their int values
    return out


def best_codec(accepted: Iterable[int], preferred: tuple[int, ...] = (cpb.CODEC_ZSTD, cpb.CODEC_DEFLATE)) -> int:
    """The first codec of ``preferred`` a peer accepts, else no compression."""
    accepted = set(accepted)
    for codec in preferred:
        if codec in accepted:
            return codec
    return cpb.CODEC_UNSPECIFIED
