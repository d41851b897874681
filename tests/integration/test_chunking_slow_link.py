"""Chunked upload over a throttled link (root: network namespace + tc htb).

The same 4 MB checkpoint goes to a receiver first over the namespace's fast
loopback, then with the upload direction throttled to 8 Mbit/s. The sender must
adapt: big chunks on the fast link, the 16-32 KiB floor on the slow one; and its
bounded buffer must push back (backpressure events, never more than the bound
buffered) instead of reading the file ahead.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tensorwire.serving import modelrepo

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ip netns and tc"),
    pytest.mark.skipif(shutil.which("ip") is None or shutil.which("tc") is None,
                       reason="needs iproute2 (ip, tc)"),
]

ROOT = Path(__file__).resolve().parents[2]
PORT = 40001
BUFFER_BYTES = 256 * 1024


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"twc{secrets.token_hex(4)}"
    _sh("ip", "netns", "add", name)
    try:
        inside = ("ip", "netns", "exec", name)
        _sh(*inside, "ip", "link", "set", "dev", "lo", "up")
        _sh(*inside, "ip", "link", "set", "dev", "lo", "gso_max_segs", "1")
        _sh(*inside, "tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "10")
        _sh(*inside, "tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb",
            "rate", "10gbit")
        _sh(*inside, "tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:20", "htb",
            "rate", "8mbit", "ceil", "8mbit")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _upload(ns: str, ckpt: Path) -> dict[str, object]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.support.upload_client",
         "--target", f"127.0.0.1:{PORT}", "--file", str(ckpt), "--buffer-bytes", str(BUFFER_BYTES)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_chunks_adapt_to_a_slow_link_and_push_back(netns: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    torch.manual_seed(3)
    torch.save({"w": torch.randn(1024, 1024)}, ckpt)  # 4 MiB, incompressible
    repo = tmp_path / "repo"
    server = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "tests.support.echo_service",
         "--port", str(PORT), "--repository", str(repo)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().startswith("PORT ")
        fast = _upload(netns, ckpt)
        _sh("ip", "netns", "exec", netns, "tc", "filter", "add", "dev", "lo", "parent", "1:",
            "protocol", "ip", "u32", "match", "ip", "dport", str(PORT), "0xffff", "flowid", "1:20")
        slow = _upload(netns, ckpt)
    finally:
        server.terminate()
        server.wait(10)
    size = ckpt.stat().st_size
    assert fast["bytes"] == slow["bytes"] == size
    assert modelrepo.list_versions(repo, "slow") == [1, 2]
    # 8 Mbit/s is ~1 MB/s: 4 MiB needs > 3 s; the fast link is many times quicker.
    assert slow["elapsed_s"] > 3.0 > 4 * fast["elapsed_s"], (fast, slow)
    assert fast["first_chunk_bytes"] == slow["first_chunk_bytes"] == 64 * 1024
    assert fast["final_size_bytes"] >= 256 * 1024, fast
    assert slow["final_size_bytes"] <= 32 * 1024, json.dumps(slow)
    assert slow["backpressure_events"] > 0, slow
    assert slow["peak_buffered_bytes"] <= BUFFER_BYTES, slow
