"""A training script of its own (examples/digits/train_tracked.py, the SDK) watched and
controlled in Debian's chromium through the real suite (``tensorwire up``): it is listed,
its step moves, Pause holds it, Resume restarts it, Stop ends the script."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tensorwire.trainer.v1 import trainer_pb2 as pb
from tensorwire.trainer.v1 import trainer_pb2_grpc as rpc
from tests.e2e.conftest import (
    CHROMIUM,
    ROOT,
    Process,
    Stack,
    browser,
    ensure_bundle,
    screenshot,
    settled_step,
    wait_http,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (scripts/install-system-deps.sh installs it)")
    ensure_bundle()
    stack = Stack(tmp_path_factory.mktemp("sdk-stack"))
    try:
        stack.start()
        wait_http(stack.base_url + "healthz", 20)
        yield stack
    finally:
        stack.stop()


def script_run_id(stack: Stack, task: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{stack.trainer_port}") as channel:
        stub = rpc.TrainerServiceStub(channel)
        while time.monotonic() < deadline:
            runs = stub.ListRuns(pb.ListRunsRequest(), timeout=10,
                                 metadata=[("authorization", f"Bearer {stack.token}")]).runs
            found = [r.run_id for r in runs if r.task == task]
            if found:
                return found[0]
            time.sleep(0.2)
    raise AssertionError(f"no run of task {task!r} within {timeout_s}s")


def test_a_script_is_watched_paused_resumed_and_stopped_from_the_page(suite: Stack, tmp_path: Path) -> None:
    script = Process(
        [sys.executable, str(ROOT / "examples" / "digits" / "train_tracked.py"), "--steps", "10000000"],
        tmp_path / "script.log",
        {"PYTHONPATH": str(ROOT), "TENSORWIRE_TRAINER": f"127.0.0.1:{suite.trainer_port}",
         "TENSORWIRE_STREAMER": f"127.0.0.1:{suite.streamer_port}", "TENSORWIRE_INFERENCE": "",
         "TENSORWIRE_TOKEN_FILE": str(suite.data_dir / "admin.token"),
         "TENSORWIRE_EXPORT_DIR": str(tmp_path / "models")},
    ).start()
    try:
        run_id = script_run_id(suite, "digits-cnn")
        with browser() as context:
            page = context.new_page()  # type: ignore[attr-defined]
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{suite.base_url}?run={run_id}#token={suite.token}")
            page.wait_for_function("() => window.tensorwire && window.tensorwire.displayedStep > 0",
                                   timeout=30_000)
            assert page.evaluate("() => window.tensorwire.state") == "RUNNING"
            assert "digits-cnn" in page.locator("#runs").inner_text()
            page.click("#pause")
            page.wait_for_function("() => window.tensorwire.state === 'PAUSED'", timeout=15_000)
            paused_at = settled_step(page)  # frames of the last steps may still be on their way
            page.wait_for_timeout(1500)
            assert page.evaluate("() => window.tensorwire.serverStep") == paused_at
            screenshot(page, "sdk-paused")
            page.click("#resume")
            page.wait_for_function(f"() => window.tensorwire.serverStep > {paused_at}", timeout=15_000)
            page.click("#stop")
            page.wait_for_function("() => window.tensorwire.state === 'STOPPED'", timeout=20_000)
            assert not errors, errors
        assert script.proc is not None
        assert script.proc.wait(60) == 0, script.log.read_text()[-3000:]
        assert "test accuracy" in script.log.read_text()
        assert (tmp_path / "models" / "digits-cnn" / "1" / "model.pt2").is_file()
    finally:
        script.stop()
