"""Model backends: what turns a version folder into something the batcher can call.

Every backend gives a callable taking batch-first torch tensors (one per config
input, in config order) and returning one tensor or a tuple of them (config
output order), so ``ModelVersion`` runs them all alike:

- ``tensorwire`` kinds (config.json): ``tensorwire.serving.models`` built from
  ``model_args``, weights from ``torch.load(weights_only=True)``, then run as frozen
  TorchScript (:func:`_frozen`) when that gives the same answers;
- ``pytorch_libtorch``: a TorchScript file (``torch.jit.load``: a graph and its
  tensors, no pickle);
- ``torch_export``: an ExportedProgram (``torch.export.load``);
- ``onnxruntime_onnx``: an ONNX graph in an onnxruntime session (CPU execution
  provider; CUDA's when the service runs on a CUDA device and it is installed).

``load`` also checks what the file declares against the config (a contradiction
is an error naming the tensor) and runs a warm-up forward on zeros whose outputs
must have the config's shapes, so a model that raises in forward or returns
something else never becomes READY.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tensorwire.data.tensors import NUMPY_DTYPES
from tensorwire.errors import InvalidArgumentError
from tensorwire.serving import modelrepo, tritonconfig
from tensorwire.serving.loader import check_cancelled

Module = Callable[..., Any]
log = logging.getLogger(__name__)

_TORCHSCRIPT = threading.Lock()
"""Held while a module is scripted and frozen: TorchScript's compilation unit is one per
process, and two loader threads scripting at once failed in one of them ("Can't redefine
method: forward on class ... Linear"), which then served eager, 1.5-2x slower."""


def load(root: Path, name: str, version: int, config: dict[str, Any], device: str) -> Module:
    """The ready-to-call model of ``name`` ``version`` (warm-up done); InvalidArgumentError
    naming what is wrong otherwise."""
    platform = config.get("platform")
    if platform is None:
        module = _load_builtin(root, name, version, config, device)
    else:
        path = root / name / str(version) / config["default_model_filename"]
        if not path.is_file():
            raise InvalidArgumentError(f"{path.name} is missing")
        try:
            module = _LOADERS[platform](path, config, device)
        except InvalidArgumentError:
            raise
        except Exception as exc:  # a corrupt or truncated file: the library's own message
            raise InvalidArgumentError(f"cannot load {path.name} as {platform}: {_summary(exc)}") from None
        module = _with_reshape(module, config)
    check_cancelled()  # timed out while loading: no warm-up for a model nobody will use
    warm_up(module, config, device)
    return module


def _summary(exc: BaseException) -> str:
    """One line of an exception (TorchScript puts the cause on the last line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if len(lines) > 1 and "TorchScript" in lines[0] else lines[0]


def _load_builtin(root: Path, name: str, version: int, config: dict[str, Any], device: str) -> Module:
    from tensorwire.serving.models import build_model

    try:
        module = build_model(config["kind"], **config["model_args"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"model {name!r}: cannot build kind {config['kind']!r}: {exc}") from None
    check_cancelled()
    state = modelrepo.load_state_dict(modelrepo.weights_path(root, name, version))
    check_cancelled()
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InvalidArgumentError(f"model {name!r} version {version}: weights do not fit: {exc}") from None
    return _frozen(module.eval().to(device), config, device)


def _frozen(module: Any, config: dict[str, Any], device: str) -> Module:
    """``module`` as frozen TorchScript: one call into libtorch per forward instead of
    one Python call per layer (the demo's spiral MLP: a forward of ~50 us becomes ~15,
    what a small model's batch costs in Python), its weights constants of the graph.
    The same kernels: no numerics-changing folds (``optimize_numerics=False``), and
    the eager module is kept instead when scripting fails or the frozen one answers
    two rows of random inputs differently in any bit. (TorchScript is what Triton's
    PyTorch backend runs; torch marks it deprecated: where a later torch drops it,
    the models simply stay eager.)"""
    import torch

    try:
        with _TORCHSCRIPT, warnings.catch_warnings():  # torch 2.13 marks TorchScript deprecated; gone: eager
            warnings.simplefilter("ignore", DeprecationWarning)
            frozen = torch.jit.freeze(torch.jit.script(module), optimize_numerics=False)
    except Exception as exc:  # not scriptable: eager serves it as it is
        log.info("model %s stays eager (TorchScript: %s)", config.get("kind", "?"), _summary(exc))
        return module
    generator = torch.Generator().manual_seed(0)
    try:
        inputs = []
        for t in config["inputs"]:
            shape = ((2,) if config["max_batch_size"] > 0 else ()) + tuple(1 if d == -1 else d for d in t["dims"])
            dtype = torch.from_numpy(np.zeros(0, dtype=NUMPY_DTYPES[t["datatype"]])).dtype
            values = torch.rand(shape, generator=generator) if dtype.is_floating_point else torch.zeros(shape)
            inputs.append(values.to(dtype=dtype, device=device))
        with torch.inference_mode():
            want, got = module(*inputs), frozen(*inputs)
            for _ in range(2):  # TorchScript's profiling runs: its later calls run the optimized graph
                got = frozen(*inputs)
    except Exception as exc:
        log.info("model %s stays eager (frozen forward: %s)", config.get("kind", "?"), _summary(exc))
        return module
    wants = want if isinstance(want, (tuple, list)) else (want,)
    gots = got if isinstance(got, (tuple, list)) else (got,)
    if len(wants) != len(gots) or not all(isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                                          and a.dtype == b.dtype and torch.equal(a, b)
                                          for a, b in zip(wants, gots)):
        log.info("model %s stays eager (its frozen graph answers differently)", config.get("kind", "?"))
        return module
    return frozen


def _load_torchscript(path: Path, config: dict[str, Any], device: str) -> Module:
    import torch

    module = torch.jit.load(str(path), map_location=device)
    return module.eval()


def _load_export(path: Path, config: dict[str, Any], device: str) -> Module:
    import torch

    _check_signature(config, *tritonconfig.signature("torch_export", path), by_name=False)
    program = torch.export.load(str(path))
    return program.module().to(device)


class OnnxModule:
    """An onnxruntime session behind the torch-tensors-in, tensors-out interface."""

    def __init__(self, session: Any, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        self.session = session
        self.inputs = tuple(inputs)
        self.outputs = list(outputs)

    def __call__(self, *tensors: Any) -> tuple[Any, ...]:
        import torch

        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.inputs, tensors)}
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in self.session.run(self.outputs, feeds))

    def __repr__(self) -> str:
        return f"<OnnxModule {', '.join(self.inputs)} -> {', '.join(self.outputs)}>"


def _load_onnx(path: Path, config: dict[str, Any], device: str) -> Module:
    import onnxruntime

    _check_signature(config, *tritonconfig.signature("onnxruntime_onnx", path), by_name=True)
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))  # type: ignore[arg-type]
    options = onnxruntime.SessionOptions()
    # One forward = one thread (like torch_threads=1): the batcher and the instance
    # count give the parallelism; ORT's own pool would spin on every core.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    return OnnxModule(session, [t["name"] for t in config["inputs"]], [t["name"] for t in config["outputs"]])


_LOADERS: dict[str, Callable[[Path, dict[str, Any], str], Module]] = {
    "pytorch_libtorch": _load_torchscript,
    "torch_export": _load_export,
    "onnxruntime_onnx": _load_onnx,
}


def _model_shape(config: dict[str, Any], tensor: dict[str, Any]) -> list[int]:
    """The shape the model itself sees, batch dim (-1) included when batching."""
    dims = list(tensor.get("reshape", tensor["dims"]))
    return [-1, *dims] if config["max_batch_size"] > 0 else dims


def _check_signature(
    config: dict[str, Any], inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], *, by_name: bool
) -> None:
    """The file's declared tensors agree with the config (-1 on either side: any size)."""
    for group, declared, found in (("input", config["inputs"], inputs), ("output", config["outputs"], outputs)):
        if by_name:
            graph = {t["name"]: t for t in found}
            for t in declared:
                if t["name"] not in graph:
                    raise InvalidArgumentError(
                        f"config {group} {t['name']!r} is not in the model file; it has "
                        + ", ".join(graph)
                    )
            pairs = [(t, graph[t["name"]]) for t in declared]
            if group == "input" and len(declared) != len(found):
                missing = sorted(set(graph) - {t["name"] for t in declared})
                raise InvalidArgumentError(f"the model file also needs input(s) {', '.join(missing)}")
        else:
            if len(declared) != len(found):
                raise InvalidArgumentError(
                    f"the config lists {len(declared)} {group}s, the model file has {len(found)}"
                )
            pairs = list(zip(declared, found))
        for want, have in pairs:
            shape = _model_shape(config, want)
            if want["datatype"] != have["datatype"]:
                raise InvalidArgumentError(
                    f"{group} {want['name']!r} is {want['datatype']} in the config but "
                    f"{have['datatype']} in the model file"
                )
            if len(shape) != len(have["dims"]) or any(
                a != b and a != -1 and b != -1 for a, b in zip(shape, have["dims"])
            ):
                raise InvalidArgumentError(
                    f"{group} {want['name']!r} has shape {shape} by the config (batch dim -1) but "
                    f"{have['dims']} in the model file"
                )


class _Reshaped:
    """Applies Triton's ``reshape``: clients' dims in, the model's shape inside."""

    def __init__(self, module: Module, config: dict[str, Any]) -> None:
        self.module = module
        batched = config["max_batch_size"] > 0
        self.inputs = [t.get("reshape") for t in config["inputs"]]
        self.outputs = [t["dims"] if "reshape" in t else None for t in config["outputs"]]
        self.batched = batched

    def __call__(self, *tensors: Any) -> Any:
        def lead(t: Any) -> tuple[int, ...]:
            return (t.shape[0],) if self.batched else ()

        args = [t if shape is None else t.reshape(*lead(t), *shape) for t, shape in zip(tensors, self.inputs)]
        out = self.module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(
            o if dims is None else o.reshape(*lead(o), *dims) for o, dims in zip(outs, self.outputs)
        )


def _with_reshape(module: Module, config: dict[str, Any]) -> Module:
    if any("reshape" in t for t in (*config["inputs"], *config["outputs"])):
        return _Reshaped(module, config)
    return module


def warm_up(module: Module, config: dict[str, Any], device: str) -> None:
    """One forward on zeros (batch 1, -1 dims as 1); its outputs must fit the config."""
    import torch

    batched = config["max_batch_size"] > 0
    lead = (1,) if batched else ()
    inputs = []
    for t in config["inputs"]:
        shape = lead + tuple(1 if d == -1 else d for d in t["dims"])
        if math.prod(shape) > 1 << 26:
            raise InvalidArgumentError(f"input {t['name']!r} of shape {list(shape)} is too large")
        inputs.append(torch.from_numpy(np.zeros(shape, dtype=NUMPY_DTYPES[t["datatype"]])).to(device))
    try:
        with torch.inference_mode():
            out = module(*inputs)
    except Exception as exc:
        raise InvalidArgumentError(
            f"the warm-up forward raised {type(exc).__name__}: {_summary(exc)}"
        ) from None
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if len(outs) != len(config["outputs"]):
        raise InvalidArgumentError(
            f"the model returned {len(outs)} outputs, its config lists {len(config['outputs'])}"
        )
    for spec, value in zip(config["outputs"], outs):
        if not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(f"output {spec['name']!r} is a {type(value).__name__}, not a tensor")
        got = list(value.shape[1:] if batched else value.shape)
        dims = spec["dims"]
        if len(got) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, got)):
            raise InvalidArgumentError(
                f"output {spec['name']!r} has shape {got} (batch dim excluded), "
                f"its config says {dims}"
            )
        if NUMPY_DTYPES[spec["datatype"]] != value.cpu().numpy().dtype:
            raise InvalidArgumentError(
                f"output {spec['name']!r} is {value.dtype}, its config says {spec['datatype']}"
            )
