"""Benchmark of the run store. Prints figures.

    .venv/bin/python tests/benchmarks/bench_run_store.py [--quick] [--cycles 2000] [--no-postgres]

1. Write cost: the spiral training loop's steps/s with the run store off, on
   (SQLite) and on (PostgreSQL, a throw-away server started here, when the
   ``postgresql`` package is installed), one run at a time, each kind for the same
   ``--seconds`` per round, the order reversed every round. Reported: the median over
   the rounds of each round's ratio on/off (goal >= 0.98); the same not counting the
   time the training thread waited for a CPU held by other processes (Linux
   schedstat: on a shared machine that wait is most of the noise); and the CPU per
   step of the training thread and of the store (writer thread + database server);
   then the store's CPU per batch the recorder writes (writer thread, database server).
2. History query: a 1M-step run's scalars (2 series) down-sampled to 1,024 buckets
   per series: time and the bytes of the GetRunScalars answer (SQLite).
3. Memory: RSS of one process holding a real trainer and a real streamer (gRPC on
   sockets, a viewer subscribing to each run) over ``--cycles`` start -> complete ->
   released cycles; RSS after the first cycle, 10 % and each quarter of them; after
   the first 10 % vs at the end (goal: within 10 %), and the ``run-<id>`` models
   left (``--keep-runs``).

The machine is shared and noisy: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc
import torch

from services.streamer.app import create_app as create_streamer
from services.streamer.settings import StreamerSettings
from services.trainer.app import create_app as create_trainer
from services.trainer.runs import RunManager
from services.trainer.settings import TrainerSettings
from services.trainer.store import PostgresRunStore, RunRecord, RunStore, SqliteRunStore
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.data.scalars import to_batch
from tensorwire.rpc.server import GrpcServer, ServerOptions
from tensorwire.serving import modelrepo
from tensorwire.streamer.v1 import streamer_pb2 as spb
from tensorwire.streamer.v1 import streamer_pb2_grpc as spb_grpc
from tensorwire.trainer.v1 import trainer_pb2 as tpb
from tensorwire.trainer.v1 import trainer_pb2_grpc as tpb_grpc
from tests.support import postgres


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def postgres_cpu_s() -> float:
    """CPU seconds of every PostgreSQL server process on this machine (the store's
    server-side cost: on a small machine it competes with training for the cores)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            if "(postgres)" in text:
                fields = text.rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


def run_queue_s(native_id: int) -> float:
    """Seconds a thread of this process has waited for a CPU while runnable (schedstat)."""
    return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[1]) / 1e9


@dataclasses.dataclass
class Round:
    rate: float
    """Steps per second of the training thread over the window."""
    rate_own: float
    """Steps per second not counting the time the training thread waited for a CPU
    that other processes held: what other engineers' load does not change (the waits
    for the GIL, the writer's share, remain)."""
    train_ms: float
    """The training thread's CPU per step."""
    store_ms: float
    """The store's CPU per step: the recorder's writer thread plus the database server."""
    wait_ms: float
    """Per step, the time the training thread was neither on a CPU nor waiting for one:
    blocked (on the GIL, mostly, while another thread of this process holds it)."""


