"""``tensorwire up`` starts inference's HTTP endpoint; its port is a flag and an env var."""

from __future__ import annotations

from pathlib import Path

from services.inference.settings import InferenceSettings
from tensorwire.cli import SuiteSettings, plan
from tensorwire.rpc import config


def _args(**overrides: object) -> SuiteSettings:
    values: dict[str, object] = {"host": "127.0.0.1", "metrics": False, "data_dir": Path("var"),
                                 "streamer_port": 1, "inference_port": 2, "trainer_port": 3,
                                 "web_port": 4, "inference_http_port": 8000, "demo_task": ""}
    values.update(overrides)
    return SuiteSettings(**values)  # type: ignore[arg-type]


def _inference_args(settings: SuiteSettings) -> list[str]:
    children = plan(settings, Path("var/admin.token"), Path("var/tokens.csv"))
    return next(c for c in children if c.name == "inference").args


def test_up_reads_its_settings_like_every_program() -> None:
    settings = config.load(SuiteSettings, ["--no-metrics", "--web-port", "9090"],
                           env={"TENSORWIRE_TRAINER_PORT": "6000"})
    assert (settings.metrics, settings.web_port, settings.trainer_port) == (False, 9090, 6000)
    assert settings.data_dir == Path("var")


def test_up_passes_the_http_port_to_inference() -> None:
    args = _inference_args(_args())
    assert args[args.index("--http-port") + 1] == "8000"
    args = _inference_args(_args(inference_http_port=-1))
    assert args[args.index("--http-port") + 1] == "-1"


def test_http_port_setting_defaults_to_triton_s_and_reads_env() -> None:
    assert config.load(InferenceSettings, [], env={}).http_port == 8000
    assert config.load(InferenceSettings, [], env={"TENSORWIRE_INFERENCE_HTTP_PORT": "-1"}).http_port == -1
    assert config.load(InferenceSettings, ["--http-port", "9000"], env={}).http_port == 9000
