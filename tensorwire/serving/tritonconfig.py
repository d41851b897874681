"""Triton's model repository format: ``config.pbtxt`` and auto-completed configs.

A Triton model folder is ``<repo>/<model>/config.pbtxt`` (the protobuf text
format of ``inference.ModelConfig``) and ``<repo>/<model>/<version>/model.pt``
(TorchScript, ``pytorch_libtorch``), ``model.pt2`` (a ``torch.export``
ExportedProgram, ``torch_export``) or ``model.onnx`` (``onnxruntime_onnx``).
This module reads that into the same config dict as ``config.json`` models
(``tensorwire.serving.modelrepo``), so inference's versions, hot swap, traffic split and
pruning treat both alike. The dict's extra keys:

- ``platform``: one of :data:`PLATFORMS` (``kind`` holds the same name);
- ``instance_count``: parallel model instances (``instance_group``, summed);
- ``parameters``: ``parameters`` as ``{key: string_value}``; the parameter
  ``traffic`` (JSON ``{"version": weight}``) sets the A/B split, like
  ``config.json``'s ``traffic``;
- ``response_cache_enabled``: ``response_cache { enable: true }``;
- ``default_model_filename``: the file inside a version folder;
- ``reshape`` in an input/output entry: the shape the model itself takes or
  gives (``dims`` is what clients see).

Read as Triton reads it: a syntax error names its line and column; a field of
Triton's ModelConfig that tensorwire does not implement is refused with its
name, never silently ignored; dims must be >= 1 or -1 (any size). Without a
``config.pbtxt`` (or one without inputs/outputs), inputs, outputs and datatypes
are completed from the ONNX graph or the ExportedProgram's signature, as
Triton's default auto-complete does; TorchScript has no signature to read, so
its config must list them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from tensorwire.errors import InvalidArgumentError
from tensorwire.serving.admission import VersionPolicy

CONFIG_FILE = "config.pbtxt"
PLATFORMS: dict[str, str] = {
    "pytorch_libtorch": "model.pt",
    "torch_export": "model.pt2",
    "onnxruntime_onnx": "model.onnx",
}
"""Platforms served from a Triton repository -> their default model file name."""
BACKENDS: dict[str, str] = {"pytorch": "pytorch_libtorch", "onnxruntime": "onnxruntime_onnx"}
"""Triton ``backend`` names -> platform (``torch_export`` is its own backend name too)."""
_BY_FILE = {file: platform for platform, file in PLATFORMS.items()}
DEFAULT_MAX_BATCH_SIZE = 64
"""Auto-complete's max_batch_size when every tensor's first dim is variable."""

TRITON_FIELDS = frozenset({
    "name", "platform", "backend", "runtime", "version_policy", "max_batch_size", "input",
    "output", "batch_input", "batch_output", "optimization", "dynamic_batching",
    "sequence_batching", "ensemble_scheduling", "instance_group", "default_model_filename",
    "cc_model_filenames", "metric_tags", "parameters", "model_warmup", "model_operations",
    "model_transaction_policy", "model_repository_agents", "response_cache", "model_metrics",
})
"""Every field of Triton's ModelConfig: a missing one is 'not supported', not a typo."""

_TYPES = {
    "TYPE_BOOL": "BOOL", "TYPE_UINT8": "UINT8", "TYPE_UINT16": "UINT16", "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64", "TYPE_INT8": "INT8", "TYPE_INT16": "INT16", "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64", "TYPE_FP16": "FP16", "TYPE_FP32": "FP32", "TYPE_FP64": "FP64",
}
"""Config data types the torch and ONNX backends take (no STRING, no BF16)."""
_ONNX_TYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
}


def datatype_of_type(data_type: str) -> str:
    """``TYPE_FP32`` -> ``FP32`` (the protocol name); InvalidArgumentError if unsupported."""
    return _TYPES[data_type] if data_type in _TYPES else _unsupported_type(data_type)


