"""Views as packed arrays (the browser's contract), and the generic views any model can show.

A view is a ``tensorwire.common.v1.View``: ``kind`` (what the browser draws),
``name`` (which of a run's views it is, when a run has several), ``step`` and
``produced_at`` (the training step it shows), ``arrays`` (packed, see
:mod:`tensorwire.data.arrays`), ``meta`` (plain numbers) and ``labels`` (row names).
Arrays are row-major; "F16" and "U8q" (uint8 quantized, decode as
``offset + scale * byte``) decode to floats, "U8" is plain bytes.

The five demo tasks' views are in ``services/trainer/views.py``. The generic
kinds, built from plain tensors or arrays (no torch import needed here):

``histograms`` (``tensorwire.track.Run.watch``)
    - ``weights`` U8q [L, B]: each layer's weight histogram, as fractions of its
      elements per bin; ``weight_ranges`` F16 [L, 2]: (lo, hi) of its bins.
    - ``grads`` U8q [L, B] and ``grad_ranges`` F16 [L, 2]: the same for the
      gradients (zeros and (0, 0) where a layer has none yet).
    - labels: the layers' parameter names; meta: ``bins``.

``images``
    - ``images`` U8 [N, H, W, C]: C is 1 (grey) or 3 (RGB); floats are scaled
      from their min..max to 0..255.
    - meta: ``columns`` of the grid.

``scatter``
    - ``points`` U8q [N, 2]: (x, y); ``labels`` U8 [N] (optional): a class per point.

``series``
    - ``values`` F16 [S, T]: S lines of T points (x = index); labels: line names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.data import arrays
from tensorwire.errors import InvalidArgumentError

F16, U8, U8Q = "F16", "U8", "U8q"
_DTYPES = {F16: cpb.DTYPE_F16, U8: cpb.DTYPE_U8, U8Q: cpb.DTYPE_U8}

GENERIC_KINDS = ("histograms", "images", "scatter", "series")
HISTOGRAM_BINS = 32
MAX_IMAGES = 64
MAX_POINTS = 20_000


def make_view(
    kind: str,
    fields: Sequence[tuple[str, np.ndarray | cpb.Array, str]],
    meta: Mapping[str, float] | None = None,
    *,
    codec: int = cpb.CODEC_DEFLATE,
    name: str = "",
    labels: Iterable[str] = (),
) -> cpb.View:
    """A View of ``kind`` from (name, values, "F16" | "U8" | "U8q") triples.

    ``values`` may also be an Array from :func:`encoded` (data that never changes,
    such as a task's dataset, encoded once instead of in every view).
    ``step`` and ``produced_at`` are filled in by the caller, who knows which
    weight snapshot the view was built from.
    """
    view = cpb.View(kind=kind, name=name, labels=list(labels))
    for field_name, values, how in fields:
        if isinstance(values, cpb.Array):
            if (values.name, values.dtype, values.codec) != (field_name, _DTYPES[how], codec):
                raise InvalidArgumentError(
                    f"array {values.name!r} (dtype {values.dtype}, codec {values.codec}) given as "
                    f"{field_name!r} {how} with codec {codec}"
                )
            view.arrays.append(values)
        else:
            view.arrays.append(encoded(field_name, values, how, codec))
    for key, value in (meta or {}).items():
        view.meta[key] = float(value)
    return view


def encoded(name: str, values: Any, how: str, codec: int = cpb.CODEC_DEFLATE) -> cpb.Array:
    """``values`` packed once as :func:`make_view` would, for views that send the same
    data every time (cold, a spiral view spent ~0.1-0.2 ms of its ~1 ms re-encoding
    its 1,000 fixed points and labels)."""
    values = np.asarray(values)
    if how == U8:
        values = values.astype(np.uint8)
    return arrays.encode(name, values, _DTYPES[how], codec)


def to_numpy(value: Any) -> np.ndarray:
    """A tensor (any device, with or without grad) or array-like as a numpy array."""
    if hasattr(value, "detach"):
        value = value.detach()
        if getattr(value, "device", None) is not None and value.device.type != "cpu":
            value = value.cpu()
        if str(getattr(value, "dtype", "")) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _histogram(values: np.ndarray, bins: int) -> tuple[np.ndarray, tuple[float, float]]:
    flat = values.astype(np.float32, copy=False).ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return np.zeros(bins, np.float32), (0.0, 0.0)
    lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        hi = lo + max(1e-6, abs(lo) * 1e-3)
    counts, _ = np.histogram(flat, bins=bins, range=(lo, hi))
    return (counts / flat.size).astype(np.float32), (lo, hi)


def histograms(
    layers: Sequence[tuple[str, Any, Any]], *, bins: int = HISTOGRAM_BINS, name: str = "weights"
) -> cpb.View:
    """Weight and gradient histograms of (parameter name, weights, grad or None) rows."""
    rows = len(layers)
    weights = np.zeros((rows, bins), np.float32)
    grads = np.zeros((rows, bins), np.float32)
    weight_ranges = np.zeros((rows, 2), np.float32)
    grad_ranges = np.zeros((rows, 2), np.float32)
    for i, (_, weight, grad) in enumerate(layers):
        weights[i], weight_ranges[i] = _histogram(to_numpy(weight), bins)
        if grad is not None:
            grads[i], grad_ranges[i] = _histogram(to_numpy(grad), bins)
    return make_view(
        "histograms",
        [("weights", weights, U8Q), ("weight_ranges", weight_ranges, F16),
         ("grads", grads, U8Q), ("grad_ranges", grad_ranges, F16)],
        {"bins": bins}, name=name, labels=[layer for layer, _, _ in layers],
    )


def images(batch: Any, *, name: str = "images", max_images: int = MAX_IMAGES) -> cpb.View:
    """An image grid from [N, H, W], [N, C, H, W] or [N, H, W, C] (C 1 or 3), uint8 or float."""
    data = to_numpy(batch)
    if data.ndim == 2:
        data = data[None]
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise ValueError(f"an image grid needs [N, H, W] or [N, C, H, W] values, got shape {data.shape}")
    if data.shape[1] in (1, 3) and data.shape[-1] not in (1, 3):
        data = data.transpose(0, 2, 3, 1)
    if data.shape[-1] not in (1, 3):
        raise ValueError(f"images need 1 or 3 channels, got shape {data.shape}")
    data = data[:max_images]
    if data.dtype != np.uint8:
        data = data.astype(np.float32)
        finite = data[np.isfinite(data)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        scaled = (np.nan_to_num(data, nan=lo) - lo) * (255.0 / (hi - lo if hi > lo else 1.0))
        data = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    columns = max(1, math.ceil(math.sqrt(len(data))))
    return make_view("images", [("images", data, U8)], {"columns": columns}, name=name)


def scatter(points: Any, labels: Any = None, *, name: str = "scatter") -> cpb.View:
    """A 2-D scatter (embeddings, ...) of [N, 2] points and optional integer labels [N]."""
    data = to_numpy(points).astype(np.float32)[:MAX_POINTS]
    if data.ndim != 2 or data.shape[1] != 2:
        raise ValueError(f"a scatter needs [N, 2] points, got shape {data.shape}")
    fields: list[tuple[str, np.ndarray, str]] = [("points", data, U8Q)]
    if labels is not None:
        fields.append(("labels", to_numpy(labels).reshape(-1)[: len(data)].astype(np.uint8), U8))
    return make_view("scatter", fields, name=name)


def series(values: Any, names: Sequence[str] = (), *, name: str = "series") -> cpb.View:
    """Lines from [T] or [S, T] values (x = index)."""
    data = to_numpy(values).astype(np.float32)
    if data.ndim == 1:
        data = data[None]
    if data.ndim != 2:
        raise ValueError(f"a series view needs [T] or [S, T] values, got shape {data.shape}")
    return make_view("series", [("values", data, F16)], name=name, labels=names)


def as_view(value: Any, name: str) -> cpb.View:
    """What a view callback returned, as a View named ``name``: a View as it is, or a
    tensor/array by its shape ([T] series, [N, 2] scatter, [N, H, W(, C)] images)."""
    if isinstance(value, cpb.View):
        if not value.name:
            value.name = name
        return value
    data = to_numpy(value)
    if data.ndim == 1:
        return series(data, name=name)
    if data.ndim == 2 and data.shape[1] == 2:
        return scatter(data, name=name)
    if data.ndim in (3, 4):
        return images(data, name=name)
    raise ValueError(
        f"view {name!r}: cannot show values of shape {data.shape}: return a View "
        "(tensorwire.views) or [T], [N, 2], [N, H, W] or [N, C, H, W] values"
    )