async def measure(store: RunStore | None, seconds: float, tmp: Path) -> Round:
    """One spiral run: a warm-up second, then a window of ``seconds``. Steps and their
    times come from the loop's own status (the step and when it was produced), so
    the window is exact whatever the event loop's wake-up delay."""
    runs = RunManager(tmp / "models", checkpoint_every_s=0, store=store, state_dir=tmp / "state")
    try:
        run = runs.start_run("spiral", {"max_steps": 0}, seed=1)
        await asyncio.sleep(1.0)  # warm-up
        thread = run.loop._thread
        assert thread.ident is not None and thread.native_id is not None
        clock = time.pthread_getcpuclockid(thread.ident)
        pg0, rec0 = postgres_cpu_s(), runs.recorder.cpu_s if runs.recorder else 0.0
        first, cpu0, rq0 = run.loop.status, time.clock_gettime(clock), run_queue_s(thread.native_id)
        await asyncio.sleep(seconds)
        last, cpu1, rq1 = run.loop.status, time.clock_gettime(clock), run_queue_s(thread.native_id)
        pg = postgres_cpu_s() - pg0 if isinstance(store, PostgresRunStore) else 0.0
        rec = (runs.recorder.cpu_s - rec0) if runs.recorder else 0.0
        steps, window = last.step - first.step, last.produced_at - first.produced_at
        return Round(steps / window, steps / (window - (rq1 - rq0)), 1000 * (cpu1 - cpu0) / steps,
                     1000 * (rec + pg) / steps, 1000 * (window - (cpu1 - cpu0) - (rq1 - rq0)) / steps)
    finally:
        await runs.aclose()


async def bench_write_cost(seconds: float, rounds: int, pg_dsn: str | None) -> None:
    kinds = ["off", "sqlite"] + (["postgresql"] if pg_dsn else [])
    print(f"1. steps/s of one spiral run, store off vs on: {rounds} rounds of {seconds:g} s per kind, "
          f"the order reversed every round ({' '.join(kinds)} / {' '.join(kinds[::-1])})")
    results: dict[str, list[Round]] = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            with tempfile.TemporaryDirectory() as tmp:
                store: RunStore | None = None
                if kind == "sqlite":
                    store = SqliteRunStore(Path(tmp) / "runs.sqlite3")
                elif kind == "postgresql":
                    assert pg_dsn
                    store = PostgresRunStore(postgres.fresh_database(pg_dsn))
                results[kind].append(await measure(store, seconds, Path(tmp)))
    # Each round's ratio against the "off" run of the same round (minutes apart at
    # most, so under about the same load), then the median over the rounds.
    for label, field in (("steps/s", "rate"), ("steps/s not counting waits for a CPU held by "
                                                  "other processes", "rate_own")):
        print(f"   {label}:")
        for kind in kinds:
            rates = [getattr(x, field) for x in results[kind]]
            ratios = sorted(getattr(x, field) / getattr(o, field)
                            for x, o in zip(results[kind], results["off"], strict=True))
            spread = f"(rounds {ratios[0]:.3f}..{ratios[-1]:.3f})" if kind != "off" else ""
            print(f"   {kind:<10} median {statistics.median(rates):6.0f} steps/s   ratio on/off "
                  f"{statistics.median(ratios):5.3f} {spread:<22} {', '.join(f'{v:.0f}' for v in rates)}")
    print("   CPU per training step (load-independent): the training thread, and the store "
          "(writer thread + database server)")
    for kind in kinds:
        train = statistics.median(x.train_ms for x in results[kind])
        cost = statistics.median(x.store_ms for x in results[kind])
        wait = statistics.median(x.wait_ms for x in results[kind])
        print(f"   {kind:<10} training {train:6.3f} ms/step, store {cost:6.3f} ms/step "
              f"({100 * cost / train:4.1f} % of the training thread's CPU), training thread "
              f"blocked {wait:6.3f} ms/step")