def _unsupported_type(data_type: str) -> str:
    raise InvalidArgumentError(
        f"data_type {data_type} is not supported by the torch and ONNX backends; "
        f"supported: {', '.join(_TYPES)}"
    )


def parse(text: str, where: str = CONFIG_FILE) -> Any:
    """The ModelConfig in ``text``; a syntax error or unknown field names its line:column."""
    from tensorwire.inference import model_config_pb2 as mc

    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        message = str(exc)
        position = f"{exc.GetLine()}:{exc.GetColumn()}" if exc.GetLine() is not None else ""
        detail = message.split(" : ", 1)[1] if " : " in message else message
        if 'has no field named "' in detail:
            field = detail.split('has no field named "', 1)[1].split('"', 1)[0]
            owner = detail.split('Message type "', 1)[1].split('"', 1)[0] if "Message type" in detail else ""
            if owner == "inference.ModelConfig" and field in TRITON_FIELDS:
                detail = f"field {field!r} of Triton's ModelConfig is not supported by tensorwire"
            else:
                detail = f"{owner or 'the config'} has no field {field!r} (a typo?) or tensorwire does not support it"
        raise InvalidArgumentError(f"{where}:{position}: {detail}") from None


def _dims(where: str, dims: Sequence[int], *, allow_empty: bool = False) -> list[int]:
    out = [int(d) for d in dims]
    if not out and not allow_empty:
        raise InvalidArgumentError(f"{where}: dims is empty")
    for d in out:
        if d == 0 or d < -1:
            raise InvalidArgumentError(f"{where}: dim {d} in {out} is not valid; use >= 1, or -1 for any size")
    return out


def _refuse_set(where: str, message: Any, allowed: set[str]) -> None:
    """A field set in ``message`` that tensorwire does not implement is an error naming it."""
    for field, _ in message.ListFields():
        if field.name not in allowed:
            raise InvalidArgumentError(f"{where}: field {field.name!r} is not supported by tensorwire")


def _tensors(group: str, entries: Any, allowed: set[str], name: str) -> list[dict[str, Any]]:
    tensors, seen = [], set()
    for entry in entries:
        where = f"model {name!r}: {group} {entry.name or '(unnamed)'!r}"
        _refuse_set(where, entry, allowed)
        if not entry.name:
            raise InvalidArgumentError(f"model {name!r}: an {group} has no name")
        if entry.name in seen:
            raise InvalidArgumentError(f"{where} appears twice")
        seen.add(entry.name)
        from tensorwire.inference import model_config_pb2 as mc

        tensor: dict[str, Any] = {
            "name": entry.name,
            "datatype": _datatype(where, mc.DataType.Name(entry.data_type)),
            "dims": _dims(where, entry.dims),
        }
        if entry.HasField("reshape"):
            tensor["reshape"] = _dims(f"{where} reshape", entry.reshape.shape, allow_empty=True)
        tensors.append(tensor)
    return tensors


def _datatype(where: str, data_type: str) -> str:
    try:
        return datatype_of_type(data_type)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{where}: {exc}") from None


def platform_of(config: Any, name: str) -> str:
    """The platform a ModelConfig selects (``platform``, else ``backend``); '' = not given."""
    if config.platform:
        return config.platform
    return BACKENDS.get(config.backend, config.backend)


