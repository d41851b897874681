"""Checkpoint export (run.checkpoint): a Triton model folder whose program computes what
the module does, with torch.export or, where it cannot capture the model, TorchScript."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import tensorwire
from tensorwire import export


class Branchy(nn.Module):
    """Data-dependent Python control flow: torch.export refuses it, tracing takes one path."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > -1e9):
            return self.linear(x)
        return -self.linear(x)


def test_checkpoint_exports_with_torch_export_and_a_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
    run = tensorwire.init(task="cnn", streamer="", trainer="", inference="")
    try:
        exported = run.checkpoint(model, name="my-cnn", inputs=torch.randn(8, 1, 8, 8),
                                  directory=tmp_path).result(120)
        second = run.checkpoint(model, name="my-cnn", inputs=torch.randn(8, 1, 8, 8),
                                directory=tmp_path).result(120)
    finally:
        run.finish()
    assert exported.platform == "torch_export" and exported.exported_with == "torch.export"
    assert exported.file == tmp_path / "my-cnn" / "1" / "model.pt2" and exported.file.is_file()
    assert second.version == 2 and (tmp_path / "my-cnn" / "2" / "model.pt2").is_file()
    config = (tmp_path / "my-cnn" / "config.pbtxt").read_text()
    assert 'platform: "torch_export"' in config and "max_batch_size: 64" in config
    assert "dims: [1, 8, 8]" in config and "dims: [10]" in config and 'string_value: "torch.export"' in config
    served = export.load_exported(exported)
    for batch in (1, 5, 8, 17):  # any batch size, not only the example's
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(served(x), model(x))
    # The copy was taken at checkpoint(): training on does not change what was exported.
    with torch.no_grad():
        model[0].weight.add_(1.0)
        x = torch.randn(2, 1, 8, 8)
        assert not torch.allclose(served(x), model(x))


def test_a_model_torch_export_refuses_falls_back_to_torchscript(tmp_path: Path) -> None:
    model = Branchy()
    exported = export.export_model(model, (torch.randn(4, 3),), tmp_path, "branchy")
    assert exported.platform == "pytorch_libtorch" and exported.exported_with == "torch.jit.trace"
    assert exported.file.name == "model.pt"
    config = (tmp_path / "branchy" / "config.pbtxt").read_text()
    assert 'platform: "pytorch_libtorch"' in config and 'name: "INPUT__0"' in config
    assert 'name: "OUTPUT__0"' in config and 'string_value: "torch.jit.trace"' in config
    x = torch.randn(6, 3)
    with torch.no_grad():
        torch.testing.assert_close(export.load_exported(exported)(x), model(x))


def test_bad_names_and_unexportable_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="name"):
        export.export_model(nn.Linear(2, 2), (torch.randn(1, 2),), tmp_path, "../escape")

    class Opaque(nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return f"{x.sum().item():.3f}"  # not a tensor: neither export nor trace

    with pytest.raises(ValueError, match="cannot export model 'opaque'"):
        export.export_model(Opaque(), (torch.randn(2, 2),), tmp_path, "opaque")
    assert not [p.name for p in (tmp_path / "opaque").iterdir()]  # nothing half-written
