"""tensorwire.serving.tritonconfig: config.pbtxt read as Triton reads it, refusals named."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorwire.errors import InvalidArgumentError
from tensorwire.serving import modelrepo, tritonconfig
from tests.support import triton_models as tm

FULL = """
name: "m"
backend: "onnxruntime"
max_batch_size: 16
input [ { name: "x" data_type: TYPE_FP32 dims: [ 2, 2 ] reshape: { shape: [ 4 ] } } ]
output [ { name: "y" data_type: TYPE_INT64 dims: [ -1 ] } ]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 250 }
version_policy: { specific: { versions: [ 1, 3 ] } }
instance_group [ { count: 2 kind: KIND_CPU }, { kind: KIND_AUTO } ]
parameters { key: "traffic" value: { string_value: "{\\"1\\": 3, \\"3\\": 1}" } }
response_cache { enable: true }
"""


def test_every_supported_field_is_read() -> None:
    cfg = tritonconfig.to_dict(tritonconfig.parse(FULL), "m")
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["default_model_filename"] == "model.onnx"
    assert cfg["inputs"] == [{"name": "x", "datatype": "FP32", "dims": [2, 2], "reshape": [4]}]
    assert cfg["outputs"] == [{"name": "y", "datatype": "INT64", "dims": [-1]}]
    assert cfg["max_batch_size"] == 16 and cfg["max_queue_delay_us"] == 250
    assert cfg["preferred_batch_size"] == [4, 8]
    assert cfg["version_policy"].to_json() == {"specific": {"versions": [1, 3]}}
    assert cfg["instance_count"] == 3
    assert cfg["traffic"] == {"1": 3, "3": 1}
    assert cfg["response_cache_enabled"] is True
    # ... and written back as the ModelConfig RPC returns it.
    back = tritonconfig.model_config_of(cfg)
    assert back.input[0].reshape.shape == [4] and back.response_cache.enable
    assert back.parameters["traffic"].string_value.startswith("{")


@pytest.mark.parametrize(("text", "fragments"), [
    ('name: "m"\nplatform: "onnxruntime_onnx"\ninput [ { name: x }', ("config.pbtxt:3:17",)),
    ('name: "m"\n\n  optimization { }', ("config.pbtxt:3:3", "'optimization'", "Triton's ModelConfig")),
    ('name: "m"\nmax_batch_sise: 3', ("config.pbtxt:2:1", "'max_batch_sise'", "typo")),
])
def test_syntax_errors_and_unknown_fields_name_line_and_column(text: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        tritonconfig.parse(text, "config.pbtxt")
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize(("extra", "fragment"), [
    ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 0 ] } ]', "dim 0 in [0] is not valid"),
    ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 3, -4 ] } ]', "dim -4 in [3, -4]"),
    ('input [ { name: "x" data_type: TYPE_STRING dims: [ 3 ] } ]', "TYPE_STRING is not supported"),
    ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] optional: true } ]', "'optional' is not supported"),
    ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] }, { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]',
     "appears twice"),
    ("dynamic_batching { priority_levels: 2 }", "'priority_levels' is not supported"),
    ("instance_group [ { kind: KIND_MODEL } ]", "KIND_MODEL is not supported"),
    ('instance_group [ { count: 1 gpus: [ 0 ] } ]', "'gpus' is not supported"),
    ("max_batch_size: -1", "max_batch_size must be >= 0"),
    ("dynamic_batching { preferred_batch_size: [ 99 ] }", "preferred_batch_size 99"),
    ('parameters { key: "traffic" value: { string_value: "{" } }', "parameter 'traffic' is not JSON"),
    ('name: "other"', "names it 'other'"),
])
def test_bad_configs_are_refused_by_name(extra: str, fragment: str) -> None:
    text = f'platform: "onnxruntime_onnx"\n{extra}\n'
    if "max_batch_size" not in extra:
        text += "max_batch_size: 8\n"
    with pytest.raises(InvalidArgumentError) as err:
        tritonconfig.to_dict(tritonconfig.parse(text), "m")
    assert fragment in str(err.value)


@pytest.mark.parametrize("platform", ["tensorrt_plan", "python", ""])
def test_unsupported_platforms_are_named(platform: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        tritonconfig.to_dict(tritonconfig.parse(f'platform: "{platform}"'), "m")
    assert f"{platform or '(none)'!r} is not supported" in str(err.value)


def test_auto_complete_from_onnx_and_exported_program(tmp_path: Path) -> None:
    tm.write_onnx(tmp_path, "ox", tm.mlp(), input_name="features", output_name="scores")
    tm.write_export(tmp_path, "ep", tm.mlp())
    ox = modelrepo.read_config(tmp_path, "ox")
    assert ox["platform"] == "onnxruntime_onnx" and ox["max_batch_size"] == tritonconfig.DEFAULT_MAX_BATCH_SIZE
    assert ox["inputs"] == [{"name": "features", "datatype": "FP32", "dims": [tm.FEATURES]}]
    assert ox["outputs"] == [{"name": "scores", "datatype": "FP32", "dims": [tm.CLASSES]}]
    ep = modelrepo.read_config(tmp_path, "ep")
    assert ep["platform"] == "torch_export"
    assert ep["inputs"] == [{"name": "input", "datatype": "FP32", "dims": [tm.FEATURES]}]
    assert ep["outputs"] == [{"name": "OUTPUT__0", "datatype": "FP32", "dims": [tm.CLASSES]}]
    assert modelrepo.list_models(tmp_path) == ["ep", "ox"]
    # A config.pbtxt without tensors is completed too; one that lists them is kept.
    (tmp_path / "ox" / "config.pbtxt").write_text('max_batch_size: 4\nresponse_cache { enable: true }')
    ox = modelrepo.read_config(tmp_path, "ox")
    assert ox["max_batch_size"] == 4 and ox["inputs"][0]["name"] == "features" and ox["response_cache_enabled"]


def test_torchscript_needs_its_tensors_listed(tmp_path: Path) -> None:
    tm.write_torchscript(tmp_path, "ts", tm.mlp(), config='platform: "pytorch_libtorch"\nmax_batch_size: 4')
    with pytest.raises(InvalidArgumentError) as err:
        modelrepo.read_config(tmp_path, "ts")
    assert "list its input and output tensors" in str(err.value)


def test_builtin_configs_have_the_response_cache_flag_off(tmp_path: Path) -> None:
    from tensorwire.serving.models import build_model

    modelrepo.write_version(tmp_path, "s", "spiral", build_model("spiral").state_dict())
    assert modelrepo.read_config(tmp_path, "s")["response_cache_enabled"] is False