async def bench_interleaved(seconds: float, pairs: int, pg_dsn: str | None) -> None:
    """Store on vs off in ONE run: windows in which the training thread hands its
    steps to the recorder alternate (on off off on ...) with windows in which it does
    not, the recorder drained before each off window. Separate runs differ by several
    % in CPU per step whatever the store (allocations, placement): here each ratio
    compares windows of one loop, seconds apart."""
    from services.trainer.loop import TrainingLoop
    from services.trainer.recorder import RunRecorder
    from services.trainer.tasks import TASKS

    print(f"1c. the same, in one run per store: {pairs} on/off pairs of {seconds:g} s windows "
          "(on off, off on, ...), the recorder drained before each off window")
    with tempfile.TemporaryDirectory() as tmp:
        stores: list[tuple[str, RunStore]] = [("sqlite", SqliteRunStore(Path(tmp) / "runs.sqlite3"))]
        if pg_dsn:
            stores.append(("postgresql", PostgresRunStore(postgres.fresh_database(pg_dsn))))
        for kind, store in stores:
            recorder = RunRecorder(store)
            recorder.start()
            recorder.put_run(RunRecord("i", "spiral", cpb.RUN_STATE_RUNNING, {}, {}, 1, time.time(), time.time()))
            recording = [False]

            def on_scalars(step: int, metrics: dict[str, float], recorder: RunRecorder = recorder,
                           recording: list[bool] = recording) -> None:
                if recording[0]:
                    recorder.add_scalars("i", step, metrics)

            task = TASKS["spiral"]
            loop = TrainingLoop(task, task.configure({"max_steps": 0}, {}), 1, name="i", on_scalars=on_scalars)
            loop.start()
            try:
                await asyncio.sleep(1.0)  # warm-up
                thread = loop._thread
                assert thread.ident is not None
                clock = time.pthread_getcpuclockid(thread.ident)
                rates: dict[bool, list[float]] = {True: [], False: []}
                cpu: dict[bool, list[float]] = {True: [], False: []}
                for r in range(pairs):
                    for on in (True, False) if r % 2 == 0 else (False, True):
                        if not on:
                            await asyncio.to_thread(recorder.flush, 10.0)
                        recording[0] = on
                        first, cpu0 = loop.status, time.clock_gettime(clock)
                        await asyncio.sleep(seconds)
                        last, cpu1 = loop.status, time.clock_gettime(clock)
                        steps = last.step - first.step
                        rates[on].append(steps / (last.produced_at - first.produced_at))
                        cpu[on].append(1000 * (cpu1 - cpu0) / steps)
                ratios = sorted(a / b for a, b in zip(rates[True], rates[False], strict=True))
                cpu_ratios = sorted(b / a for a, b in zip(cpu[True], cpu[False], strict=True))
                # The mean of the per-pair ratios and its standard error: the windows
                # swing by +-10 % on a shared machine, the store's cost is a few %.
                mean = statistics.fmean(ratios)
                se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
                print(f"   {kind:<10} steps/s on/off: median {statistics.median(ratios):5.3f}, mean "
                      f"{mean:5.3f} +- {se:5.3f} (s.e.; pairs {ratios[0]:.3f}..{ratios[-1]:.3f}; on "
                      f"{statistics.median(rates[True]):.0f}, off {statistics.median(rates[False]):.0f} "
                      f"steps/s); training thread's CPU per step off/on {statistics.median(cpu_ratios):5.3f}")
            finally:
                loop.stop()
                await asyncio.to_thread(loop.join, 10.0)
                recorder.close()


def bench_batch_cost(pg_dsn: str | None, batches: int = 200, steps: int = 150) -> None:
    """The store's CPU per batch as the recorder writes one (``steps`` steps of 2 series;
    150: about 0.5 s of a spiral run): the writer thread's, and the database server's."""
    print(f"1b. CPU per batch of {steps} steps x 2 series ({batches} batches, one run)")
    with tempfile.TemporaryDirectory() as tmp:
        stores: list[tuple[str, RunStore]] = [("sqlite", SqliteRunStore(Path(tmp) / "runs.sqlite3"))]
        if pg_dsn:
            stores.append(("postgresql", PostgresRunStore(postgres.fresh_database(pg_dsn))))
        for kind, store in stores:
            store.put_runs([RunRecord("b", "spiral", cpb.RUN_STATE_RUNNING, {}, {}, 1, 0.0, 0.0)])
            pg0, cpu0 = postgres_cpu_s(), time.thread_time()
            for b in range(batches):
                first = 1 + b * steps
                store.write(rows=[("b", name, s, 1.0 / s) for s in range(first, first + steps)
                                  for name in ("loss", "accuracy")])
            writer = 1000 * (time.thread_time() - cpu0) / batches
            server = 1000 * (postgres_cpu_s() - pg0) / batches if kind == "postgresql" else 0.0
            print(f"   {kind:<10} writer {writer:5.2f} ms, database server {server:5.2f} ms per batch")
            store.close()