def to_dict(config: Any, name: str) -> dict[str, Any]:
    """A parsed ModelConfig as the repository's config dict (module docstring)."""
    if config.name and config.name != name:
        raise InvalidArgumentError(f"{CONFIG_FILE} of model {name!r} names it {config.name!r}")
    platform = platform_of(config, name)
    if platform not in PLATFORMS:
        raise InvalidArgumentError(
            f"model {name!r}: platform/backend {platform or '(none)'!r} is not supported; "
            f"tensorwire serves {', '.join(PLATFORMS)} (and its own config.json kinds)"
        )
    _refuse_set(f"model {name!r}", config, {
        "name", "platform", "backend", "version_policy", "max_batch_size", "input", "output",
        "dynamic_batching", "instance_group", "default_model_filename", "parameters", "response_cache",
    })
    if config.max_batch_size < 0:
        raise InvalidArgumentError(f"model {name!r}: max_batch_size must be >= 0, got {config.max_batch_size}")
    batching = config.dynamic_batching
    _refuse_set(f"model {name!r}: dynamic_batching", batching,
                {"preferred_batch_size", "max_queue_delay_microseconds", "preserve_ordering"})
    for size in batching.preferred_batch_size:
        if not 1 <= size <= max(1, config.max_batch_size):
            raise InvalidArgumentError(
                f"model {name!r}: preferred_batch_size {size} is outside 1..max_batch_size "
                f"({config.max_batch_size})"
            )
    count = 0
    for group in config.instance_group:
        where = f"model {name!r}: instance_group {group.name or '(unnamed)'!r}"
        _refuse_set(where, group, {"name", "kind", "count"})
        if group.kind == group.KIND_MODEL:
            raise InvalidArgumentError(f"{where}: kind KIND_MODEL is not supported (KIND_AUTO, KIND_CPU, KIND_GPU are)")
        if group.count < 0:
            raise InvalidArgumentError(f"{where}: count must be >= 1, got {group.count}")
        count += group.count or 1
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    traffic: dict[str, float] = {}
    if "traffic" in parameters:
        try:
            traffic = json.loads(parameters["traffic"])
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"model {name!r}: parameter 'traffic' is not JSON: {exc}") from None
    which = config.version_policy.WhichOneof("policy_choice")
    if which == "all":
        policy = VersionPolicy("all")
    elif which == "specific":
        policy = VersionPolicy("specific", versions=tuple(int(v) for v in config.version_policy.specific.versions))
    else:
        num = config.version_policy.latest.num_versions if which == "latest" else 1
        policy = VersionPolicy("latest", num_versions=int(num))
    tensor_fields = {"name", "data_type", "dims", "reshape"}
    return {
        "name": name,
        "kind": platform,
        "platform": platform,
        "model_args": {},
        "max_batch_size": int(config.max_batch_size),
        "inputs": _tensors("input", config.input, tensor_fields, name),
        "outputs": _tensors("output", config.output, tensor_fields, name),
        "max_queue_delay_us": int(batching.max_queue_delay_microseconds),
        "preferred_batch_size": [int(s) for s in batching.preferred_batch_size],
        "version_policy": policy,
        "traffic": traffic,
        "instance_count": count or 1,
        "parameters": parameters,
        "response_cache_enabled": bool(config.response_cache.enable),
        "default_model_filename": model_filename(config, platform, name),
    }


def model_filename(config: Any, platform: str, name: str) -> str:
    """The model file inside a version folder: ``default_model_filename`` or the
    platform's default. A plain file name only: a config may come over the network
    (an upload's ``triton_config``), and ``../x`` or ``/x`` would write or read the
    model file outside its version folder."""
    file_name = str(config.default_model_filename) or PLATFORMS[platform]
    if (file_name in (".", "..") or "/" in file_name or "\\" in file_name or "\0" in file_name
            or len(file_name.encode()) > 255):
        raise InvalidArgumentError(
            f"model {name!r}: default_model_filename must be a plain file name inside the version "
            f"folder, got {file_name!r}"
        )
    return file_name


MAX_CONFIG_BYTES = 1 << 20
"""Largest config.pbtxt accepted from a sender (an upload's ``triton_config``)."""


