"""tensorwire.data.arrays: packed arrays, reduced precision, shuffle, codecs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.data import arrays
from tensorwire.errors import DataLossError


@pytest.mark.parametrize("codec", [cpb.CODEC_UNSPECIFIED, cpb.CODEC_DEFLATE, cpb.CODEC_ZSTD])
@pytest.mark.parametrize("shuffled", [False, True])
def test_f16_round_trip(codec: int, shuffled: bool) -> None:
    values = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    packed = arrays.encode("x", values, cpb.DTYPE_F16, codec, shuffled)
    assert list(packed.shape) == [40, 3] and packed.codec == codec
    out = arrays.decode(cpb.Array.FromString(packed.SerializeToString()))
    assert out.dtype == np.float32 and out.shape == (40, 3)
    np.testing.assert_allclose(out, values, rtol=1e-3, atol=1e-3)


def test_u8_quantization_error_is_bounded() -> None:
    values = np.linspace(-2.0, 3.0, 1000, dtype=np.float32).reshape(20, 50)
    packed = arrays.encode("grid", values, cpb.DTYPE_U8)
    out = arrays.decode(packed)
    assert np.max(np.abs(out - values)) <= (5.0 / 255) / 2 + 1e-6
    constant = arrays.decode(arrays.encode("c", np.full(4, 7.0, np.float32), cpb.DTYPE_U8))
    np.testing.assert_allclose(constant, 7.0)


def test_plain_u8_and_ints_are_exact() -> None:
    labels = np.array([0, 1, 1, 0, 255], np.uint8)
    np.testing.assert_array_equal(arrays.decode(arrays.encode("l", labels, cpb.DTYPE_U8)), labels)
    ints = np.arange(-5, 5, dtype=np.int32)
    np.testing.assert_array_equal(arrays.decode(arrays.encode("i", ints, cpb.DTYPE_I32)), ints)


def test_reduced_precision_is_far_smaller_than_json() -> None:
    rng = np.random.default_rng(1)
    smooth = np.cumsum(rng.normal(size=(64, 64)), axis=1).astype(np.float32)
    as_json = len(json.dumps(smooth.astype(float).tolist()))
    f32 = len(arrays.encode("a", smooth, cpb.DTYPE_F32, cpb.CODEC_UNSPECIFIED).data)
    f16 = len(arrays.encode("a", smooth, cpb.DTYPE_F16, cpb.CODEC_ZSTD, shuffled=False).data)
    f16s = len(arrays.encode("a", smooth, cpb.DTYPE_F16, cpb.CODEC_ZSTD, shuffled=True).data)
    u8 = len(arrays.encode("a", smooth, cpb.DTYPE_U8, cpb.CODEC_ZSTD).data)
    assert u8 < f16s < f16 < f32 < as_json
    assert u8 < 0.1 * as_json


def test_recode_and_corruption() -> None:
    packed = arrays.encode("x", np.arange(100, dtype=np.float32), cpb.DTYPE_F16, cpb.CODEC_ZSTD)
    deflated = arrays.recode(packed, cpb.CODEC_DEFLATE)
    np.testing.assert_array_equal(arrays.decode(deflated), arrays.decode(packed))
    broken = cpb.Array()
    broken.CopyFrom(deflated)
    broken.data = b"not deflate"
    with pytest.raises(DataLossError, match="decompress"):
        arrays.decode(broken)
    short = cpb.Array()
    short.CopyFrom(packed)
    short.shape[:] = [101]
    with pytest.raises(DataLossError, match="bytes for shape"):
        arrays.decode(short)


def test_best_codec() -> None:
    assert arrays.best_codec([cpb.CODEC_DEFLATE]) == cpb.CODEC_DEFLATE
    assert arrays.best_codec([cpb.CODEC_DEFLATE, cpb.CODEC_ZSTD]) == cpb.CODEC_ZSTD
    assert arrays.best_codec([]) == cpb.CODEC_UNSPECIFIED
