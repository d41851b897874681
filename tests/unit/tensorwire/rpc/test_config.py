"""Settings: one loader for every program; a bad value of any type, from a flag or the
environment, is one line naming the setting, where it came from and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.gateway.settings import GatewaySettings
from services.inference.settings import InferenceSettings
from services.streamer.settings import StreamerSettings
from services.trainer.settings import TrainerSettings
from tensorwire.cli import SuiteSettings
from tensorwire.rpc import config

ROOT = Path(__file__).resolve().parents[4]


@pytest.mark.parametrize(("cls", "argv", "env", "expected"), [
    (StreamerSettings, ["--port", "x"], {}, "port (--port) must be a whole number, got 'x'"),
    (StreamerSettings, [], {"TENSORWIRE_STREAMER_PORT": "70000"},
     "port (TENSORWIRE_STREAMER_PORT) must be <= 65535, got 70000"),
    (StreamerSettings, ["--keepalive-s", "nan"], {}, "keepalive_s (--keepalive-s) must be a number"),
    (TrainerSettings, [], {"TENSORWIRE_TRAINER_PUSH_CHECKPOINTS": "maybe"},
     "push_checkpoints (TENSORWIRE_TRAINER_PUSH_CHECKPOINTS) must be true or false"),
    (StreamerSettings, ["--log-level", "LOUD"], {},
     "log_level (--log-level) must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"),
    (InferenceSettings, ["--cache-config", "local,size=big"], {}, "--cache-config"),
    (SuiteSettings, ["--web-port", "0"], {}, "web_port (--web-port) must be >= 1, got 0"),
])
def test_a_bad_value_names_setting_source_and_allowed_values(
        cls: type, argv: list[str], env: dict[str, str], expected: str) -> None:
    with pytest.raises(config.SettingsError) as err:
        config.load(cls, argv, env=env)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_booleans_are_switches_and_flags_beat_the_environment() -> None:
    env = {"TENSORWIRE_TRAINER_PUSH_CHECKPOINTS": "1"}
    assert config.load(TrainerSettings, [], env=env).push_checkpoints is True
    assert config.load(TrainerSettings, ["--no-push-checkpoints"], env=env).push_checkpoints is False
    assert config.load(TrainerSettings, ["--push-checkpoints"], env={}).push_checkpoints is True
    assert config.load(TrainerSettings, ["--push-checkpoints", "false"], env={}).push_checkpoints is False
    assert config.load(GatewaySettings, [], env={"TENSORWIRE_GATEWAY_CORS_ORIGINS": "a, b"}).cors_origins == ("a", "b")


@pytest.mark.parametrize("program", ["services.trainer", "services.streamer", "services.inference",
                                     "services.gateway", "tensorwire.cli up"])
def test_every_program_has_help_for_every_flag_and_exits_2_in_one_line(program: str) -> None:
    module, *sub = program.split()
    help_out = subprocess.run([sys.executable, "-m", module, *sub, "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert help_out.returncode == 0, help_out.stderr
    text = help_out.stdout
    assert "PosixPath" not in text
    # Every option line has words after it (argparse puts the help on the same or next line).
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("--") and stripped.split()[0] not in ("--help",):
            rest = stripped.split("  ", 1)[1].strip() if "  " in stripped else lines[i + 1].strip()
            assert rest and not rest.startswith("--"), f"{program}: {stripped} has no help"
    bad = subprocess.run([sys.executable, "-m", module, *sub, "--grace-s", "soon"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    out = (bad.stdout + bad.stderr).strip()
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert "grace_s (--grace-s) must be a number, got 'soon'" in out


def test_a_missing_model_repository_is_refused_naming_the_flag(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "repo"
    done = subprocess.run([sys.executable, "-m", "services.inference", "--model-repository", str(missing),
                           "--port", "0", "--http-port", "-1", "--metrics-port", "-1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = done.stdout.strip()
    assert done.returncode == 2, out + done.stderr
    assert "Traceback" not in out + done.stderr and len(out.splitlines()) == 1, out
    assert "(--model-repository) does not exist" in out and "--create-model-repository" in out
    assert not missing.exists()
