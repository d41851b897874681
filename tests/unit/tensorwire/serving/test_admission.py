"""tensorwire.serving.admission: the bounds on admin inputs, checked before anything is built."""

from __future__ import annotations

import math

import pytest

from tensorwire.errors import InvalidArgumentError, ResourceExhaustedError
from tensorwire.serving import admission
from tensorwire.serving.models import MODELS, build_model


@pytest.mark.parametrize("text", ["²", "١", "1\n", "+1", " 1", "1.0", "0x1", "", "0", str(2**31), "9" * 300])
def test_only_ascii_digit_versions_in_range_parse(text: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        admission.parse_version(text)
    assert len(str(info.value)) < 300
    assert not admission.is_version_name(text)


def test_versions_parse() -> None:
    assert admission.parse_version("1") == 1
    assert admission.parse_version(str(admission.MAX_VERSION)) == admission.MAX_VERSION
    assert admission.parse_version("007") == 7
    with pytest.raises(InvalidArgumentError):
        admission.parse_version(True)


def test_new_version_at_most_newest_plus_step() -> None:
    assert admission.check_new_version(5 + admission.MAX_VERSION_STEP, 5, "m") == 1005
    with pytest.raises(InvalidArgumentError, match="more than 1000 above the newest"):
        admission.check_new_version(6 + admission.MAX_VERSION_STEP, 5, "m")
    with pytest.raises(InvalidArgumentError, match="1..2147483647"):
        admission.check_new_version(2**62, 2**31 - 1, "m")


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_meta_device_estimate_matches_the_real_model(kind: str) -> None:
    real = build_model(kind)
    want = sum(t.numel() * t.element_size() for t in (*real.parameters(), *real.buffers()))
    assert admission.model_bytes(kind, {}) == want


def test_model_size_bound_names_the_flag_and_allocates_nothing() -> None:
    with pytest.raises(ResourceExhaustedError, match=r"MiB of parameters; the bound is 1,024 MiB \(--max-model-mb\)"):
        admission.check_model_size("spiral", {"hidden": 1 << 20})
    with pytest.raises(ResourceExhaustedError, match="outside 1..256"):
        admission.check_model_size("spiral", {"layers": 10**6})
    with pytest.raises(InvalidArgumentError, match="must be an integer"):
        admission.check_model_size("spiral", {"hidden": 1e9})
    with pytest.raises(InvalidArgumentError, match="must be a JSON object"):
        admission.check_model_size("spiral", [1, 2])
    assert admission.check_model_size("spiral", {"hidden": 32}) > 0


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf, -1, True, "1", None])
def test_traffic_weights_are_finite_numbers(weight: object) -> None:
    with pytest.raises(InvalidArgumentError, match="finite number >= 0"):
        admission.check_traffic({"1": weight})


def test_traffic_names_versions_on_disk() -> None:
    assert admission.check_traffic({"1": 0, "2": 0.5}, {1, 2}) == {"1": 0, "2": 0.5}
    with pytest.raises(InvalidArgumentError, match="not on disk"):
        admission.check_traffic({"3": 1}, {1, 2})


def test_override_cannot_change_what_the_model_is() -> None:
    current = {"name": "m", "kind": "spiral", "model_args": {}}
    for key, value in (("kind", "trajectory"), ("name", "x"), ("platform", "onnxruntime_onnx")):
        with pytest.raises(InvalidArgumentError, match=f"cannot change {key}"):
            admission.check_override(current, {key: value}, [1])
    assert admission.check_override(current, {"kind": "spiral", "traffic": {"1": 1}}, [1])


def test_echo_cuts_long_input() -> None:
    assert admission.echo("ab") == "'ab'"
    cut = admission.echo("x" * 10_000)
    assert len(cut) < admission.MAX_ECHO + 30 and cut.endswith("(10002 chars)")


def test_json_object_takes_text_bytes_or_a_decoded_object_and_names_what_is_wrong() -> None:
    assert admission.json_object("x", '{"a": 1}') == {"a": 1}
    assert admission.json_object("x", b'{"a": 1}') == {"a": 1}
    assert admission.json_object("x", {"a": 1}) == {"a": 1}
    with pytest.raises(InvalidArgumentError, match="^params_json is not valid JSON: "):
        admission.json_object("params_json", "{a")
    with pytest.raises(InvalidArgumentError, match=r"^params_json must be a JSON object, got \[1, 2\]$"):
        admission.json_object("params_json", "[1, 2]")
