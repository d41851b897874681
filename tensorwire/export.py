"""A trained ``nn.Module`` as a Triton model folder that inference serves without its class.

``export_model`` writes ``<folder>/<name>/config.pbtxt`` and
``<folder>/<name>/<version>/model.pt2`` (``platform: "torch_export"``, a
``torch.export`` ExportedProgram with a dynamic batch dimension), or, when
torch.export cannot capture the model, ``model.pt`` (``platform:
"pytorch_libtorch"``, TorchScript by tracing with the example inputs). The config
says which in its ``parameters`` (``exported_with``) and lists the inputs and
outputs (names: the ExportedProgram's own input names, or Triton's ``INPUT__i``
for TorchScript; outputs ``OUTPUT__i``), with ``max_batch_size`` when the batch
dimension is dynamic. ``push`` uploads the model file to inference's
``ModelTransferService`` (chunked, checksummed: :mod:`tensorwire.checkpoints`)
with the platform as its kind and the config.pbtxt in the upload's header.

torch is imported here, not by ``tensorwire`` itself: only scripts that export
load it (they have it already).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorwire.rpc.auth import ClientSecurity
from tensorwire.serving import modelrepo

MAX_BATCH_SIZE = 64
"""max_batch_size written for a model exported with a dynamic batch dimension."""

_TRITON_TYPES = {
    "torch.float32": "TYPE_FP32", "torch.float16": "TYPE_FP16", "torch.float64": "TYPE_FP64",
    "torch.int64": "TYPE_INT64", "torch.int32": "TYPE_INT32", "torch.int16": "TYPE_INT16",
    "torch.int8": "TYPE_INT8", "torch.uint8": "TYPE_UINT8", "torch.bool": "TYPE_BOOL",
}


@dataclass
class ExportedModel:
    """What ``export_model`` wrote."""

    name: str
    platform: str
    """``torch_export`` or ``pytorch_libtorch``."""
    exported_with: str
    """``torch.export`` or ``torch.jit.trace``."""
    folder: Path
    """``<repository>/<name>``."""
    version: int
    file: Path
    config_text: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    max_batch_size: int = 0
    pushed_version: int | None = None
    """The version inference installed (None: not pushed)."""


def check_model_name(name: str) -> str:
    return modelrepo.check_name(name)


def default_directory() -> Path:
    """Where checkpoints are exported when the script names no folder."""
    return Path(os.environ.get("TENSORWIRE_EXPORT_DIR", "tensorwire-models"))


def detached(inputs: Any) -> tuple[Any, ...]:
    """Example inputs as a tuple of detached copies (a tensor, or a tuple/list of them)."""
    items = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return tuple(t.detach().clone() if hasattr(t, "detach") else t for t in items)


def _next_version(folder: Path) -> int:
    versions = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()] if folder.is_dir() else []
    return max(versions, default=0) + 1


def _tensor_entry(kind: str, name: str, tensor: Any, batched: bool) -> str:
    dims = list(tensor.shape[1:] if batched else tensor.shape)
    dtype = _TRITON_TYPES.get(str(tensor.dtype))
    if dtype is None:
        raise ValueError(f"{kind} {name!r} has dtype {tensor.dtype}, which Triton configs cannot name")
    return f'{kind} {{\n  name: "{name}"\n  data_type: {dtype}\n  dims: {dims}\n}}\n'


def _export_program(module: Any, inputs: tuple[Any, ...]) -> tuple[Any, bool]:
    """torch.export with a dynamic batch dim (static when the model needs one)."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        dynamic = tuple({0: batch} if getattr(t, "ndim", 0) else None for t in inputs)
        return torch.export.export(module, inputs, dynamic_shapes=dynamic), True
    except Exception:
        return torch.export.export(module, inputs), False


def export_model(module: Any, inputs: tuple[Any, ...], repository: Path, name: str) -> ExportedModel:
    """Write ``module`` as the next version of ``<repository>/<name>`` (see the module doc)."""
    import torch

    check_model_name(name)
    module = module.eval()
    with torch.no_grad():
        outputs = module(*inputs)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    folder = Path(repository) / name
    version = _next_version(folder)
    staging = folder / f".{version}.tmp"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        program, batched = _export_program(module, inputs)
        platform, exported_with, file_name = "torch_export", "torch.export", "model.pt2"
        input_names = list(program.graph_signature.user_inputs)
        torch.export.save(program, str(staging / file_name))
    except Exception as export_error:
        try:
            traced = torch.jit.trace(module, inputs)
        except Exception as trace_error:
            shutil.rmtree(staging, ignore_errors=True)
            raise ValueError(
                f"cannot export model {name!r}: torch.export failed ({export_error}) and "
                f"TorchScript tracing failed ({trace_error})"
            ) from trace_error
        platform, exported_with, file_name = "pytorch_libtorch", "torch.jit.trace", "model.pt"
        input_names = [f"INPUT__{i}" for i in range(len(inputs))]
        batched = True  # a trace runs any batch size its operations allow
        traced.save(str(staging / file_name))
    output_names = [f"OUTPUT__{i}" for i in range(len(outputs))]
    batched = batched and all(getattr(t, "ndim", 0) >= 1 for t in (*inputs, *outputs))
    max_batch = MAX_BATCH_SIZE if batched else 0
    text = f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch}\n'
    text += "".join(_tensor_entry("input", n, t, batched) for n, t in zip(input_names, inputs))
    text += "".join(_tensor_entry("output", n, t, batched) for n, t in zip(output_names, outputs))
    text += f'parameters {{\n  key: "exported_with"\n  value {{ string_value: "{exported_with}" }}\n}}\n'
    tmp_config = folder / ".config.pbtxt.tmp"
    tmp_config.write_text(text, encoding="utf-8")
    os.replace(staging, folder / str(version))
    os.replace(tmp_config, folder / "config.pbtxt")
    return ExportedModel(name, platform, exported_with, folder, version, folder / str(version) / file_name,
                         text, input_names, output_names, max_batch)


def load_exported(exported: ExportedModel) -> Any:
    """The exported model as a callable (what inference would load), for checks."""
    import torch

    if exported.platform == "torch_export":
        return torch.export.load(str(exported.file)).module()
    return torch.jit.load(str(exported.file))


async def push(exported: ExportedModel, target: str, *, security: ClientSecurity | None = None,
               timeout_s: float = 300.0) -> int:
    """Upload the exported model file and its config.pbtxt to the inference service at
    ``target`` (so a TorchScript model, which has no signature to auto-complete from, is
    served too, and the served config says ``exported_with``), then load it there
    (``RepositoryModelLoad``, as the trainer announces its checkpoints: served now, not
    at inference's next repository poll, and a model that cannot load raises here);
    returns the version it installed."""
    from tensorwire.calls.channels import ChannelPool
    from tensorwire.checkpoints.upload import upload_checkpoint
    from tensorwire.inference import grpc_service_pb2 as ipb
    from tensorwire.inference import grpc_service_pb2_grpc as ipb_grpc

    pool = ChannelPool(target, min_size=1, max_size=1, name=f"checkpoint {target}", security=security)
    try:
        async with pool.acquire() as channel:
            result = await upload_checkpoint(channel, exported.file, model=exported.name,
                                             kind=exported.platform, timeout_s=timeout_s,
                                             triton_config=exported.config_text)
            await ipb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
                ipb.RepositoryModelLoadRequest(model_name=exported.name), timeout=timeout_s)
        return result.version
    finally:
        await pool.aclose()
