"""Scalar export for people and scripts: ``GET /api/runs/{run_id}/scalars.csv|json``.

The run's stored history from the trainer (``GetRunScalars``), raw up to
``max_points`` points per series (default and most: 100,000; down-sampled into
min/mean/max buckets beyond that), as CSV (``series,step,value,min,max,first_step``)
or JSON (``{"run_id", "series": {name: {"step", "value", "min", "max", "first_step"}}}``).
A gRPC status becomes the HTTP status a person expects (NOT_FOUND -> 404, ...).
"""

from __future__ import annotations

import csv
import io
import json

import grpc
from aiohttp import web

from tensorwire.data.scalars import from_batch
from tensorwire.trainer.v1 import trainer_pb2 as tpb
from tensorwire.trainer.v1 import trainer_pb2_grpc as tpb_grpc

TRAINER_SERVICE = tpb.DESCRIPTOR.services_by_name["TrainerService"].full_name
MAX_POINTS = 100_000
_HTTP_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
}


def render(run_id: str, batch: object, fmt: str) -> tuple[bytes, str]:
    """The history as (body, content type)."""
    series = from_batch(batch)  # type: ignore[arg-type]
    if fmt == "json":
        doc = {"run_id": run_id, "series": {
            name: {"step": [b.step for b in buckets], "value": [b.mean for b in buckets],
                   "min": [b.lo for b in buckets], "max": [b.hi for b in buckets],
                   "first_step": [b.first_step for b in buckets]}
            for name, buckets in series.items()}}
        return json.dumps(doc).encode(), "application/json"
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["series", "step", "value", "min", "max", "first_step"])
    for name, buckets in series.items():
        for b in buckets:
            writer.writerow([name, b.step, repr(b.mean), repr(b.lo), repr(b.hi), b.first_step])
    return out.getvalue().encode(), "text/csv; charset=utf-8"


def add_routes(app: web.Application, pool_for: object) -> None:
    """``pool_for(service)`` -> the channel pool to that service (or None)."""

    async def export(request: web.Request) -> web.Response:
        run_id, fmt = request.match_info["run_id"], request.match_info["fmt"]
        raw = request.query.get("max_points", str(MAX_POINTS))
        if not raw.isdigit() or not 2 <= int(raw) <= MAX_POINTS:
            return web.Response(status=400, text=f"max_points must be an integer in 2..{MAX_POINTS}, got {raw!r}\n")
        pool = pool_for(TRAINER_SERVICE)  # type: ignore[operator]
        if pool is None:
            return web.Response(status=503, text="this gateway has no trainer target\n")
        # The caller's token goes on, as with every gRPC-Web call: the trainer checks it.
        auth = request.headers.get("Authorization")
        metadata = (("authorization", auth),) if auth and auth.isascii() else None
        try:
            async with pool.acquire() as channel:
                reply = await tpb_grpc.TrainerServiceStub(channel).GetRunScalars(
                    tpb.GetRunScalarsRequest(run_id=run_id, max_points=int(raw)), timeout=30,
                    metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            status = _HTTP_STATUS.get(exc.code(), 502)
            return web.Response(status=status, text=f"{exc.code().name}: {exc.details()}\n")
        body, content_type = render(run_id, reply.scalars, fmt)
        return web.Response(body=body, headers={
            "Content-Type": content_type,
            "Content-Disposition": f'attachment; filename="run-{run_id}-scalars.{fmt}"',
        })

    app.router.add_get(r"/api/runs/{run_id:[A-Za-z0-9_.\-]{1,128}}/scalars.{fmt:csv|json}", export)
