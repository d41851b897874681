"""Benchmark of the run store. Prints figures.

    .venv/bin/python tests/benchmarks/bench_run_store.py [--quick] [--cycles 2000] [--no-postgres]

1. Write cost: the spiral training loop's steps/s with the run store off, on
   (SQLite) and on (PostgreSQL, a throw-away server started here, when the
   ``postgresql`` package is installed), in alternating rounds of ``--seconds``
   each, one run at a time. Reported: the median steps/s and the ratio on/off
   (goal >= 0.98).
2. History query: a 1M-step run's scalars (2 series) down-sampled to 1,024 buckets
   per series: time and the bytes of the GetRunScalars answer (SQLite).
3. Memory: RSS of one process holding a real trainer and a real streamer (gRPC on
   sockets, a viewer subscribing to each run) over ``--cycles`` start -> complete ->
   released cycles; RSS after the first 10 % of cycles vs at the end (goal: within
   10 %), and the ``run-<id>`` models left (``--keep-runs``).

The machine is shared and noisy: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
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
from tensorwire import modelrepo
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.scalars import to_batch
from tensorwire.server import GrpcServer, ServerOptions
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


async def steps_per_s(store: RunStore | None, seconds: float, tmp: Path) -> tuple[float, float, float]:
    """(steps/s, the training thread's CPU ms per step, the recorder's CPU ms per step)."""
    runs = RunManager(tmp / "models", checkpoint_every_s=0, store=store, state_dir=tmp / "state")
    try:
        run = runs.start_run("spiral", {"max_steps": 0}, seed=1)
        await asyncio.sleep(1.0)  # warm-up
        tid = run.loop._thread.native_id
        clock = time.pthread_getcpuclockid(run.loop._thread.ident) if tid else None
        cpu0 = time.clock_gettime(clock) if clock is not None else 0.0
        rec0 = runs.recorder.cpu_s if runs.recorder else 0.0
        start_step, started = run.loop.status.step, time.perf_counter()
        await asyncio.sleep(seconds)
        steps = run.loop.status.step - start_step
        train_cpu = (time.clock_gettime(clock) - cpu0) if clock is not None else 0.0
        rec_cpu = (runs.recorder.cpu_s - rec0) if runs.recorder else 0.0
        return steps / (time.perf_counter() - started), 1000 * train_cpu / steps, 1000 * rec_cpu / steps
    finally:
        await runs.aclose()


async def bench_write_cost(seconds: float, rounds: int, pg_dsn: str | None) -> None:
    print(f"1. steps/s of one spiral run, store off vs on, {rounds} alternating rounds of {seconds:g} s")
    kinds = ["off", "sqlite"] + (["postgresql"] if pg_dsn else [])
    results: dict[str, list[float]] = {k: [] for k in kinds}
    train_ms: dict[str, list[float]] = {k: [] for k in kinds}
    store_ms: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            with tempfile.TemporaryDirectory() as tmp:
                store: RunStore | None = None
                if kind == "sqlite":
                    store = SqliteRunStore(Path(tmp) / "runs.sqlite3")
                elif kind == "postgresql":
                    assert pg_dsn
                    store = PostgresRunStore(postgres.fresh_database(pg_dsn))
                rate, train, rec = await steps_per_s(store, seconds, Path(tmp))
                results[kind].append(rate)
                train_ms[kind].append(train)
                store_ms[kind].append(rec)
    off = statistics.median(results["off"])
    for kind in kinds:
        med = statistics.median(results[kind])
        rounds_txt = ", ".join(f"{v:.0f}" for v in results[kind])
        print(f"   {kind:<10} median {med:8.0f} steps/s  ratio {med / off:5.3f}   ({rounds_txt})")
    print("   CPU per training step (load-independent): training thread, and the store's writer thread")
    for kind in kinds:
        train, rec = statistics.median(train_ms[kind]), statistics.median(store_ms[kind])
        print(f"   {kind:<10} training {train:6.3f} ms/step, store writer {rec:6.3f} ms/step "
              f"({100 * rec / train:4.1f} % of the training thread's CPU)")


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
                started = time.perf_counter()
                for i in range(1, cycles + 1):
                    run = (await tstub.StartRun(tpb.StartRunRequest(task="spiral", params={"max_steps": 20}))).run
                    call = sstub.Subscribe(spb.SubscribeRequest(run_id=run.run_id), timeout=30)
                    async for frame in call:
                        if frame.HasField("status") and frame.status.state == cpb.RUN_STATE_COMPLETED:
                            break
                    call.cancel()
                    if i == max(1, cycles // 10) or i == cycles:
                        await asyncio.sleep(1.5)  # releases and pruning happen
                        marks.append((i, rss_mib()))
                (first_i, first), (last_i, last) = marks[0], marks[-1]
                models = [m for m in modelrepo.list_models(settings.model_repository) if m.startswith("run-")]
                print(f"   {cycles} cycles in {time.perf_counter() - started:.0f} s; RSS {first:.0f} MiB "
                      f"after {first_i}, {last:.0f} MiB after {last_i}: {100 * (last / first - 1):+.1f} %")
                print(f"   in memory at the end: trainer {len(trainer.runs.list_runs())} runs, streamer "
                      f"{len(streamer.hub.topics)} topics; run-<id> models on disk {len(models)} "
                      f"(--keep-runs {keep_runs})")
        finally:
            await t_server.stop(0.2)
            await s_server.stop(0.2)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and cycles")
    parser.add_argument("--seconds", type=float, help="per round (default 8; --quick 4)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 4; --quick 2)")
    parser.add_argument("--cycles", type=int, help="start/stop cycles (default 2000; --quick 300; 0 = skip)")
    parser.add_argument("--keep-runs", type=int, default=200)
    parser.add_argument("--history-points", type=int, default=1_000_000, help="0 = skip")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    for name, full, quick in (("seconds", 8.0, 4.0), ("rounds", 4, 2), ("cycles", 2000, 300)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    torch.set_num_threads(1)  # as the trainer does (--torch-threads 1)
    import logging

    logging.basicConfig(level=logging.WARNING)
    with contextlib.ExitStack() as stack:
        dsn = None
        if not args.no_postgres:
            reason = postgres.unavailable_reason()
            if reason:
                print(f"(PostgreSQL skipped: {reason})")
            else:
                dsn = stack.enter_context(postgres.postgres_server())
        await bench_write_cost(args.seconds, args.rounds, dsn)
    if args.history_points:
        bench_history(args.history_points)
    if args.cycles:
        await bench_memory(args.cycles, args.keep_runs)


if __name__ == "__main__":
    asyncio.run(main())
