"""Live training over a throttled link: does watching slow training, and how stale is the view?

Run as root (it creates a network namespace and shapes its loopback with htb)::

    sudo .venv/bin/python tests/benchmarks/bench_live.py            # ~20 minutes
    sudo .venv/bin/python tests/benchmarks/bench_live.py --window-s 5 --tasks spiral
    sudo .venv/bin/python tests/benchmarks/bench_live.py --tasks spiral --no-naive \
        --conditions 64kbit,32kbit --scenarios all          # the harshest links only
    sudo .venv/bin/python tests/benchmarks/bench_live.py --conditions 1mbit,500kbit --scenarios none \
        --tasks digits,script:examples/digits/train_tracked.py \
        --task-module examples/digits/task.py               # the digits example, both ways

A task is a built-in task, a plugin task (``--task-module``, loaded by the trainer
and by the naive sender), or ``script:PATH``: a training script of its own that
uses the SDK (``tensorwire.init``), run as a process beside the services (with
``--script-arg`` flags, default ``--steps 1000000000``; one torch thread,
``OMP_NUM_THREADS=1``, like the trainer's runs) and watched like any run: its
steps/s come from its own published status, its CPU seconds from its process,
the trainer only relays (it sits with the streamer). A script has no naive sender.

Inside a fresh namespace it starts the real streamer and trainer processes,
starts a run, and measures training steps/s in windows: no viewer, one viewer
with the streamer's port throttled to 1 Mbit/s, to 500 kbit/s, and 100
unthrottled viewers (and 64 and 32 kbit/s); each no-viewer window sits between the others and each
ratio is taken against the mean of the neighbouring no-viewer windows (the
machine is shared, so absolute speeds drift). It prints, for ``spiral`` and a
heavier task, unpinned and with the trainer pinned to CPU 0 and streamer +
viewers to CPU 1 (``taskset``):

- steps/s ratio to no viewer (1 Mbit/s, 500 kbit/s, 100 viewers);
- lag of the view on screen, p50/p95 (now minus the production time of the
  step shown, sampled every 50 ms);
- bytes per heavy frame, and the same frame as JSON;
- the same for a naive sender (each step's view as JSON, the loop awaiting the
  send), the user's original complaint;
- lag scenarios with one viewer on gRPC's default channel settings (the
  namespace keeps kernel-default sysctls unless ``--notsent-lowat`` is given):
  64 kbit/s with and without acks, 32 kbit/s, 1 Mbit/s, a 1 Mbit/s -> 64 kbit/s
  -> 1 Mbit/s step (time until the view lag is back under 0.5 s), and 300 ms
  RTT at 256 kbit/s through tests/support/delay_proxy.py: status, scalar and
  view lag p50/p95 (status: produced -> arrived; scalars and view: age on screen).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PY = sys.executable
VIEWER_HOST = "[::1]"
"""Viewers dial the streamer over IPv6 and only that is shaped; the trainer publishes
over IPv4 (the streamer listens on ``localhost``, both): its traffic, the streamer's TCP
ACKs to it included, is not on the viewer's link (netns.ThrottledNetns.throttle)."""
STREAMER_PORT, TRAINER_PORT, NAIVE_PORT, PROXY_PORT = 52052, 52051, 52053, 52054
SHAPE_ALL = False
"""--shape-all: everything leaving the streamer's port is shaped, the trainer's connection
included (how this benchmark measured before; viewers then dial 127.0.0.1)."""


def _viewer_host() -> str:
    return "127.0.0.1" if SHAPE_ALL else VIEWER_HOST


def _pin(core: int | None) -> list[str]:
    return ["taskset", "-c", str(core)] if core is not None else []


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env=None if env is None else {**os.environ, **env})


def _python_child(pid: int) -> int:
    """The pid of the service itself (``taskset`` execs it, so usually ``pid``)."""
    return pid


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def _wait_healthy(port: int, timeout_s: float = 60.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"port {port} never became healthy")
            await asyncio.sleep(0.2)


