"""One loaded model version: its module behind its own request batcher.

``ModelVersion`` checks a request against the model's config (inputs by name, dtypes,
shapes, batch size, requested outputs), queues it on its batcher, runs the batched
forward in an executor thread (the Python batcher's batches and the native frontend's
alike, ``forward_columns``), keeps Triton's statistics, and drains before it closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorwire.data.tensors import Tensor
from tensorwire.errors import InvalidArgumentError
from tensorwire.serving import admission, modelrepo
from tensorwire.serving.batching import BatchConfig, Batcher
from tensorwire.serving.cache import HitRate, RequestKeys, decode_tensors

from .records import InferRequest, InferResult, tensor_infos
from .stats import Duration, VersionStats


def config_fingerprint(config: dict[str, Any]) -> str:
    """What makes a loaded module reusable: kind, model_args, tensors, file."""
    key = {k: config.get(k) for k in ("kind", "model_args", "inputs", "outputs", "default_model_filename",
                                     "max_batch_size")}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def set_torch_threads(count: int) -> None:
    if count > 0:
        import torch

        torch.set_num_threads(count)


class ModelVersion:
    """One loaded version: its torch module behind a request batcher."""

    def __init__(
        self,
        name: str,
        version: int,
        config: dict[str, Any],
        module: Any,
        executor: concurrent.futures.Executor,
        batch_overrides: dict[str, Any],
        device: str = "cpu",
    ) -> None:
        self.name = name
        self.version = version
        self.config = config
        self.module = module
        self.device = device
        self.inputs = tensor_infos(config["inputs"])
        self.outputs = tensor_infos(config["outputs"])
        self._variable = tuple(-1 in t.dims for t in self.inputs)
        """Per input: has a -1 dim (any size), so its shape check goes dim by dim."""
        self._all_outputs = tuple(range(len(self.outputs)))
        self._version_str = str(version)
        self.max_batch_size = int(config["max_batch_size"])
        self.stats = VersionStats()
        self.response_cache_enabled = modelrepo.response_cache_enabled(config)
        self.cache_keys = RequestKeys(name, version, config_fingerprint(config))
        """Response cache keys: this version's identity, then each request's own bytes."""
        self.cache_hit_rate = HitRate()
        """Whether this version's misses wait for a remote cache's lookup (services/inference/cached.py)."""
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        knobs = {
            "max_batch_size": max(1, self.max_batch_size),
            "max_queue_delay_s": config["max_queue_delay_us"] / 1e6,
            "preferred_batch_sizes": tuple(
                p for p in config.get("preferred_batch_size", []) if p <= max(1, self.max_batch_size)
            ),
            # Triton's instance_group count: that many batches run at once (the
            # instances share one module: torch and onnxruntime sessions are
            # thread-safe for inference).
            "max_concurrent_batches": int(config.get("instance_count", 1)),
        }
        knobs.update(batch_overrides)
        self.batcher: Batcher[list[np.ndarray], list[np.ndarray]] = Batcher(
            self._forward_batch, BatchConfig(**knobs), name=f"{name}:{version}", executor=executor
        )

    def __repr__(self) -> str:
        return f"<ModelVersion {self.name}:{self.version} in_flight={self.in_flight}>"

    def _in_forward_order(self, tensors: Sequence[Tensor]) -> Sequence[Tensor]:
        """The request's tensors in the config's input order; errors name what is wrong."""
        if len(tensors) == len(self.inputs) and all(t.name == s.name for t, s in zip(tensors, self.inputs)):
            return tensors  # the usual case: already in order
        by_name = {t.name: t for t in tensors}
        unknown = sorted(set(by_name) - {t.name for t in self.inputs})
        if unknown:
            raise InvalidArgumentError(
                f"model {self.name!r} has no input {admission.echo(unknown[0])}; its inputs: "
                + ", ".join(t.name for t in self.inputs)
            )
        for spec in self.inputs:
            if spec.name not in by_name:
                raise InvalidArgumentError(f"model {self.name!r} needs input {spec.name!r}; it is missing")
        return [by_name[spec.name] for spec in self.inputs]

    def check(self, request: InferRequest) -> tuple[list[np.ndarray], Sequence[int], int]:
        """Validate inputs against the config: (arrays in forward order, output indexes, rows)."""
        arrays, rows = [], None
        batched = self.max_batch_size > 0
        for spec, variable, tensor in zip(self.inputs, self._variable, self._in_forward_order(request.inputs)):
            if tensor.datatype != spec.datatype:
                raise InvalidArgumentError(
                    f"input {spec.name!r} of model {self.name!r} must be {spec.datatype}, got {tensor.datatype}"
                )
            shape = tensor.array.shape
            if variable:
                inner = shape[1:] if batched else shape
                bad = (batched and not shape) or len(inner) != len(spec.dims) or any(
                    d != -1 and d != s for d, s in zip(spec.dims, inner)
                )
            else:
                bad = (not shape or shape[1:] != spec.dims) if batched else shape != spec.dims
            if bad:
                want = ("B", *spec.dims) if batched else spec.dims
                raise InvalidArgumentError(
                    f"input {spec.name!r} of model {self.name!r} must have shape "
                    f"[{', '.join(str(d) for d in want)}], got {list(shape)}"
                )
            n = shape[0] if batched else 1
            if batched and not 1 <= n <= self.max_batch_size:
                raise InvalidArgumentError(
                    f"input {spec.name!r}: batch of {n} is outside 1..{self.max_batch_size} "
                    f"(max_batch_size of model {self.name!r})"
                )
            if rows is not None and n != rows:
                raise InvalidArgumentError(f"inputs of model {self.name!r} disagree on the batch size")
            rows = n
            arrays.append(tensor.array if batched else tensor.array[None])
        if not request.outputs:
            return arrays, self._all_outputs, rows or 1
        names = [t.name for t in self.outputs]
        indexes = []
        for out in request.outputs:
            if out not in names:
                raise InvalidArgumentError(
                    f"model {self.name!r} has no output {admission.echo(out)}; its outputs: {', '.join(names)}"
                )
            indexes.append(names.index(out))
        return arrays, indexes, rows or 1

    async def infer(self, request: InferRequest) -> InferResult:
        arrays, indexes, rows = self.check(request)
        self.in_flight += 1
        self._idle.clear()
        start = time.perf_counter()
        try:
            outputs = await self.batcher.submit(arrays)
        except Exception:
            self.stats.fail.add(time.perf_counter() - start)
            raise
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
        self.stats.success.add(time.perf_counter() - start)
        self.stats.inference_count += rows
        self.stats.last_inference_ms = int(time.time() * 1000)
        batched = self.max_batch_size > 0
        result = []
        for i in indexes:
            spec, array = self.outputs[i], outputs[i]
            result.append(Tensor(spec.name, spec.datatype, array if batched else array[0]))
        return InferResult(self.name, self._version_str, request.id, result)

    def cached_result(self, request: InferRequest, value: bytes, seconds: float) -> InferResult:
        """The answer to ``request`` from a cache entry (counted as a hit that took
        ``seconds`` so far). Only a request that succeeded was stored, so it was valid.
        Raises ValueError when the entry is not an answer to it (the outputs it asked
        for, in order, in the config's datatypes, one row per input row), as the
        native frontend checks its own hits."""
        outputs = [Tensor(name, datatype, array) for name, datatype, array in decode_tensors(value)]
        rows = request.inputs[0].array.shape[0] if self.max_batch_size > 0 else 1
        wanted = list(request.outputs) or [spec.name for spec in self.outputs]
        datatypes = {spec.name: spec.datatype for spec in self.outputs}
        if [t.name for t in outputs] != wanted or any(
            t.datatype != datatypes[t.name] or (self.max_batch_size > 0 and t.array.shape[:1] != (rows,))
            for t in outputs
        ):
            raise ValueError(f"it answers {[(t.name, t.datatype, list(t.array.shape)) for t in outputs]}")
        stats = self.stats
        stats.inference_count += rows
        stats.last_inference_ms = int(time.time() * 1000)
        stats.success.add(seconds)
        stats.cache_hit.add(seconds)
        return InferResult(self.name, self._version_str, request.id, outputs)

    def _forward_batch(self, items: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Runs in an executor thread: one forward over every item's rows."""
        if len(items) == 1:
            columns = [np.array(a, copy=not a.flags.writeable) for a in items[0]]
        else:
            columns = [np.concatenate([item[i] for item in items]) for i in range(len(self.inputs))]
        outs = self.forward_columns(columns, len(items))
        results: list[list[np.ndarray]] = []
        offset = 0
        for size in (item[0].shape[0] for item in items):
            results.append([o[offset : offset + size] for o in outs])
            offset += size
        return results

    def forward_columns(self, columns: list[np.ndarray], requests: int) -> list[np.ndarray]:
        """One forward over ``columns`` (the rows of ``requests`` requests, each input
        contiguous, in the config's order): the outputs, as numpy arrays; counted in
        the statistics. The Python batcher's batches and the native frontend's alike."""
        import torch

        t0 = time.perf_counter()
        tensors = [torch.from_numpy(c) for c in columns]
        if self.device != "cpu":
            tensors = [t.to(self.device, non_blocking=True) for t in tensors]
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = self.module(*tensors)
        if self.device != "cpu":
            torch.cuda.synchronize(self.device)  # so compute_infer times the kernels, not their launch
        t2 = time.perf_counter()
        outs = [o.numpy() if o.device.type == "cpu" else o.cpu().numpy()
                for o in (out if isinstance(out, (tuple, list)) else (out,))]
        if len(outs) != len(self.outputs):
            raise RuntimeError(
                f"model {self.name!r} returned {len(outs)} outputs, its config lists {len(self.outputs)}"
            )
        t3 = time.perf_counter()
        stats = self.stats
        rows = columns[0].shape[0] if columns else 0
        stats.execution_count += 1
        stats.compute_input.add(t1 - t0, requests)
        stats.compute_infer.add(t2 - t1, requests)
        stats.compute_output.add(t3 - t2, requests)
        stats.batches.setdefault(rows, Duration()).add(t2 - t1)
        return outs

    def record_batch(self, requests: int, rows: int, total_s: float) -> None:
        """Statistics of a batch the native frontend queued and ran (forward_columns
        counted its compute, the batcher its queueing): ``total_s`` summed over its requests."""
        stats = self.stats
        stats.success.add(total_s, requests)
        stats.inference_count += rows
        stats.last_inference_ms = int(time.time() * 1000)

    def record_cache_hits(self, requests: int, rows: int, total_s: float) -> None:
        """Statistics of requests the native frontend answered from the response cache
        (as :meth:`cached_result` counts one): ``total_s`` summed over them."""
        stats = self.stats
        stats.inference_count += rows
        stats.last_inference_ms = int(time.time() * 1000)
        stats.success.add(total_s, requests)
        stats.cache_hit.add(total_s, requests)

    def snapshot_stats(self) -> VersionStats:
        stats = self.stats
        # Triton's convention: the queue count includes cache hits (perf_analyzer finds the
        # version it measures by that count rising); a hit waits in no queue here (0 ns).
        queue = Duration(self.batcher.metrics.requests + stats.cache_hit.count,
                         int(self.batcher.metrics.queue_time_s * 1e9))
        return VersionStats(
            inference_count=stats.inference_count,
            execution_count=stats.execution_count,
            last_inference_ms=stats.last_inference_ms,
            success=Duration(stats.success.count, stats.success.ns),
            fail=Duration(stats.fail.count, stats.fail.ns),
            queue=queue,
            compute_input=Duration(stats.compute_input.count, stats.compute_input.ns),
            compute_infer=Duration(stats.compute_infer.count, stats.compute_infer.ns),
            compute_output=Duration(stats.compute_output.count, stats.compute_output.ns),
            batches={k: Duration(v.count, v.ns) for k, v in stats.batches.items()},
            cache_hit=Duration(stats.cache_hit.count, stats.cache_hit.ns),
            cache_miss=Duration(stats.cache_miss.count, stats.cache_miss.ns),
        )

    async def drain_and_close(self) -> None:
        """Wait for in-flight requests, then stop the batcher."""
        await self._idle.wait()
        await self.batcher.aclose()
