"""HTTP/REST Open Inference Protocol (KServe v2, Triton's HTTP API) over the same core.

Routes (``{m}`` a model, ``[/versions/{v}]`` optional)::

    GET  /v2/health/live | /v2/health/ready          200 = true, 400 = false
    GET  /v2                                          server metadata
    GET  /v2/models/{m}[/versions/{v}]                model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready          200 = ready, 400 = not
    GET  /v2/models/{m}[/versions/{v}]/config         ModelConfig as JSON
    GET  /v2/models[/{m}[/versions/{v}]]/stats        statistics
    POST /v2/models/{m}[/versions/{v}]/infer          inference (JSON, or JSON + binary)
    POST /v2/repository/index                         repository index
    POST /v2/repository/models/{m}/load | /unload     load / unload

``infer`` takes JSON tensors (``data`` a flat or nested row-major list) and
Triton's binary tensor data extension: the JSON header is the first
``Inference-Header-Content-Length`` bytes of the body, followed by each input
whose ``parameters.binary_data_size`` is set, in order. Outputs go back binary
when asked (``parameters.binary_data`` per output, or the request parameter
``binary_data_output``) and always for FP16, which JSON cannot carry.

Requests go to the same ``ModelRepository`` (same batcher, same checks) as
gRPC. Domain errors become statuses here, in one middleware: invalid -> 400,
missing -> 404, loading/draining -> 503, queue full -> 429, deadline -> 504,
anything else -> 500 with a generic message (traceback in the log); a body over
the message limit -> 413; every error body is ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web
from google.protobuf import json_format

from tensorwire.data.tensors import NUMPY_DTYPES, Tensor, check_shape, encode_raw, raw_to_array
from tensorwire.errors import InvalidArgumentError, TensorwireError
from tensorwire.rpc import metrics
from tensorwire.rpc.auth import Authorizer
from tensorwire.rpc.server import PortInUseError
from tensorwire.rpc.tls import ServerTls
from tensorwire.serving import admission, tritonconfig
from tensorwire.serving.admission import echo

from .records import InferRequest, InferResult
from .repository import ModelRepository
from .server_state import ServerState
from .stats import VersionStats

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "UNIMPLEMENTED": 501,
    "ABORTED": 409,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
}
_JSON_INTS = frozenset(
    {
        "dims",
        "shape",
        "versions",
        "max_queue_delay_microseconds",
        "num_versions",
    }
)
"""ModelConfig int64 fields: JSON numbers, as Triton writes them (protobuf's JSON uses strings)."""

MAX_BODY = web.AppKey("max_body_bytes", int)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place where errors become HTTP statuses and ``{"error": ...}`` bodies;
    every request is counted and timed like an RPC (method ``HTTP <verb> <route>``,
    code the HTTP status)."""
    start = time.perf_counter()
    response = await _answer(request, handler)
    info = request.match_info
    route = info.route.resource.canonical if info.route.resource is not None else "unmatched"
    method = f"HTTP {request.method} {route}"
    metrics.RPC_HANDLED.labels("inference", method, str(response.status)).inc()
    metrics.RPC_LATENCY.labels("inference", method).observe(time.perf_counter() - start)
    return response


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except TensorwireError as exc:
        return error(_STATUS.get(exc.code.name, 500), str(exc) or exc.code.name)
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"request body is over the limit of {request.app[MAX_BODY]} bytes (--max-message-mb)")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error(500, f"internal error in {request.method} {request.path}; see the server log")


def _ints(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _ints(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v, key) for v in value]
    if key in _JSON_INTS and isinstance(value, str):
        return int(value)
    return value


def _duration(d: Any) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def _stats_json(name: str, version: int, s: VersionStats) -> dict[str, Any]:
    return {
        "name": name,
        "version": str(version),
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": _duration(s.success),
            "fail": _duration(s.fail),
            "queue": _duration(s.queue),
            "compute_input": _duration(s.compute_input),
            "compute_infer": _duration(s.compute_infer),
            "compute_output": _duration(s.compute_output),
        },
        "batch_stats": [{"batch_size": size, "compute_infer": _duration(d)} for size, d in sorted(s.batches.items())],
    }


async def _json_body(request: web.Request) -> Any:
    body = await request.read()
    if not body:
        return {}
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"request body is not valid JSON: {exc}") from None


def _flatten(name: str, data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise InvalidArgumentError(f"input {echo(name)}: 'data' must be a list, got {type(data).__name__}")
    if data and isinstance(data[0], list):
        flat: list[Any] = []
        stack = [data]
        while stack:  # row-major, iteratively: a deeply nested hostile list cannot recurse
            item = stack.pop()
            if isinstance(item, list):
                stack.extend(reversed(item))
            else:
                flat.append(item)
        return flat
    return data


def _json_array(name: str, datatype: str, data: Any, shape: tuple[int, ...]) -> np.ndarray:
    values = _flatten(name, data)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgumentError(
            f"input {echo(name)}: {len(values)} values in 'data' but shape {list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = [v.encode() if isinstance(v, str) else v for v in values]
        if any(not isinstance(v, bytes) for v in array):
            raise InvalidArgumentError(f"input {echo(name)}: BYTES data must be strings")
        return array
    kinds = {"BOOL": (bool,), "FP16": (int, float), "FP32": (int, float), "FP64": (int, float)}
    allowed = kinds.get(datatype, (int,))
    for v in values:
        if not isinstance(v, allowed) or (isinstance(v, bool) and datatype != "BOOL"):
            raise InvalidArgumentError(f"input {echo(name)}: value {echo(v)} is not a {datatype}")
    try:
        return np.array(values, dtype=NUMPY_DTYPES[datatype])
    except (OverflowError, ValueError):
        raise InvalidArgumentError(f"input {echo(name)}: a value does not fit {datatype}") from None


def decode_infer(
    body: bytes, header_length: str | None, model: str, version: str
) -> tuple[InferRequest, bool, set[str]]:
    """(the core request, whether every output goes back binary, outputs asked binary)."""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise InvalidArgumentError(f"{HEADER_LENGTH} must be an integer, got {echo(header_length)}") from None
        if not 0 <= size <= len(body):
            raise InvalidArgumentError(f"{HEADER_LENGTH} {size} is outside the body's {len(body)} bytes")
        header, binary = body[:size], memoryview(body)[size:]
    else:
        header, binary = body, memoryview(b"")
    try:
        doc = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"the inference request header is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise InvalidArgumentError("an inference request is a JSON object with an 'inputs' list")
    tensors, offset, seen = [], 0, set()
    for spec in doc["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidArgumentError("every input needs a 'name'")
        name = spec["name"]
        if name in seen:
            raise InvalidArgumentError(f"input {echo(name)} appears twice in the request")
        seen.add(name)
        datatype = spec.get("datatype")
        if datatype not in NUMPY_DTYPES:
            raise InvalidArgumentError(
                f"input {echo(name)} has unknown datatype {echo(datatype)}; known: {', '.join(NUMPY_DTYPES)}"
            )
        raw_shape = spec.get("shape")
        if not isinstance(raw_shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in raw_shape
        ):
            raise InvalidArgumentError(f"input {echo(name)}: 'shape' must be a list of integers")
        shape = check_shape(name, raw_shape)
        parameters = spec.get("parameters") or {}
        if "binary_data_size" in parameters:
            length = parameters["binary_data_size"]
            if not isinstance(length, int) or length < 0 or offset + length > len(binary):
                raise InvalidArgumentError(
                    f"input {echo(name)}: binary_data_size {echo(length)} runs past the {len(binary)} bytes "
                    "of binary data"
                )
            array = raw_to_array(name, datatype, bytes(binary[offset : offset + length]), shape)
            offset += length
        elif "data" in spec:
            if datatype == "FP16":
                raise InvalidArgumentError(f"input {echo(name)}: FP16 travels as binary data only")
            array = _json_array(name, datatype, spec["data"], shape)
        else:
            raise InvalidArgumentError(f"input {echo(name)} has neither 'data' nor binary_data_size")
        try:
            tensors.append(Tensor(name, datatype, array.reshape(shape)))
        except ValueError as exc:
            raise InvalidArgumentError(f"input {echo(name)}: shape {list(shape)} is unusable: {exc}") from None
    if offset != len(binary):
        raise InvalidArgumentError(f"{len(binary) - offset} bytes of binary data belong to no input")
    params = doc.get("parameters") or {}
    all_binary = bool(params.get("binary_data_output", False))
    outputs, binary_outputs = [], set()
    for out in doc.get("outputs") or []:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidArgumentError("every requested output needs a 'name'")
        out_params = out.get("parameters") or {}
        if out_params.get("classification"):
            raise InvalidArgumentError(f"output {echo(out['name'])}: the classification extension is not supported")
        if out_params.get("binary_data", all_binary):
            binary_outputs.add(out["name"])
        outputs.append(out["name"])
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgumentError("'id' must be a string")
    return InferRequest(model, version, request_id, tensors, tuple(outputs)), all_binary, binary_outputs


def encode_infer(result: InferResult, all_binary: bool, binary_outputs: set[str]) -> web.Response:
    outputs, blobs = [], []
    for tensor in result.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.array.shape)}
        if all_binary or tensor.name in binary_outputs or tensor.datatype == "FP16":
            blob = encode_raw(tensor.array, tensor.datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif tensor.datatype == "BYTES":
            entry["data"] = [
                b.decode(errors="replace") if isinstance(b, bytes) else str(b) for b in tensor.array.reshape(-1)
            ]
        else:
            entry["data"] = tensor.array.reshape(-1).tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": result.model, "model_version": result.version, "outputs": outputs}
    if result.id:
        doc["id"] = result.id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return web.Response(body=header, content_type="application/json")
    return web.Response(
        body=b"".join((header, *blobs)),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


_SERVICE = "inference.GRPCInferenceService"
_ROUTE_METHODS = {
    "live": "ServerLive",
    "ready": "ServerReady",
    "server_metadata": "ServerMetadata",
    "model_metadata": "ModelMetadata",
    "model_ready": "ModelReady",
    "model_config": "ModelConfig",
    "stats": "ModelStatistics",
    "infer": "ModelInfer",
    "index": "RepositoryIndex",
    "load": "RepositoryModelLoad",
    "unload": "RepositoryModelUnload",
}
"""Handler name -> the gRPC method whose role the route needs (one role table for both)."""


class InferenceHttp:
    """The aiohttp application of the HTTP endpoint; handlers are protocol adapters only."""

    def __init__(
        self, state: ServerState, repository: ModelRepository, max_body_bytes: int, authorizer: Authorizer | None = None
    ) -> None:
        self._state = state
        self._repo = repository
        self.max_body_bytes = max_body_bytes
        self._authorizer = authorizer
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[errors, self._authorize])
        self.app[MAX_BODY] = max_body_bytes
        get, post = web.get, web.post
        model = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        routes = [
            get("/v2/health/live", self.live),
            get("/v2/health/ready", self.ready),
            get("/v2", self.server_metadata),
            get("/v2/models/stats", self.stats),
            post("/v2/repository/index", self.index),
            post("/v2/repository/models/{model}/load", self.load),
            post("/v2/repository/models/{model}/unload", self.unload),
        ]
        for base in (model, versioned):
            routes += [
                get(base, self.model_metadata),
                get(base + "/ready", self.model_ready),
                get(base + "/config", self.model_config),
                get(base + "/stats", self.stats),
                post(base + "/infer", self.infer),
            ]
        self.app.add_routes(routes)

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Each route needs the role of the gRPC method it mirrors (tensorwire.rpc.auth)."""
        if self._authorizer is not None and self._authorizer.enabled:
            method = _ROUTE_METHODS.get(getattr(handler, "__name__", ""))
            if method is not None:  # unmatched routes answer 404 on their own
                self._authorizer.check(
                    f"/{_SERVICE}/{method}", (("authorization", request.headers.get("Authorization", "")),)
                )
        return await handler(request)

    @staticmethod
    def _target(request: web.Request) -> tuple[str, str]:
        return request.match_info.get("model", ""), request.match_info.get("version", "")

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._state.live else 400)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._state.ready and self._repo.ready else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        meta = self._state.metadata()
        return web.json_response({"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)})

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = self._target(request)
        await self._repo.load_on_demand(name)  # a lazy model: loaded first
        info = self._repo.info(name, version)
        batch = [-1] if info.max_batch_size > 0 else []

        def tensors(specs: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": batch + list(t.dims)} for t in specs]

        return web.json_response(
            {
                "name": info.name,
                "versions": [str(v) for v in info.versions],
                "platform": info.platform,
                "inputs": tensors(info.inputs),
                "outputs": tensors(info.outputs),
            }
        )

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = self._target(request)
        await self._repo.load_on_demand(name, wait_for_boot=False)
        return web.Response(status=200 if self._repo.model_ready(name, version) else 400)

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = self._target(request)
        await self._repo.load_on_demand(name)
        config = tritonconfig.model_config_of(self._repo.info(name, version).config)
        doc = json_format.MessageToDict(config, preserving_proto_field_name=True)
        return web.json_response(_ints(doc))

    async def stats(self, request: web.Request) -> web.Response:
        rows = self._repo.statistics(*self._target(request))
        return web.json_response({"model_stats": [_stats_json(*row) for row in rows]})

    async def infer(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body_bytes, actual_size=request.content_length)
        body = await request.read()
        infer_request, all_binary, binary = decode_infer(
            body, request.headers.get(HEADER_LENGTH), *self._target(request)
        )
        return encode_infer(await self._repo.infer(infer_request), all_binary, binary)

    async def index(self, request: web.Request) -> web.Response:
        doc = await _json_body(request)
        ready = bool(doc.get("ready", False)) if isinstance(doc, dict) else False
        return web.json_response(
            [
                {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
                for e in self._repo.index(ready)
            ]
        )

    async def load(self, request: web.Request) -> web.Response:
        doc = await _json_body(request)
        params = (doc.get("parameters") or {}) if isinstance(doc, dict) else {}
        if not isinstance(params, dict):
            raise InvalidArgumentError(f"'parameters' must be a JSON object, got {admission.echo(params)}")
        override = admission.parse_override(params["config"]) if "config" in params else None
        await self._repo.load_model(request.match_info["model"], override)
        return web.json_response({})

    async def unload(self, request: web.Request) -> web.Response:
        await self._repo.unload_model(request.match_info["model"])
        return web.json_response({})


class HttpEndpoint:
    """Runs an :class:`InferenceHttp` on a port; ``start`` returns the bound port."""

    def __init__(
        self, http: InferenceHttp, host: str, port: int, *, reuse_port: bool = False, tls: ServerTls | None = None
    ) -> None:
        self.http, self.host, self.port = http, host, port
        self.reuse_port = reuse_port
        self.tls = tls
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        self._runner = web.AppRunner(self.http.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.host,
            self.port,
            reuse_port=self.reuse_port or None,
            ssl_context=self.tls.ssl_context() if self.tls is not None else None,
        )
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise PortInUseError(
                f"inference HTTP: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}; "
                "choose another with --http-port (-1 turns it off)"
            ) from None
        server = site._server  # aiohttp exposes the bound port only through the server's sockets
        sockets = getattr(server, "sockets", None) or ()
        self.port = int(sockets[0].getsockname()[1]) if sockets else self.port
        log.info("inference HTTP/REST on %s:%d", self.host, self.port)
        return self.port

    async def aclose(self, grace_s: float = 5.0) -> None:
        if self._runner is not None:
            await self._runner.shutdown()
            await self._runner.cleanup()
            self._runner = None