class Trainer:
    """gRPC client of the trainer under test."""

    def __init__(self, port: int) -> None:
        import grpc

        from tensorwire.trainer.v1 import trainer_pb2_grpc

        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = trainer_pb2_grpc.TrainerServiceStub(self.channel)

    async def start(self, task: str) -> str:
        from tensorwire.trainer.v1 import trainer_pb2 as pb

        reply = await self.stub.StartRun(pb.StartRunRequest(task=task, seed=1), timeout=30)
        return reply.run.run_id

    async def run_ids(self) -> set[str]:
        from tensorwire.trainer.v1 import trainer_pb2 as pb

        return {r.run_id for r in (await self.stub.ListRuns(pb.ListRunsRequest(), timeout=10)).runs}

    async def script_run(self, known: set[str], timeout_s: float = 300.0) -> str:
        """The run id of the training script that registered itself (a run not in
        ``known``: the trainer's run store keeps earlier tasks' runs), once it trains
        (its first step can take seconds: imports, data, torch's first kernels)."""
        from tensorwire.trainer.v1 import trainer_pb2 as pb

        deadline = time.monotonic() + timeout_s
        while True:
            runs = [r for r in (await self.stub.ListRuns(pb.ListRunsRequest(), timeout=10)).runs
                    if r.run_id not in known]
            if runs and runs[0].step > 0:
                return runs[0].run_id
            if time.monotonic() > deadline:
                raise TimeoutError(f"no training script registered within {timeout_s:g} s")
            await asyncio.sleep(0.2)

    async def step(self, run_id: str) -> int:
        from tensorwire.trainer.v1 import trainer_pb2 as pb

        reply = await self.stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=10)
        return reply.run.step

    async def steps_per_s(self, run_id: str, window_s: float) -> float:
        s0, t0 = await self.step(run_id), time.monotonic()
        await asyncio.sleep(window_s)
        s1, t1 = await self.step(run_id), time.monotonic()
        return (s1 - s0) / (t1 - t0)


async def _viewer(run_id: str, count: int, pairs: int, slot_s: float, core: int | None, log: Path,
                  trainer_pid: int) -> dict:
    cmd = [*_pin(core), PY, "-m", "tests.support.viewer", "--target", f"{_viewer_host()}:{STREAMER_PORT}",
           "--trainer", f"127.0.0.1:{TRAINER_PORT}", "--run-id", run_id, "--count", str(count),
           "--pairs", str(pairs), "--slot-s", str(slot_s), "--trainer-pid", str(trainer_pid)]
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=open(log, "ab"))
    out, _ = await proc.communicate()
    lines = out.decode().strip().splitlines()
    return json.loads(lines[-1]) if lines else {"error": "viewer printed nothing"}


CONDITIONS = (("A/A", 0, None), ("1mbit", 1, "1mbit"), ("500kbit", 1, "500kbit"), ("64kbit", 1, "64kbit"),
              ("32kbit", 1, "32kbit"), ("100 viewers", 100, None))
"""(name, viewers, link rate): "A/A" has no viewer in either slot, so its ratio is the
method's own noise on this machine, read beside the others."""

SCENARIOS = ("64kbit", "64kbit no ack", "32kbit", "1mbit", "step", "rtt300")


async def _watch(target_port: int, run_id: str, seconds: float, core: int | None, log: Path,
                 *extra: str) -> asyncio.subprocess.Process:
    host = _viewer_host() if target_port == STREAMER_PORT else "127.0.0.1"
    cmd = [*_pin(core), PY, "-m", "tests.support.viewer", "--target", f"{host}:{target_port}",
           "--trainer", f"127.0.0.1:{TRAINER_PORT}", "--run-id", run_id, "--watch-s", str(seconds),
           "--plain-channel", *extra]
    return await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=open(log, "ab"))


def _per_s(by_kind: dict[str, int] | None, seconds: float | None) -> str:
    """Received bytes per second by frame kind (the link's budget, spent)."""
    if not by_kind or not seconds:
        return "-"
    return " ".join(f"{kind} {n / seconds:.0f}" for kind, n in sorted(by_kind.items()))


