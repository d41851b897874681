"""--device: spelled right or refused with the flag named; a device this machine lacks
stops the service at start-up with exit 2 and a reason, not a silent CPU fallback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.inference.settings import InferenceSettings
from services.trainer.settings import TrainerSettings
from tensorwire.rpc import config
from tensorwire.serving.devices import resolve_device

ROOT = Path(__file__).resolve().parents[4]


@pytest.mark.parametrize("cls", [TrainerSettings, InferenceSettings])
def test_a_misspelt_device_names_the_setting(cls: type) -> None:
    with pytest.raises(config.SettingsError, match=r"--device / TENSORWIRE_\w+_DEVICE\) must be auto, "
                                                   r"cpu, cuda or cuda:N, got 'gpu'"):
        config.load(cls, ["--device", "gpu"], env={})
    assert config.load(cls, [], env={f"{cls.env_prefix}DEVICE": "cuda:1"}).device == "cuda:1"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_auto_falls_back_to_the_cpu_without_a_gpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("service, extra", [("trainer", []), ("inference", []),
                                            ("inference", ["--workers", "2"])])
def test_a_missing_cuda_device_stops_the_service_with_a_reason(
    service: str, extra: list[str], tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--device", "cuda", "--port", "0",
         "--metrics-port", "-1", "--model-repository", str(tmp_path), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ("device (--device / TENSORWIRE_" + service.upper() + "_DEVICE) 'cuda' cannot be used: "
            "torch sees no CUDA device") in proc.stdout
