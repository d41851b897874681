"""What security costs ModelInfer, in one run: no auth vs bearer tokens vs tokens + TLS.

    .venv/bin/python tests/benchmarks/bench_auth.py [--duration-s 5] [--rounds 3] [--concurrency 16]

Three ``services.inference`` processes on the spiral MLP (same repository): plain,
``--auth-token-file`` (every call carries a viewer token), and the same with
``--tls-cert/--tls-key``. Each round measures the three back to back with the
closed-loop generator of bench_inference.py, so the ratios compare neighbours in
time on a shared machine; prints RPS, p50/p99 and server CPU per request per round
and the median ratios (goal of the security issue: auth costs <= 3 % RPS at c=16).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.bench_inference import (
    cpu_seconds,
    free_port,
    load_in_process,
    stop_server,
)


def start(repo: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "services.inference", "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", "-1", "--http-port", "-1", "--model-repository", str(repo),
           "--poll-interval-s", "0", "--log-level", "WARNING", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port


def _check_cost_us(tokens: Path, token: str, calls: int = 200_000) -> float:
    """Time of the per-call check as the server runs it (metadata as gRPC hands it over)."""
    import time

    from tensorwire.rpc.auth import Authorizer, TokenFile

    check = Authorizer(TokenFile(tokens)).checker("/inference.GRPCInferenceService/ModelInfer")
    assert check is not None
    metadata = (("user-agent", "grpc-python-asyncio/1.85.1"), ("authorization", f"Bearer {token}"))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            check(metadata)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    import torch

    from tensorwire.serving import modelrepo
    from tensorwire.serving.models import build_model
    from tests.support.certs import Authority

    tmp = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    repo = tmp / "models"
    torch.manual_seed(0)
    modelrepo.write_version(repo, "spiral", "spiral", build_model("spiral").state_dict())
    token = "bench-viewer-token-0123456789"
    tokens = tmp / "tokens.csv"
    tokens.write_text(f'{token},bench,1,"tensorwire:viewer"\n')
    ca = Authority("bench", tmp / "tls")
    cert, key = ca.issue("inference")
    auth = ["--auth-token-file", str(tokens)]
    servers = {
        "plain": (start(repo, []), {}),
        "auth": (start(repo, auth), {"TW_BENCH_TOKEN": token}),
        "auth+tls": (start(repo, [*auth, "--tls-cert", str(cert), "--tls-key", str(key)]),
                     {"TW_BENCH_TOKEN": token, "TW_BENCH_CA": str(ca.ca_path)}),
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    c = args.concurrency
    print(f"bench_auth: c={c}, {args.duration_s:g}s per point, {args.rounds} rounds, spiral MLP")
    try:
        for round_ in range(args.rounds):
            for name, ((proc, port), env) in servers.items():
                host = "localhost" if "TW_BENCH_CA" in env else "127.0.0.1"
                cpu0 = cpu_seconds(proc.pid)
                r = load_in_process(f"{host}:{port}", c, args.duration_s, args.warmup_s, env=env)
                served = r["rps"] * (args.duration_s + args.warmup_s)
                r["cpu_us"] = (cpu_seconds(proc.pid) - cpu0) / max(served, 1) * 1e6
                results[name].append(r)
                print(f"  round {round_ + 1} {name:9s} {r['rps']:7.0f} rps  p50 {r['p50_ms']:5.2f} ms  "
                      f"p99 {r['p99_ms']:6.2f} ms  cpu {r['cpu_us']:4.0f} us/req  errors {r['errors']}",
                      flush=True)
    finally:
        for (proc, _), _ in servers.values():
            stop_server(proc)
    base = results["plain"]
    check_us = _check_cost_us(tokens, token)
    plain_cpu = statistics.median(r["cpu_us"] for r in base)
    print(f"\nthe role check alone: {check_us:.2f} us per call = {check_us / plain_cpu * 100:.2f} % of "
          f"the plain server's CPU per request ({plain_cpu:.0f} us); on a shared machine this is "
          "steadier than the RPS ratios below")
    print("\nmedian ratio to plain, paired by round:")
    for name in ("auth", "auth+tls"):
        rps = statistics.median(r["rps"] / b["rps"] for r, b in zip(results[name], base))
        cpu = statistics.median(r["cpu_us"] / b["cpu_us"] for r, b in zip(results[name], base))
        print(f"  {name:9s} RPS x{rps:.3f}  server CPU/request x{cpu:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