def _sockets(port: int) -> dict[str, dict[str, int]]:
    """TCP counters of every established socket on local ``port``, by peer address
    (``ss -ti``: payload bytes sent, segments sent (pure ACKs included), unsent bytes)."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout
    found: dict[str, dict[str, int]] = {}
    peer = ""
    for line in out.splitlines():
        if line and not line[0].isspace():
            fields = line.split()
            peer = fields[-1] if len(fields) >= 4 else ""
            found[peer] = {}
            continue
        for key in ("bytes_sent", "segs_out", "notsent", "unacked", "cwnd"):
            m = re.search(rf"\b{key}:(\d+)", line)
            if m and peer:
                found[peer][key] = int(m.group(1))
    return found


class LinkProbe:
    """What the slow class of the namespace carries while a scenario runs: its bytes
    and packets per second (headers included), its queue (htb backlog), and the
    streamer port's sockets' own counters, to tell whose bytes they are."""

    def __init__(self, ns: object, port: int) -> None:
        self.ns = ns
        self.port = port
        self.backlog: list[int] = []
        self.backlog_packets: list[int] = []
        self.notsent: list[int] = []
        self._task: asyncio.Task[None] | None = None
        self._start: tuple[float, tuple[int, int, int, int], dict[str, dict[str, int]]] | None = None

    def start(self) -> None:
        self._start = (time.monotonic(), self.ns.slow_class(), _sockets(self.port))  # type: ignore[attr-defined]
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            _, _, queued, packets = self.ns.slow_class()  # type: ignore[attr-defined]
            self.backlog.append(queued)
            self.backlog_packets.append(packets)
            self.notsent.append(sum(s.get("notsent", 0) for s in _sockets(self.port).values()))

    async def stop(self) -> dict:
        assert self._start is not None and self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        t0, (b0, p0, _, _), socks0 = self._start
        seconds = time.monotonic() - t0
        b1, p1, _, _ = self.ns.slow_class()  # type: ignore[attr-defined]
        socks1 = _sockets(self.port)
        peers = {}
        for peer, c in socks1.items():
            c0 = socks0.get(peer, {})
            peers[peer] = {
                "payload_per_s": round((c.get("bytes_sent", 0) - c0.get("bytes_sent", 0)) / seconds),
                "segs_per_s": round((c.get("segs_out", 0) - c0.get("segs_out", 0)) / seconds, 1),
            }

        def pct(values: list[int], q: float) -> int | None:
            return sorted(values)[int(q * (len(values) - 1))] if values else None

        return {"link_bytes_per_s": round((b1 - b0) / seconds), "link_packets_per_s": round((p1 - p0) / seconds, 1),
                "backlog_p50": pct(self.backlog, 0.5), "backlog_p95": pct(self.backlog, 0.95),
                "backlog_packets_p50": pct(self.backlog_packets, 0.5),
                "notsent_p95": pct(self.notsent, 0.95), "sockets": peers}


async def _summary(proc: asyncio.subprocess.Process) -> dict:
    out, _ = await proc.communicate()
    lines = out.decode().strip().splitlines()
    return json.loads(lines[-1]) if lines else {"error": "viewer printed nothing"}


async def measure_scenarios(run_id: str, names: list[str], core: int | None, ns: object, log: Path) -> dict:
    """One viewer per scenario on gRPC's default channel settings (see the module doc)."""
    out: dict[str, dict] = {}
    for name in names:
        if name == "step":
            ns.throttle(STREAMER_PORT, "1mbit", ipv6_only=not SHAPE_ALL)  # type: ignore[attr-defined]
            proc = await _watch(STREAMER_PORT, run_id, 20, core, log, "--warmup-s", "2")
            await asyncio.sleep(7)
            ns.throttle(STREAMER_PORT, "64kbit", ipv6_only=not SHAPE_ALL)  # type: ignore[attr-defined]
            await asyncio.sleep(7)
            ns.throttle(STREAMER_PORT, "1mbit", ipv6_only=not SHAPE_ALL)  # type: ignore[attr-defined]
            back = time.time()
            result = await _summary(proc)
            series = result.pop("lag_series", [])
            slow = sorted(v for t, v in series if back - 5 <= t < back)
            late = [t for t, v in series if t >= back and v >= 0.5]
            result["recovery_s"] = (max(late) - back) if late else 0.0
            result["slow_lag_p95"] = slow[int(0.95 * len(slow))] if slow else None
            out[name] = result
            continue
        if name == "rtt300":
            ns.throttle(PROXY_PORT, "256kbit")  # type: ignore[attr-defined]
            proxy = _spawn([*_pin(core), PY, "-m", "tests.support.delay_proxy", "--listen", str(PROXY_PORT),
                            "--target", f"127.0.0.1:{STREAMER_PORT}", "--delay-ms", "150"], log)
            await asyncio.sleep(1.0)
            try:
                out[name] = await _summary(await _watch(PROXY_PORT, run_id, 20, core, log, "--warmup-s", "5"))
            finally:
                _stop(proxy)
            out[name].pop("lag_series", None)
            continue
        rate = name.split()[0]
        ns.throttle(STREAMER_PORT, rate, ipv6_only=not SHAPE_ALL)  # type: ignore[attr-defined]
        extra = ["--no-ack"] if "no ack" in name else []
        proc = await _watch(STREAMER_PORT, run_id, 20, core, log, "--warmup-s", "5", *extra)
        await asyncio.sleep(5)
        probe = LinkProbe(ns, STREAMER_PORT)
        probe.start()
        await asyncio.sleep(13)  # while the viewer is connected: its socket's counters too
        link = await probe.stop()
        out[name] = await _summary(proc)
        out[name]["link"] = link
        out[name].pop("lag_series", None)
    return out


