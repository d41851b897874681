"""The README's marked examples run against a suite this test starts, so an example
cannot go stale: every fenced ``sh`` or ``python`` block right after a
``<!-- readme-test -->`` line runs with the data dir ``var/`` and the default ports
mapped to this suite's (in the code, and for the SDK's defaults through its
``TENSORWIRE_STREAMER/TRAINER/INFERENCE``), in a folder laid out like a clone's
(``examples/``, ``.venv/``)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from tensorwire.inference import grpc_service_pb2 as pb
from tensorwire.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- readme-test -->"
DEFAULT_PORTS = {"trainer": 50051, "streamer": 50052, "inference": 8001, "inference-http": 8000,
                 "web": 8080}


def marked_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block that follows the marker line."""
    blocks = []
    for match in re.finditer(re.escape(MARK) + r"\s*\n```(\w+)\n(.*?)\n```", text, re.S):
        blocks.append((match.group(1), match.group(2)))
    return blocks


def test_the_readme_marks_examples() -> None:
    blocks = marked_blocks((ROOT / "README.md").read_text())
    assert {lang for lang, _ in blocks} >= {"python", "sh"}, blocks
    assert all(lang in ("python", "sh") for lang, _ in blocks)


def _wait_model(target: str, token: str, model: str, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, "tensorwire up exited"
            try:
                reply = stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=2,
                                        metadata=(("authorization", f"Bearer {token}"),))
                if reply.ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise AssertionError(f"model {model} not ready within {timeout_s}s")


@pytest.mark.slow
def test_readme_examples_run_against_a_real_suite(tmp_path: Path) -> None:
    blocks = marked_blocks((ROOT / "README.md").read_text())
    ports = {name: free_port() for name in DEFAULT_PORTS}
    log = tmp_path / "up.log"
    env = {**os.environ, "TENSORWIRE_TRAINER_CHECKPOINT_EVERY_S": "2",
           "TENSORWIRE_TRAINER_DEMO_MODELS": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorwire.cli", "up", "--no-metrics", "--data-dir", "var",
         "--trainer-port", str(ports["trainer"]), "--streamer-port", str(ports["streamer"]),
         "--inference-port", str(ports["inference"]),
         "--inference-http-port", str(ports["inference-http"]), "--web-port", str(ports["web"])],
        cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while "all services SERVING" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        token = (tmp_path / "var" / "admin.token").read_text().strip()
        _wait_model(f"127.0.0.1:{ports['inference']}", token, "spiral", 120, proc)
        (tmp_path / "examples").symlink_to(ROOT / "examples")
        (tmp_path / ".venv").symlink_to(Path(sys.prefix))
        sdk_env = {**env, "TENSORWIRE_STREAMER": f"127.0.0.1:{ports['streamer']}",
                   "TENSORWIRE_TRAINER": f"127.0.0.1:{ports['trainer']}",
                   "TENSORWIRE_INFERENCE": f"127.0.0.1:{ports['inference']}",
                   # torch's default of a thread per core spins for minutes on a loaded CI machine
                   "OMP_NUM_THREADS": "1"}
        for lang, code in blocks:
            for name, default in DEFAULT_PORTS.items():
                code = re.sub(rf"\b(127\.0\.0\.1|localhost):{default}\b", rf"\g<1>:{ports[name]}", code)
            argv = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
            done = subprocess.run(argv, cwd=tmp_path, env=sdk_env, capture_output=True, text=True, timeout=240)
            assert done.returncode == 0, f"README {lang} example failed:\n{code}\n{done.stdout}\n{done.stderr}"
            assert done.stdout.strip(), f"README {lang} example printed nothing:\n{code}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
