"""Live views: what each task shows, as packed arrays (the browser's contract).

Every view is a ``tensorwire.common.v1.View`` with ``kind``, ``step`` (the training
step whose weights it shows), ``produced_at`` (Unix seconds when the trainer
produced that step), ``arrays`` (packed, see :mod:`tensorwire.data.arrays` for how to
decode) and ``meta`` (plain numbers). Arrays are row-major; "F16" and "U8q"
(uint8 quantized, decode as ``offset + scale * byte``; each array has its own
scale and offset) decode to floats.

``boundary`` (task ``spiral``)
    - ``grid`` U8q [G, G]: P(class 1) over the square [-extent, extent]^2;
      row ``i`` is y = -extent + (i + 0.5) * 2 * extent / G (bottom row first),
      column ``j`` is x likewise.
    - ``points`` U8q [N, 2]: training points (x, y).
    - ``labels`` U8 (not quantized) [N]: class 0 or 1 of each point.
    - meta: ``extent``. (Loss and accuracy come as scalar series.)

``paths`` (task ``trajectory``)
    - ``past`` U8q [K, P, 2]: K objects' last P positions (x, y), oldest first.
    - ``truth`` U8q [K, F, 2]: their true next F positions.
    - ``predicted`` U8q [K, F, 2]: the model's next F positions.
    - meta: ``ade`` (mean displacement error of ``predicted`` vs ``truth``).

``signal`` (task ``anomaly``)
    - ``signal`` U8q [T, C]: a multichannel sensor recording, normalised.
    - ``reconstruction`` U8q [T, C]: the autoencoder's reconstruction of it.
    - ``error`` U8q [T]: reconstruction error per time step.
    - ``flagged`` U8 [T]: 1 where ``error`` > meta ``threshold`` (detected).
    - ``truth`` U8 [T]: 1 where an anomaly was injected.
    - meta: ``threshold``, ``precision``, ``recall``.

``fusion`` (task ``fusion``)
    - ``gps`` U8q [T, 2]: raw noisy position fixes (x, y).
    - ``fused`` U8q [T, 2]: fused position estimates.
    - ``truth`` U8q [T, 2]: true positions.
    - ``fused_velocity`` U8q [T, 2] and ``truth_velocity`` U8q [T, 2]: (vx, vy).
    - meta: ``gps_error``, ``fused_error`` (mean position errors).

``boxes`` (task ``detection``)
    - ``images`` U8q [I, S, S]: grey images in [0, 1], row 0 at the top.
    - ``true_boxes`` F16 [N, 6]: (image index, class, cx, cy, w, h), box
      coordinates as fractions of the image side.
    - ``pred_boxes`` F16 [M, 7]: (image index, class, cx, cy, w, h, score) for
      predictions with score > meta ``threshold``.
    - meta: ``threshold``, ``classes`` (count; 0 square, 1 circle, 2 triangle).
"""

from __future__ import annotations

import numpy as np

from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.data import arrays
from tensorwire.views import F16, U8, U8Q, make_view

VIEW_KINDS = ("boundary", "paths", "signal", "fusion", "boxes")


def boundary(grid: np.ndarray, points: np.ndarray | cpb.Array, labels: np.ndarray | cpb.Array, extent: float,
             **meta: float) -> cpb.View:
    """``points`` and ``labels`` may be encoded once (:func:`tensorwire.views.encoded`)."""
    return make_view(
        "boundary",
        [("grid", grid, U8Q), ("points", points, U8Q), ("labels", labels, U8)],
        {"extent": extent, **meta},
    )


def paths(past: np.ndarray, truth: np.ndarray, predicted: np.ndarray, **meta: float) -> cpb.View:
    return make_view(
        "paths", [("past", past, U8Q), ("truth", truth, U8Q), ("predicted", predicted, U8Q)], meta
    )


def signal(
    values: np.ndarray, reconstruction: np.ndarray, error: np.ndarray, flagged: np.ndarray,
    truth: np.ndarray, **meta: float,
) -> cpb.View:
    return make_view(
        "signal",
        [("signal", values, U8Q), ("reconstruction", reconstruction, U8Q), ("error", error, U8Q),
         ("flagged", flagged, U8), ("truth", truth, U8)],
        meta,
    )


def fusion(
    gps: np.ndarray, fused: np.ndarray, truth: np.ndarray, fused_velocity: np.ndarray,
    truth_velocity: np.ndarray, **meta: float,
) -> cpb.View:
    return make_view(
        "fusion",
        [("gps", gps, U8Q), ("fused", fused, U8Q), ("truth", truth, U8Q),
         ("fused_velocity", fused_velocity, U8Q), ("truth_velocity", truth_velocity, U8Q)],
        meta,
    )


def boxes(images: np.ndarray, true_boxes: np.ndarray, pred_boxes: np.ndarray, **meta: float) -> cpb.View:
    return make_view(
        "boxes",
        [("images", images, U8Q), ("true_boxes", true_boxes.reshape(-1, 6), F16),
         ("pred_boxes", pred_boxes.reshape(-1, 7), F16)],
        meta,
    )


def as_json(view: cpb.View) -> bytes:
    """The same view as JSON with floats as text: the naive encoding, for contrast."""
    import json

    body = {
        "kind": view.kind, "step": view.step, "produced_at": view.produced_at,
        "meta": dict(view.meta),
        "arrays": {a.name: arrays.decode(a).astype(float).tolist() for a in view.arrays},
    }
    return json.dumps(body).encode()