async def measure_design(task: str, pinned: bool, args: argparse.Namespace, ns: object, workdir: Path) -> dict:
    """The real trainer + streamer under each viewing condition (a ``script:PATH`` task:
    the script trains on the trainer's core, the trainer relays from the other)."""
    trainer_core, other_core = (0, 1) if pinned else (None, None)
    script = task.removeprefix("script:") if task.startswith("script:") else None
    log = workdir / f"{Path(script).stem if script else task}-{'pinned' if pinned else 'unpinned'}.log"
    streamer = _spawn([*_pin(other_core), PY, "-m", "services.streamer", "--host", "localhost",
                       "--port", str(STREAMER_PORT), "--metrics-port", "-1"], log)
    trainer = _spawn([*_pin(other_core if script else trainer_core), PY, "-m", "services.trainer",
                      "--host", "127.0.0.1",
                      "--port", str(TRAINER_PORT), "--metrics-port", "-1",
                      "--streamer-target", f"127.0.0.1:{STREAMER_PORT}", "--inference-target", "",
                      "--model-repository", str(workdir / "models"), "--checkpoint-every-s", "0",
                      *[f"--task-module={m}" for m in args.task_module], *args.trainer_arg], log)
    client = None
    runner = None
    try:
        await _wait_healthy(STREAMER_PORT)
        await _wait_healthy(TRAINER_PORT)
        client = Trainer(TRAINER_PORT)
        if script:
            known = await client.run_ids()
            runner = _spawn([*_pin(trainer_core), PY, script, *(args.script_arg or ["--steps", "1000000000"])],
                            log, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                      "TENSORWIRE_STREAMER": f"127.0.0.1:{STREAMER_PORT}",
                                      "TENSORWIRE_TRAINER": f"127.0.0.1:{TRAINER_PORT}",
                                      "TENSORWIRE_INFERENCE": "",
                                      "TENSORWIRE_EXPORT_DIR": str(workdir / "exports")})
            run_id = await client.script_run(known)
        else:
            run_id = await client.start(task)
        training_pid = _python_child((runner or trainer).pid)
        await asyncio.sleep(3.0)  # warm up
        results: dict[str, dict] = {}
        load_before = os.getloadavg()
        for name, count, rate in CONDITIONS:
            if args.conditions and name not in args.conditions.split(","):
                continue
            if rate:
                ns.throttle(STREAMER_PORT, rate, ipv6_only=not SHAPE_ALL)  # type: ignore[attr-defined]
            else:
                ns.unthrottle()  # type: ignore[attr-defined]
            results[name] = await _viewer(run_id, count, args.pairs, args.slot_s, other_core, log,
                                          training_pid)
        chosen = {"all": ",".join(SCENARIOS), "none": ""}.get(args.scenarios, args.scenarios)
        scenarios = [s for s in chosen.split(",") if s]
        if scenarios:
            results["scenarios"] = await measure_scenarios(run_id, scenarios, other_core, ns, log)
        results["load"] = {"before": load_before, "after": os.getloadavg()}
        return results
    finally:
        if client is not None:
            await client.channel.close()
        if runner is not None:
            _stop(runner)
        _stop(trainer)
        _stop(streamer)
        ns.unthrottle()  # type: ignore[attr-defined]


