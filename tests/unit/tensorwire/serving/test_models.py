"""tensorwire.serving.models: every kind builds, matches its spec and is deterministic."""

from __future__ import annotations

import pytest
import torch

from tensorwire.serving.models import MODELS, build_model, example_inputs, tensor_specs


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_shapes_match_spec_and_eval_is_deterministic(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(kind).eval()
    inputs = example_inputs(kind, batch=3)
    spec = MODELS[kind]
    assert [tuple(t.shape[1:]) for t in inputs] == [s.dims for s in spec.inputs]
    with torch.no_grad():
        first = model(*inputs)
        second = model(*inputs)
    first = first if isinstance(first, tuple) else (first,)
    second = second if isinstance(second, tuple) else (second,)
    assert [tuple(t.shape) for t in first] == [(3, *s.dims) for s in spec.outputs]
    assert all(s.datatype == "FP32" for s in spec.inputs + spec.outputs)
    for a, b in zip(first, second, strict=True):
        assert a.dtype == torch.float32
        assert torch.equal(a, b)


def test_model_args_change_shapes() -> None:
    inputs, outputs = tensor_specs("trajectory", past=6, future=3)
    assert inputs[0].dims == (6, 2) and outputs[0].dims == (3, 2)
    model = build_model("trajectory", past=6, future=3)
    assert tuple(model(torch.zeros(2, 6, 2)).shape) == (2, 3, 2)


def test_unknown_kind_and_args_are_named() -> None:
    with pytest.raises(KeyError, match="'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match="depth"):
        build_model("spiral", depth=3)


def test_state_dict_round_trip() -> None:
    a, b = build_model("detection"), build_model("detection")
    b.load_state_dict(a.state_dict())
    x = example_inputs("detection")
    with torch.no_grad():
        for ta, tb in zip(a.eval()(*x), b.eval()(*x), strict=True):
            assert torch.equal(ta, tb)