def check_sent_config(text: str, name: str, platform: str) -> Any:
    """The parsed ModelConfig of a config.pbtxt sent with a ``platform`` model file for
    model ``name`` (an upload); InvalidArgumentError when it is too large, does not
    parse, names another model or platform, or is not servable (the rules of ``to_dict``)."""
    where = f"the config.pbtxt sent for model {name!r}"
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise InvalidArgumentError(f"{where} is {len(text.encode())} bytes; the limit is {MAX_CONFIG_BYTES}")
    config = parse(text, where)
    if platform_of(config, name) not in ("", platform):
        raise InvalidArgumentError(
            f"{where} says platform {platform_of(config, name)!r}, but the file sent is a {platform!r} model"
        )
    config.platform, config.backend = platform, ""
    cfg = to_dict(config, name)
    if platform == "pytorch_libtorch" and not (cfg["inputs"] and cfg["outputs"]):
        raise InvalidArgumentError(
            f"{where} lists no {'inputs' if not cfg['inputs'] else 'outputs'}; a TorchScript model has "
            "no signature to auto-complete from"
        )
    return config


def read(folder: Path, name: str, newest_version: Path | None) -> dict[str, Any]:
    """The config dict of Triton model folder ``folder``: config.pbtxt, completed from
    the model file in ``newest_version`` where it lists no inputs/outputs."""
    from tensorwire.inference import model_config_pb2 as mc

    path = folder / CONFIG_FILE
    try:
        config = parse(path.read_text(), str(path))
    except FileNotFoundError:
        config = mc.ModelConfig(name=name)
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"{path} is not UTF-8 text") from None
    if not platform_of(config, name) and newest_version is not None:
        for file, platform in _BY_FILE.items():  # like Triton: the file tells the platform
            if (newest_version / file).is_file():
                config.platform = platform
                break
    cfg = to_dict(config, name)
    if not cfg["inputs"] or not cfg["outputs"]:
        if newest_version is None:
            raise InvalidArgumentError(f"model {name!r} lists no inputs/outputs and has no version to read them from")
        complete(cfg, newest_version / cfg["default_model_filename"],
                 explicit_batch=config.max_batch_size > 0 or path.exists())
    return cfg


def complete(cfg: dict[str, Any], model_file: Path, *, explicit_batch: bool = True) -> None:
    """Fill in ``cfg``'s missing inputs/outputs (and max_batch_size) from the model file."""
    platform = cfg["platform"]
    if platform == "pytorch_libtorch":
        raise InvalidArgumentError(
            f"model {cfg['name']!r}: a TorchScript model has no signature to auto-complete from; "
            f"list its input and output tensors in {CONFIG_FILE}"
        )
    inputs, outputs = signature(platform, model_file)
    batchable = all(t["dims"] and t["dims"][0] == -1 for t in (*inputs, *outputs))
    if cfg["max_batch_size"] == 0 and batchable and not explicit_batch:
        cfg["max_batch_size"] = DEFAULT_MAX_BATCH_SIZE
    if cfg["max_batch_size"] > 0:
        if not batchable:
            raise InvalidArgumentError(
                f"model {cfg['name']!r}: max_batch_size {cfg['max_batch_size']} needs a variable first "
                f"dim on every tensor of {model_file.name}"
            )
        inputs = [{**t, "dims": t["dims"][1:]} for t in inputs]
        outputs = [{**t, "dims": t["dims"][1:]} for t in outputs]
    for group, found in (("inputs", inputs), ("outputs", outputs)):
        if not cfg[group]:
            for t in found:
                if not t["dims"]:
                    raise InvalidArgumentError(
                        f"model {cfg['name']!r}: {group[:-1]} {t['name']!r} is a scalar; tensorwire "
                        "serves tensors of rank >= 1 per request"
                    )
            cfg[group] = found


_SIGNATURES: dict[tuple[str, int, int], tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}


