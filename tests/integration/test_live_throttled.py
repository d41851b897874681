"""Under a real 1 Mbit/s throttle, watching does not slow training and the view stays fresh.

Root only: a network namespace whose loopback shapes what leaves the streamer's
port to 1 Mbit/s (htb). The real trainer and streamer run there as processes,
and a measuring viewer (tests/support/viewer.py) watches the demo run in
alternating 2 s slots for 24 s while reading the trainer's step counter, so the
ratio of steps/s watched to not watched is taken on the trainer's own clock.

As in tests/benchmarks/bench_live.py, the trainer is pinned to CPU 0 and the
streamer and viewer to CPU 1: in a deployment the viewer is another machine, and
on this 2-core machine an unpinned viewer's decoding competes with the training
thread for a core, which measures the test rig, not the design (an unpinned
run in CI once read 0.89 against 0.99 pinned).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.netns import ThrottledNetns, is_root, list_netns

ROOT = Path(__file__).resolve().parents[2]
STREAMER_PORT, TRAINER_PORT = 54052, 54051
RATIO_FLOOR = 0.8

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(not is_root(), reason="needs root for network namespaces and tc"),
]


def _pin(core: int) -> list[str]:
    """``taskset -c core`` where CPUs 0 and 1 are ours and taskset exists."""
    if not {0, 1} <= os.sched_getaffinity(0) or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(core)]


def _spawn(ns: ThrottledNetns, args: list[str], log: Path, core: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*ns.prefix(), *_pin(core), sys.executable, *args], cwd=ROOT, stdout=open(log, "wb"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _watch(ns: ThrottledNetns, trainer_pid: int) -> dict[str, Any]:
    viewer = subprocess.run(
        [*ns.prefix(), *_pin(1), sys.executable, "-m", "tests.support.viewer",
         "--target", f"127.0.0.1:{STREAMER_PORT}", "--trainer", f"127.0.0.1:{TRAINER_PORT}",
         "--run-id", "auto", "--pairs", "6", "--slot-s", "2", "--trainer-pid", str(trainer_pid)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert viewer.returncode == 0, viewer.stderr[-2000:]
    return json.loads(viewer.stdout.strip().splitlines()[-1])


def test_one_mbit_viewer_neither_slows_training_nor_lags(tmp_path: Path) -> None:
    with ThrottledNetns("twa") as ns:
        ns.throttle(STREAMER_PORT, "1mbit")
        streamer = _spawn(ns, ["-m", "services.streamer", "--host", "127.0.0.1", "--port",
                               str(STREAMER_PORT), "--metrics-port", "-1"], tmp_path / "streamer.log", 1)
        trainer = _spawn(ns, ["-m", "services.trainer", "--host", "127.0.0.1", "--port", str(TRAINER_PORT),
                              "--metrics-port", "-1", "--streamer-target", f"127.0.0.1:{STREAMER_PORT}",
                              "--inference-target", "", "--model-repository", str(tmp_path / "models"),
                              "--demo-task", "spiral", "--demo-models", "false",
                              "--checkpoint-every-s", "0"], tmp_path / "trainer.log", 0)
        # The machine is shared, so the ratio is the median of 6 paired slots (each
        # watched slot against the unwatched slots around it), and a measurement spoiled
        # by someone else's burst is taken again, once. The figure itself is the
        # benchmark's (bench_live.py: 0.97-0.99 at rest); this bound only has to catch
        # a trainer that waits on the link: one that awaited each step's 0.5 KB view at
        # 1 Mbit/s could make at most ~250 steps/s against ~1,000 (a ratio near
        # 0.25). CI read 0.86-0.88 with the training thread at a third of its speed
        # at rest (other work on its core): a per-wall-second view budget then
        # weighs more.
        results = []
        try:
            for _ in range(2):
                result = _watch(ns, trainer.pid)
                print(json.dumps(result))
                results.append(result)
                if result["ratio_median"] is not None and result["ratio_median"] >= RATIO_FLOOR:
                    break
        finally:
            _stop(trainer)
            _stop(streamer)
        logs = (tmp_path / "trainer.log").read_text()[-2000:]
        assert results[-1]["ratio_median"] >= RATIO_FLOOR, results
        for result in results:
            assert not result["error"], result
            assert result["views"] >= 20, (result, logs)
            assert result["lag_p95"] < 2.0, result
            assert result["max_status_gap_s"] < 2.0, result
            assert result["scalar_gaps"] == 0 and result["scalar_last"] > result["scalar_first"], result
    assert ns.name not in list_netns("twa")
