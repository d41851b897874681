"""services.inference.backends: built-in models served as frozen TorchScript only when
that answers exactly as the eager module does."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from services.inference import backends
from tensorwire.serving import modelrepo
from tensorwire.serving.models import MODELS, build_model


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_built_in_kind_is_frozen_and_answers_as_eager(kind: str) -> None:
    module = build_model(kind).eval()
    config = modelrepo.default_config("m", kind)
    served = backends._frozen(module, config, "cpu")
    assert isinstance(served, torch.jit.ScriptModule)
    generator = torch.Generator().manual_seed(1)
    for rows in (1, 5, 3):  # batch sizes vary: the frozen graph is not fixed to one shape
        inputs = [torch.rand((rows, *[1 if d == -1 else d for d in t["dims"]]), generator=generator)
                  for t in config["inputs"]]
        with torch.inference_mode():
            want, got = module(*inputs), served(*inputs)
        wants = want if isinstance(want, tuple) else (want,)
        gots = got if isinstance(got, tuple) else (got,)
        assert len(wants) == len(gots) and all(torch.equal(a, b) for a, b in zip(wants, gots))


class NotScriptable(nn.Module):
    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return points * len({id(points)})  # a set comprehension: TorchScript refuses it


class AnswersDifferently(nn.Module):
    """Eager and TorchScript disagree: its eager path is patched after scripting."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return torch.cat([points, points], dim=1) * self.scale


def test_a_model_that_cannot_be_frozen_or_answers_differently_stays_eager(
        caplog: pytest.LogCaptureFixture) -> None:
    config = modelrepo.default_config("m", "spiral")
    caplog.set_level(logging.INFO, logger="services.inference.backends")
    module = NotScriptable().eval()
    assert backends._frozen(module, config, "cpu") is module
    assert "stays eager (TorchScript" in caplog.text

    differs = AnswersDifferently().eval()
    original = differs.forward
    scripted = torch.jit.script  # the scripted copy keeps scale 1.0; the eager one answers 2x

    def script_then_change(m: nn.Module) -> torch.jit.ScriptModule:
        out = scripted(m)
        differs.forward = lambda points: original(points) * 2  # type: ignore[method-assign]
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.jit, "script", script_then_change)
        assert backends._frozen(differs, config, "cpu") is differs
    assert "answers differently" in caplog.text


def test_models_loaded_at_once_are_all_frozen() -> None:
    """TorchScript's compilation unit is process-wide: two loader threads scripting at
    once raised "Can't redefine method: forward on class ... Linear" in one of them, and
    that model stayed eager (found in a server booting two spiral models: one in four
    boots served one of them 1.5-2x slower). Without the lock this failed in two runs of
    three: a race, so it can pass by chance, not fail by chance)."""
    import threading

    kinds = sorted(MODELS)
    for _ in range(3):
        modules = [build_model(kind).eval() for kind in kinds for _ in range(2)]
        configs = [modelrepo.default_config("m", kind) for kind in kinds for _ in range(2)]
        served: list[object] = [None] * len(modules)
        start = threading.Barrier(len(modules))

        def freeze(i: int) -> None:
            start.wait()
            served[i] = backends._frozen(modules[i], configs[i], "cpu")

        threads = [threading.Thread(target=freeze, args=(i,)) for i in range(len(modules))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        eager = [configs[i].get("kind") for i, s in enumerate(served) if not isinstance(s, torch.jit.ScriptModule)]
        assert not eager, f"stayed eager when frozen at once: {eager}"
