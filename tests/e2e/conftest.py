"""The suite as a user runs it (``tensorwire up``: trainer, streamer, inference,
gateway and the demo run) and Debian's chromium driven by playwright.

Never downloads a browser: without /usr/bin/chromium (``make test`` installs it
with scripts/install-system-deps.sh) the browser tests skip. Screenshots go to
var/e2e/ (kept after the run, ignored by git).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "clients" / "web"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "var" / "e2e"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def ensure_bundle() -> None:
    """The built app, built here when only the build step is missing."""
    if (WEB / "dist" / "index.html").is_file():
        return
    if not (WEB / "node_modules" / ".bin" / "esbuild").exists():
        pytest.skip("web app not built and clients/web/node_modules missing: run `make web`")
    subprocess.run(["node", "build.mjs"], cwd=WEB, check=True, capture_output=True, timeout=120)


def _server_prefix(netns: str | None) -> list[str]:
    """How server processes start: in the test's namespace, and at a lower CPU
    priority. On a real deployment the browser and the services are on different
    machines; on these 2 shared cores the page's frame rate and long tasks would
    otherwise measure the trainer's training loop, not the page."""
    return [*(["ip", "netns", "exec", netns] if netns else []), "nice", "-n", "15"]


@dataclass
class Process:
    """A child process whose output goes to a log file the test can read."""

    argv: Sequence[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    offset: int = 0
    """Where this start's output begins in ``log`` (a restart appends to the same file)."""

    def start(self) -> Process:
        handle = self.log.open("ab")
        self.offset = handle.tell()
        self.proc = subprocess.Popen(
            list(self.argv), cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env}, start_new_session=True,
        )
        handle.close()
        return self

    def output(self) -> str:
        """What this start of the process has written (not an earlier start's lines)."""
        with self.log.open("rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def wait_for_line(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.output():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.argv[0]} exited: {self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout_s}s: {self.output()[-3000:]}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@dataclass
class Stack:
    """``tensorwire up`` on free ports, with its own data directory."""

    data_dir: Path
    netns: str | None = None
    demo_task: str = ""
    """'' = no demo run: the test starts the run it watches (see ``start_run``), and
    the trainer does not prime the other demo models, whose training would compete
    with the browser for the 2 cores while frame rate and long tasks are measured."""
    web_port: int = field(default_factory=free_port)
    trainer_port: int = field(default_factory=free_port)
    streamer_port: int = field(default_factory=free_port)
    inference_port: int = field(default_factory=free_port)
    up: Process | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}/"

    @property
    def token(self) -> str:
        """The admin token ``tensorwire up`` made for this suite."""
        return (self.data_dir / "admin.token").read_text().strip()

    @property
    def url(self) -> str:
        """The page URL as ``tensorwire up`` prints it (the token in the fragment)."""
        return f"{self.base_url}#token={self.token}"

    def page_url(self, query: str = "") -> str:
        """The page with a query string, the token in the fragment (after the query)."""
        return f"{self.base_url}{'?' + query if query else ''}#token={self.token}"

    def targets(self) -> list[str]:
        return [
            "--trainer-target", f"127.0.0.1:{self.trainer_port}",
            "--streamer-target", f"127.0.0.1:{self.streamer_port}",
            "--inference-target", f"127.0.0.1:{self.inference_port}",
        ]

    def start(self) -> Stack:
        argv = [
            *_server_prefix(self.netns), sys.executable, "-m", "tensorwire.cli", "up",
            "--host", "127.0.0.1", "--web-port", str(self.web_port),
            "--trainer-port", str(self.trainer_port), "--streamer-port", str(self.streamer_port),
            "--inference-port", str(self.inference_port), "--data-dir", str(self.data_dir),
            "--inference-http-port", str(free_port()),
            "--no-metrics", "--demo-task", self.demo_task,
        ]
        # Checkpoints every few seconds, so the inference panel has a model soon.
        env = {"TENSORWIRE_TRAINER_TORCH_THREADS": "1", "TENSORWIRE_TRAINER_CHECKPOINT_EVERY_S": "3"}
        self.up = Process(argv, self.data_dir / "up.log", env).start()
        self.up.wait_for_line("all services SERVING", 90)
        self.up.wait_for_line("gateway on http://", 30)
        self.up.wait_for_line(f"open {self.url}", 5)
        return self

    def start_run(self, task: str = "spiral", params: dict[str, float] | None = None, name: str = "") -> str:
        """Start a run through the trainer's own gRPC API; returns its id."""
        argv = [*_server_prefix(self.netns), sys.executable, "-c",
                "import json, sys, grpc\n"
                "from tensorwire.trainer.v1 import trainer_pb2 as pb, trainer_pb2_grpc as rpc\n"
                "with grpc.insecure_channel(sys.argv[1]) as ch:\n"
                "    run = rpc.TrainerServiceStub(ch).StartRun(pb.StartRunRequest(task=sys.argv[2],"
                " params=json.loads(sys.argv[4]), name=sys.argv[5]),"
                " timeout=30, metadata=[('authorization', 'Bearer ' + sys.argv[3])]).run\n"
                "print(run.run_id)\n",
                f"127.0.0.1:{self.trainer_port}", task, self.token, json.dumps(params or {}), name]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"StartRun failed ({done.returncode}): {done.stderr[-2000:]}"
        return done.stdout.strip()

    def gateway(self, port: int, log: Path) -> Process:
        """A second gateway in front of the same services (one a test may kill)."""
        argv = [*_server_prefix(self.netns), sys.executable, "-m", "services.gateway",
                "--host", "127.0.0.1", "--port", str(port), *self.targets()]
        return Process(argv, log)

    def stop(self) -> None:
        if self.up is not None:
            self.up.stop()


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One suite per test module, stopped when the module is done: nothing keeps
    training in the background while later tests run."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (scripts/install-system-deps.sh installs it)")
    ensure_bundle()
    suite = Stack(tmp_path_factory.mktemp("stack"))
    try:
        suite.start()
        wait_http(suite.base_url + "healthz", 20)
        suite.start_run("spiral")
        yield suite
    finally:
        suite.stop()


@contextlib.contextmanager
def browser(executable: str = str(CHROMIUM)) -> Iterator[object]:
    """A fresh chromium (new user-data-dir) driven by playwright."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="twd-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


def screenshot(page: object, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))  # type: ignore[attr-defined]
    return path


_SETTLED_STEP = """([quietMs, maxMs]) => new Promise((resolve) => {
  let last = window.tensorwire.serverStep, since = performance.now();
  const started = since;
  const timer = setInterval(() => {
    const step = window.tensorwire.serverStep, now = performance.now();
    if (step !== last) { last = step; since = now; }
    if (now - since >= quietMs || now - started >= maxMs) {
      clearInterval(timer);
      resolve(now - since >= quietMs ? step : null);
    }
  }, 50);
})"""


def settled_step(page: object, quiet_ms: int = 1000, max_ms: int = 8000) -> int:
    """The page's server step once it has not moved for ``quiet_ms`` (a paused run:
    frames of its last steps, a view built from them included, may still be on their
    way when the page says PAUSED)."""
    step = page.evaluate(_SETTLED_STEP, [quiet_ms, max_ms])  # type: ignore[attr-defined]
    assert step is not None, f"the server step kept moving for {max_ms} ms"
    return int(step)