# -- the naive sender -------------------------------------------------------
def naive_server(port: int, task_name: str, window_s: float, task_modules: list[str]) -> None:
    """Trains alone for a window, then trains while awaiting a JSON send per step."""
    import grpc
    import torch

    from services.trainer.plugins import load_tasks
    from services.trainer.tasks import TASKS
    from services.trainer.views import as_json

    torch.set_num_threads(1)
    task = {**TASKS, **load_tasks(task_modules, taken=TASKS, entry_points=False)[0]}[task_name]
    config = task.configure()
    data = task.make_data(config, 1)
    model = task.build_model(config)
    opt = task.make_optimizer(model, config)
    gen = torch.Generator().manual_seed(1)
    step = 0

    def train() -> None:
        nonlocal step
        task.train_step(model, opt, task.sample_batch(data, config, gen))
        step += 1

    t0 = time.monotonic()
    while time.monotonic() - t0 < window_s:
        train()
    base = step / (time.monotonic() - t0)
    result: dict[str, float] = {"base_steps_per_s": base}
    done = asyncio.Event()

    async def watch(request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        start_step, start = step, time.monotonic()
        while time.monotonic() - start < window_s:
            train()
            model.eval()
            with torch.no_grad():
                view = task.build_view(model, data, config)
            model.train()
            view.step, view.produced_at = step, time.time()
            yield as_json(view)  # the loop awaits the send
        result["steps_per_s"] = (step - start_step) / (time.monotonic() - start)
        done.set()

    async def serve() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_stream_rpc_method_handler(
            watch, request_deserializer=lambda b: b, response_serializer=lambda b: b
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("naive.Naive", {"Watch": handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("READY", flush=True)
        await done.wait()
        await server.stop(1)

    asyncio.run(serve())
    print(json.dumps(result), flush=True)


def naive_viewer(port: int, duration_s: float) -> None:
    import grpc

    from tests.support.viewer import VIEWER_OPTIONS

    lags: list[float] = []
    sizes: list[int] = []

    async def run() -> None:
        shown: list[float] = []

        async def sample() -> None:
            while True:
                await asyncio.sleep(0.05)
                if shown:
                    lags.append(time.time() - shown[0])

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=VIEWER_OPTIONS) as ch:
            call = ch.unary_stream("/naive.Naive/Watch", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)(b"")
            sampler = asyncio.create_task(sample())
            with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
                async with asyncio.timeout(duration_s):
                    async for data in call:
                        sizes.append(len(data))
                        shown[:] = [json.loads(data)["produced_at"]]
            sampler.cancel()

    asyncio.run(run())
    lags.sort()
    print(json.dumps({
        "lag_p50": lags[len(lags) // 2] if lags else None,
        "lag_p95": lags[int(len(lags) * 0.95)] if lags else None,
        "frames": len(sizes), "json_bytes_mean": statistics.fmean(sizes) if sizes else None,
    }), flush=True)


async def measure_naive(task: str, pinned: bool, window_s: float, ns: object, workdir: Path,
                        task_modules: list[str]) -> dict:
    trainer_core, other_core = (0, 1) if pinned else (None, None)
    ns.throttle(NAIVE_PORT, "1mbit")  # type: ignore[attr-defined]
    server = await asyncio.create_subprocess_exec(
        *_pin(trainer_core), PY, __file__, "--naive-server", str(NAIVE_PORT), "--tasks", task,
        "--window-s", str(window_s), *[f"--task-module={m}" for m in task_modules], cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert server.stdout is not None
    line = await server.stdout.readline()  # READY once the solo window is done
    if b"READY" not in line:
        raise RuntimeError(f"naive server: {line!r}")
    viewer = await asyncio.create_subprocess_exec(
        *_pin(other_core), PY, __file__, "--naive-viewer", str(NAIVE_PORT),
        "--window-s", str(window_s + 1), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )
    v_out, _ = await viewer.communicate()
    s_out, _ = await server.communicate()
    ns.unthrottle()  # type: ignore[attr-defined]
    result = json.loads(s_out.decode().strip().splitlines()[-1])
    result["viewer"] = json.loads(v_out.decode().strip().splitlines()[-1])
    result["ratio"] = result.get("steps_per_s", 0.0) / result["base_steps_per_s"]
    return result


def _fmt(value: object, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def report(task: str, pinned: bool, design: dict, naive: dict | None) -> None:
    label = "unpinned"
    if pinned:
        label = ("pinned (script CPU 0; trainer + streamer + viewers CPU 1)" if task.startswith("script:")
                 else "pinned (trainer CPU 0; streamer + viewers CPU 1)")
    print(f"\n== {task}, {label}")
    for name, count, _ in CONDITIONS:
        if name not in design:
            continue
        v = design[name]
        extra = f", {v.get('viewers_with_views')}/{count} viewers got views" if count > 1 else ""
        if not count:
            print(f"  {name:>11}: ratio {_fmt(v.get('ratio'), '.3f')} (median {_fmt(v.get('ratio_median'), '.3f')}; "
                  f"per training CPU-second {_fmt(v.get('cpu_ratio'), '.3f')}): no viewer in either slot, "
                  "the method's noise")
            continue
        errors = f", errors {v['viewer_errors']}" if v.get("viewer_errors") else ""
        print(f"  {name:>11}: ratio {_fmt(v.get('ratio'), '.3f')} (median {_fmt(v.get('ratio_median'), '.3f')}; "
              f"per training CPU-second {_fmt(v.get('cpu_ratio'), '.3f')}; "
              f"{_fmt(v.get('steps_per_s_on'), '.0f')} steps/s watched vs {_fmt(v.get('steps_per_s_off'), '.0f')} not); "
              f"lag p50 {_fmt(v.get('lag_p50'))} s, p95 {_fmt(v.get('lag_p95'))} s "
              f"(status p95 {_fmt(v.get('status_lag_p95'))} s, scalars p95 {_fmt(v.get('scalar_lag_p95'))} s); "
              f"views {v.get('views')}, "
              f"status max gap {_fmt(v.get('max_status_gap_s'))} s, scalar gaps {v.get('scalar_gaps')}{extra}{errors}")
    for name, v in design.get("scenarios", {}).items():
        step = (f"; back under 0.5 s {_fmt(v.get('recovery_s'))} s after the bandwidth returned, "
                f"view lag p95 during 64 kbit/s {_fmt(v.get('slow_lag_p95'))} s") if name == "step" else ""
        print(f"  {name:>13} (default channel): status lag p50 {_fmt(v.get('status_lag_p50'))} "
              f"p95 {_fmt(v.get('status_lag_p95'))} s; scalars p50 {_fmt(v.get('scalar_lag_p50'))} "
              f"p95 {_fmt(v.get('scalar_lag_p95'))} s; view p50 {_fmt(v.get('lag_p50'))} "
              f"p95 {_fmt(v.get('lag_p95'))} s; transit p50 {_fmt(v.get('transit_p50'))} s; "
              f"views {v.get('views')}, acks {v.get('acks')}, scalar gaps {v.get('scalar_gaps')}; "
              f"bytes/s {_per_s(v.get('bytes_by_kind'), v.get('duration_s'))}"
              f"{step}{', error ' + v['error'] if v.get('error') else ''}")
        if "link" in v:
            print(f"  {'':>13} link: {v['link']}; streamer's delivery rate estimate p50 "
                  f"{_fmt(v.get('delivery_rate_p50'), '.0f')} p95 {_fmt(v.get('delivery_rate_p95'), '.0f')} B/s, "
                  f"in flight p50 {_fmt(v.get('in_flight_p50'), '.0f')} p95 {_fmt(v.get('in_flight_p95'), '.0f')} B; "
                  f"view arrival lag p50 {_fmt(v.get('arrival_lag_p50'))} p95 {_fmt(v.get('arrival_lag_p95'))} s "
                  f"(produced -> sent p50 {_fmt(v.get('view_send_lag_p50'), '.3f')} s), "
                  f"gaps between views p50 {_fmt(v.get('view_gap_p50'))} p95 {_fmt(v.get('view_gap_p95'))} "
                  f"max {_fmt(v.get('view_gap_max'))} s")
    if "load" in design:
        print(f"  load average (1, 5, 15 min) before {design['load']['before']}, after {design['load']['after']}")
    v = design.get("1mbit", {})
    if v.get("view_bytes_mean") and v.get("json_bytes_mean"):
        print(f"  bytes per heavy frame: {v['view_bytes_mean']:.0f} vs JSON {v['json_bytes_mean']:.0f} "
              f"({100 * v['view_bytes_mean'] / v['json_bytes_mean']:.1f} %)")
    if naive is not None:
        nv = naive["viewer"]
        print(f"  naive sender at 1mbit: {naive.get('steps_per_s', 0):.1f} steps/s vs {naive['base_steps_per_s']:.1f} "
              f"alone, ratio {naive['ratio']:.4f}; lag p50 {_fmt(nv.get('lag_p50'))} s, p95 {_fmt(nv.get('lag_p95'))} s; "
              f"{_fmt(nv.get('json_bytes_mean'), '.0f')} bytes per frame")
    sys.stdout.flush()


async def inside(args: argparse.Namespace) -> None:
    from tests.support.netns import attach

    ns = attach(args.inside)
    workdir = Path(tempfile.mkdtemp(prefix="bench-live-"))
    print(f"logs in {workdir}; {args.pairs} on/off pairs of {args.slot_s:g} s slots per condition; "
          f"{os.cpu_count()} CPUs", flush=True)
    for task in args.tasks.split(","):
        for pinned in {"both": (False, True), "pinned": (True,), "unpinned": (False,)}[args.pinning]:
            design = await measure_design(task, pinned, args, ns, workdir)
            naive = None
            if not args.no_naive and not task.startswith("script:"):
                naive = await measure_naive(task, pinned, args.window_s, ns, workdir, args.task_module)
            report(task, pinned, design, naive)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="spiral,detection")
    parser.add_argument("--window-s", type=float, default=8.0, help="naive sender window")
    parser.add_argument("--pairs", type=int, default=8, help="viewer on/off slot pairs per condition")
    parser.add_argument("--slot-s", type=float, default=2.0, help="length of a viewer on/off slot")
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--pinning", choices=("both", "pinned", "unpinned"), default="both")
    parser.add_argument("--conditions", default="",
                        help="comma list of: A/A,1mbit,500kbit,64kbit,32kbit,100 viewers (A/A: no viewer, the noise)")
    parser.add_argument("--scenarios", default="all",
                        help=f"comma list of: {','.join(SCENARIOS)}; all; or none")
    parser.add_argument("--notsent-lowat", type=int, default=0,
                        help="net.ipv4.tcp_notsent_lowat in the namespace (0: the kernel's default)")
    parser.add_argument("--trainer-arg", action="append", default=[],
                        help="extra flag for the trainer, e.g. --trainer-arg=--max-fps=5")
    parser.add_argument("--task-module", action="append", default=[],
                        help="a task plugin (file or module) for the trainer and the naive sender; repeatable")
    parser.add_argument("--script-arg", action="append", default=[],
                        help="a flag for script:PATH tasks (default --steps 1000000000), e.g. --script-arg=--steps=9")
    parser.add_argument("--netns-prefix", default="twa", help="name prefix of the namespace it makes")
    parser.add_argument("--shape-all", action="store_true",
                        help="shape the trainer's connection to the streamer too (the old, wrong, link)")
    parser.add_argument("--inside", help=argparse.SUPPRESS)
    parser.add_argument("--naive-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--naive-viewer", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_server:
        naive_server(args.naive_server, args.tasks, args.window_s, args.task_module)
        return 0
    if args.naive_viewer:
        naive_viewer(args.naive_viewer, args.window_s)
        return 0
    if args.inside:
        global SHAPE_ALL
        SHAPE_ALL = args.shape_all
        asyncio.run(inside(args))
        return 0
    from tests.support.netns import ThrottledNetns, is_root

    if not is_root():
        print("bench_live needs root (network namespace + tc); run it with sudo", file=sys.stderr)
        return 2
    with ThrottledNetns(args.netns_prefix, notsent_lowat=args.notsent_lowat) as ns:
        cmd = [*ns.prefix(), PY, __file__, "--inside", ns.name, "--tasks", args.tasks,
               "--window-s", str(args.window_s), "--pinning", args.pinning,
               "--pairs", str(args.pairs), "--slot-s", str(args.slot_s), "--conditions", args.conditions,
               "--scenarios", args.scenarios]
        cmd += [f"--trainer-arg={a}" for a in args.trainer_arg]
        cmd += [f"--task-module={m}" for m in args.task_module]
        cmd += [f"--script-arg={a}" for a in args.script_arg]
        cmd += ["--no-naive"] if args.no_naive else []
        cmd += ["--shape-all"] if args.shape_all else []
        return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
