"""Boot and idle cost of a repository full of the trainer's ``run-<id>`` models.

    .venv/bin/python tests/benchmarks/bench_lazy_models.py [--runs 200] [--idle-s 10]
        [--tree DIR ...]

A repository holds ``spiral`` plus ``--runs`` models ``run-<id>`` (the spiral kind,
written by ``modelrepo.write_version`` as the trainer writes its checkpoints), and
``spiral`` alone beside it. For each tree (``--tree``: a checkout of the code to run,
e.g. ``git archive`` of main for "before"; default this one) and each repository,
one ``python -m services.inference`` process (polling every second, as by default):
seconds from spawn to ServerReady, its RSS then, READY models in the index, its CPU
seconds over ``--idle-s`` idle seconds (the polls), then the first ModelInfer of one
``run-<id>`` model (its latency: a lazy load included) and the RSS after it. Rounds
alternate the trees, the best of ``--rounds`` is shown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.bench_inference import cpu_seconds, free_port, stop_server
from tests.benchmarks.bench_triton_repo import rss_mib, wait_ready


def make_repo(root: Path, runs: int) -> None:
    import torch

    from tensorwire.serving import modelrepo
    from tensorwire.serving.models import build_model

    torch.manual_seed(0)
    state = build_model("spiral").state_dict()
    modelrepo.write_version(root, "spiral", "spiral", state)
    for i in range(runs):
        modelrepo.write_version(root, f"run-{i:012x}", "spiral", state)


def start(tree: Path, repo: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "services.inference", "--host", "127.0.0.1", "--port", str(port),
           "--http-port", "-1", "--metrics-port", "-1", "--model-repository", str(repo),
           "--poll-interval-s", "1", "--log-level", "WARNING"]
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port


def first_infer_s(port: int, model: str) -> float:
    import grpc
    import numpy as np

    from tensorwire.inference import grpc_service_pb2 as pb
    from tensorwire.inference import grpc_service_pb2_grpc as pb_grpc

    x = np.zeros((1, 2), dtype=np.float32)
    request = pb.ModelInferRequest(model_name=model, raw_input_contents=[x.tobytes()])
    request.inputs.add(name="points", datatype="FP32", shape=[1, 2])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        t0 = time.perf_counter()
        stub.ModelInfer(request, timeout=60)
        return time.perf_counter() - t0


def ready_count(port: int) -> int:
    import grpc

    from tensorwire.inference import grpc_service_pb2 as pb
    from tensorwire.inference import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        index = pb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    return len(index.models)


SCAN_COST = """
import asyncio, json, sys, time
from pathlib import Path
import torch  # imported before the first RSS reading: it is not what is measured
from services.inference.repository import ModelRepository, RepositoryOptions

def rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

async def main():
    before = rss_mib()
    repo = ModelRepository(Path(sys.argv[1]), RepositoryOptions(poll_interval_s=0))
    t0 = time.perf_counter()
    await repo.start()
    boot_s = time.perf_counter() - t0
    after = rss_mib()
    t0 = time.perf_counter()
    for _ in range(20):
        await repo.scan()
    poll_ms = (time.perf_counter() - t0) / 20 * 1e3
    await repo.aclose()
    print(json.dumps({"scan_boot_s": boot_s, "repo_rss_mib": after - before, "poll_ms": poll_ms}))

asyncio.run(main())
"""


def scan_cost(tree: Path, repo: Path) -> dict[str, float]:
    """In one process of ``tree``'s code, torch already imported: seconds of the boot
    scan (``ModelRepository.start``), the RSS it added, milliseconds per poll (``scan``)."""
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", SCAN_COST, str(repo)], cwd=tree, env=env, capture_output=True,
                         text=True, timeout=1800, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def measure(tree: Path, repo: Path, idle_s: float, run_model: str | None) -> dict[str, float]:
    t0 = time.perf_counter()
    proc, port = start(tree, repo)
    try:
        wait_ready(port, timeout_s=1800)
        boot_s = time.perf_counter() - t0
        rss = rss_mib(proc.pid)
        ready = ready_count(port)
        cpu0 = cpu_seconds(proc.pid)
        time.sleep(idle_s)
        idle_cpu = cpu_seconds(proc.pid) - cpu0
        first = first_infer_s(port, run_model) if run_model else float("nan")
        return {**scan_cost(tree, repo), "boot_s": boot_s, "rss_mib": rss, "ready": ready, "idle_cpu_pct": 100 * idle_cpu / idle_s,
                "first_infer_ms": first * 1e3, "rss_after_mib": rss_mib(proc.pid)}
    finally:
        stop_server(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tree", type=Path, action="append", default=[])
    args = parser.parse_args()
    trees = args.tree or [ROOT]
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        make_repo(one, 0)
        make_repo(many, args.runs)
        cases = [(tree, label, repo, run) for tree in trees for label, repo, run in (
            ("spiral only", one, None), (f"spiral + {args.runs} run-<id>", many, f"run-{args.runs - 1:012x}"))]
        best: dict[tuple[str, str], dict[str, float]] = {}
        for round_ in range(args.rounds):
            for tree, label, repo, run in (cases if round_ % 2 == 0 else cases[::-1]):
                got = measure(tree, repo, args.idle_s, run)
                key = (str(tree), label)
                prev = best.get(key)
                best[key] = got if prev is None else {k: min(prev[k], v) if k != "ready" else v
                                                      for k, v in got.items()}
        for (tree, label), r in best.items():
            print(f"{tree:22s} {label:22s} process: boot {r['boot_s']:6.2f} s  RSS {r['rss_mib']:6.1f} MiB  "
                  f"READY {r['ready']:4.0f}  idle CPU {r['idle_cpu_pct']:4.1f} %  "
                  f"first run infer {r['first_infer_ms']:6.1f} ms  RSS after {r['rss_after_mib']:6.1f} MiB | "
                  f"core: boot scan {r['scan_boot_s']:6.3f} s  +{r['repo_rss_mib']:5.1f} MiB  "
                  f"poll {r['poll_ms']:7.2f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