def bench_history(points: int) -> None:
    print(f"2. history of a {points:,}-step run (2 series) -> 1,024 buckets per series (SQLite)")
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteRunStore(Path(tmp) / "runs.sqlite3")
        store.put_runs([RunRecord("big", "spiral", cpb.RUN_STATE_COMPLETED, {}, {}, 1, 0.0, 0.0)])
        started = time.perf_counter()
        chunk = 100_000
        for lo in range(1, points + 1, chunk):
            steps = range(lo, min(points, lo + chunk - 1) + 1)
            store.add_scalars([("big", "loss", s, 1.0 / s) for s in steps]
                              + [("big", "accuracy", s, s / points) for s in steps])
        print(f"   written in {time.perf_counter() - started:.1f} s")
        times = []
        for _ in range(3):
            started = time.perf_counter()
            series = store.scalars("big", 1024)
            times.append(time.perf_counter() - started)
        size = len(tpb.GetRunScalarsResponse(run_id="big", scalars=to_batch(series)).SerializeToString())
        print(f"   query {min(times) * 1000:.0f} ms (best of 3), answer {size / 1024:.0f} KiB, "
              f"{sum(len(b) for b in series.values())} buckets")
        store.close()


async def bench_memory(cycles: int, keep_runs: int) -> None:
    print(f"3. RSS over {cycles} start -> complete -> released cycles (trainer + streamer in one process)")
    with tempfile.TemporaryDirectory() as tmp:
        t_port, s_port = postgres._free_port(), postgres._free_port()
        streamer = await create_streamer(dataclasses.replace(
            StreamerSettings(), trainer_target=f"127.0.0.1:{t_port}", release_after_s=0.2))
        s_server = GrpcServer(ServerOptions(name="streamer", host="127.0.0.1", port=s_port, grace_s=0.2), streamer)
        await s_server.start()
        settings = dataclasses.replace(
            TrainerSettings(), port=t_port, model_repository=Path(tmp) / "models",
            data_dir=str(Path(tmp) / "trainer"), streamer_target=f"127.0.0.1:{s_port}", inference_target="",
            checkpoint_every_s=0.0, keep_runs=keep_runs, max_active_runs=64)
        trainer = await create_trainer(settings)
        trainer.runs.release_after_s = 0.2
        t_server = GrpcServer(ServerOptions(name="trainer", host="127.0.0.1", port=t_port, grace_s=0.2), trainer)
        await t_server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{t_port}") as tch, \
                    grpc.aio.insecure_channel(f"127.0.0.1:{s_port}") as sch:
                tstub, sstub = tpb_grpc.TrainerServiceStub(tch), spb_grpc.StreamerServiceStub(sch)
                marks: list[tuple[int, float]] = []
                # The curve: the first cycle, 10 % (the reference: caches warm), every quarter.
                curve_at = {1, max(1, cycles // 10), *(cycles * q // 4 for q in (1, 2, 3, 4))}
                stalls: list[str] = []
                started = time.perf_counter()
                for i in range(1, cycles + 1):
                    run = (await tstub.StartRun(tpb.StartRunRequest(task="spiral", params={"max_steps": 20}))).run
                    call = sstub.Subscribe(spb.SubscribeRequest(run_id=run.run_id), timeout=30)
                    seen: list[int] = []
                    try:
                        async for frame in call:
                            if frame.HasField("status"):
                                seen.append(frame.status.state)
                                if frame.status.state == cpb.RUN_STATE_COMPLETED:
                                    break
                    except grpc.aio.AioRpcError as exc:  # reported, not hidden: a stalled subscription
                        stored = (await tstub.GetRun(tpb.GetRunRequest(run_id=run.run_id))).run
                        stalls.append(f"cycle {i}: {exc.code().name} after statuses "
                                      f"{[cpb.RunState.Name(x) for x in seen]}; GetRun says "
                                      f"{cpb.RunState.Name(stored.state)} at step {stored.step}")
                        print("   STALL", stalls[-1], flush=True)
                    call.cancel()
                    if i in curve_at:
                        await asyncio.sleep(1.5)  # releases and pruning happen
                        marks.append((i, rss_mib()))
                        print(f"   after {i} cycles: RSS {marks[-1][1]:.0f} MiB", flush=True)
                (first_i, first) = next(m for m in marks if m[0] == max(1, cycles // 10))
                (last_i, last) = marks[-1]
                models = [m for m in modelrepo.list_models(settings.model_repository) if m.startswith("run-")]
                print(f"   {cycles} cycles in {time.perf_counter() - started:.0f} s; RSS {first:.0f} MiB "
                      f"after {first_i}, {last:.0f} MiB after {last_i}: {100 * (last / first - 1):+.1f} %")
                print(f"   subscriptions that saw no COMPLETED within 30 s: {len(stalls)}")
                print(f"   in memory at the end: trainer {len(trainer.runs.list_runs())} runs, streamer "
                      f"{len(streamer.hub.topics)} topics; run-<id> models on disk {len(models)} "
                      f"(--keep-runs {keep_runs})")
        finally:
            await t_server.stop(0.2)
            await s_server.stop(0.2)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and cycles")
    parser.add_argument("--seconds", type=float, help="per kind per round (default 4; --quick 3); the "
                        "recorder writes every 2 s: 6 or more steadies the store's CPU per step")
    parser.add_argument("--rounds", type=int, help="rounds, the order reversed each (default 8; --quick 4; 0 = skip)")
    parser.add_argument("--pairs", type=int, default=60,
                        help="1c: on/off window pairs in one run per store (0 = skip)")
    parser.add_argument("--pair-seconds", type=float, default=2.0,
                        help="1c: seconds per window (the recorder writes every 2 s)")
    parser.add_argument("--separate", action=argparse.BooleanOptionalAction, default=True,
                        help="1: separate runs per kind (--no-separate: only 1c and 1b)")
    parser.add_argument("--cycles", type=int, help="start/stop cycles (default 2000; --quick 300; 0 = skip)")
    parser.add_argument("--batch-steps", type=int, default=150,
                        help="steps per batch in 1b (150: 0.5 s of a 300 steps/s run; the recorder "
                             "writes every 2 s)")
    parser.add_argument("--keep-runs", type=int, default=200)
    parser.add_argument("--history-points", type=int, default=1_000_000, help="0 = skip")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    for name, full, quick in (("seconds", 4.0, 3.0), ("rounds", 8, 4), ("cycles", 2000, 300)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    torch.set_num_threads(1)  # as the trainer does (--torch-threads 1)
    import logging

    logging.basicConfig(level=logging.WARNING)
    with contextlib.ExitStack() as stack:
        dsn = None
        if args.rounds and not args.no_postgres:
            reason = postgres.unavailable_reason()
            if reason:
                print(f"(PostgreSQL skipped: {reason})")
            else:
                dsn = stack.enter_context(postgres.postgres_server())
        if args.rounds:
            if args.separate:
                await bench_write_cost(args.seconds, args.rounds, dsn)
            if args.pairs:
                await bench_interleaved(args.pair_seconds, args.pairs, dsn)
            bench_batch_cost(dsn, steps=args.batch_steps)
    if args.history_points:
        bench_history(args.history_points)
    if args.cycles:
        await bench_memory(args.cycles, args.keep_runs)


if __name__ == "__main__":
    asyncio.run(main())