def signature(platform: str, model_file: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) of a model file with the batch dim, -1 for symbolic dims.
    Cached by (path, mtime, size): a poll reads the same file once."""
    try:
        stat = os.stat(model_file)
    except FileNotFoundError:
        raise InvalidArgumentError(f"model file {str(model_file)!r} does not exist") from None
    key = (str(model_file), stat.st_mtime_ns, stat.st_size)
    if key not in _SIGNATURES:
        try:
            found = _onnx_signature(model_file) if platform == "onnxruntime_onnx" else _export_signature(model_file)
        except InvalidArgumentError:
            raise
        except Exception as exc:  # a corrupt or truncated file
            raise InvalidArgumentError(f"cannot read {str(model_file)!r} as {platform}: {exc}") from None
        _SIGNATURES[key] = found
    return _SIGNATURES[key]


def _onnx_signature(model_file: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])

    def tensors(args: Any) -> list[dict[str, Any]]:
        out = []
        for arg in args:
            if arg.type not in _ONNX_TYPES:
                raise InvalidArgumentError(f"{model_file.name}: tensor {arg.name!r} has unsupported type {arg.type}")
            dims = [d if isinstance(d, int) and d > 0 else -1 for d in (arg.shape or [])]
            out.append({"name": arg.name, "datatype": _ONNX_TYPES[arg.type], "dims": dims})
        return out

    return tensors(session.get_inputs()), tensors(session.get_outputs())


def _export_signature(model_file: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import torch

    from tensorwire.data.tensors import NUMPY_DTYPES

    program = torch.export.load(str(model_file))
    signature = program.graph_signature
    by_name = {node.name: node for node in program.graph.nodes}
    names = {str(t): n for n, t in NUMPY_DTYPES.items() if n != "BYTES"}

    def spec(node_name: str, public: str) -> dict[str, Any]:
        value = by_name[node_name].meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(f"{model_file.name}: {public!r} is not a tensor")
        dtype = str(torch.empty((), dtype=value.dtype).numpy().dtype)
        if dtype not in names:
            raise InvalidArgumentError(f"{model_file.name}: {public!r} has unsupported dtype {value.dtype}")
        dims = [int(d) if isinstance(d, int) else -1 for d in value.shape]
        return {"name": public, "datatype": names[dtype], "dims": dims}

    inputs = [spec(n, n) for n in signature.user_inputs]
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    results = output_node.args[0]
    user = list(signature.user_outputs)
    outputs = []
    for index, node_name in enumerate(user):
        node = next((r for r in results if getattr(r, "name", None) == node_name), None)
        if node is None:
            raise InvalidArgumentError(f"{model_file.name}: output {index} is not a tensor")
        outputs.append(spec(node.name, f"OUTPUT__{index}"))
    return inputs, outputs


def model_config_of(cfg: Mapping[str, Any]) -> Any:
    """A config dict back as a ModelConfig (what the ModelConfig RPC returns)."""
    from tensorwire.inference import model_config_pb2 as mc

    config = mc.ModelConfig(name=cfg["name"], platform=cfg.get("platform", "pytorch_libtorch"),
                            max_batch_size=int(cfg["max_batch_size"]))
    for group, target in (("inputs", config.input), ("outputs", config.output)):
        for t in cfg[group]:
            entry = target.add(name=t["name"], data_type=mc.DataType.Value(f"TYPE_{t['datatype']}"),
                               dims=t["dims"])
            if "reshape" in t:
                entry.reshape.shape.extend(t["reshape"])
                entry.reshape.SetInParent()
    if int(cfg["max_batch_size"]) > 0:
        config.dynamic_batching.max_queue_delay_microseconds = int(cfg["max_queue_delay_us"])
        config.dynamic_batching.preferred_batch_size.extend(cfg.get("preferred_batch_size", []))
    policy: VersionPolicy = cfg["version_policy"]
    if policy.kind == "latest":
        config.version_policy.latest.num_versions = policy.num_versions
    elif policy.kind == "all":
        config.version_policy.all.SetInParent()
    else:
        config.version_policy.specific.versions.extend(policy.versions)
    config.instance_group.add(count=int(cfg.get("instance_count", 1)), kind=mc.ModelInstanceGroup.KIND_AUTO)
    if "default_model_filename" in cfg:
        config.default_model_filename = cfg["default_model_filename"]
    for key, value in cfg.get("parameters", {}).items():
        config.parameters[key].string_value = value
    if cfg.get("response_cache_enabled"):
        config.response_cache.enable = True
    return config
