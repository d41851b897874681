"""The two shapes of a native inference frontend, measured where they differ: how a
batch reaches Python.

    .venv/bin/python tests/benchmarks/bench_frontend_shapes.py [--batches 20000] [--rows 64]

- in-process (what services/inference/native.py does): a grpc++ thread of the
  extension takes the GIL and calls Python once per batch; measured from a native
  thread of the built extension (``_native.handoff_ns``), the callee touching a
  numpy view of the batch;
- out-of-process (Triton's Python backend): the frontend process writes the batch
  into shared memory and wakes a Python worker process, which answers through the
  same memory; measured as a round trip over a pipe with the batch copied into a
  ``multiprocessing.shared_memory`` block (both ends Python here, so the frontend's
  end costs a little more than a native one would).

Prints microseconds per batch hand-off (round trip) for both and their ratio, with
the load average (a shared machine: compare the ratio, measured in one run).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _worker(name: str, size: int, requests: int, replies: int) -> None:
    block = shared_memory.SharedMemory(name=name)
    view = np.ndarray((size,), np.uint8, buffer=block.buf)
    while True:
        if os.read(requests, 1) != b"x":  # b"q" (or EOF): done
            break
        view[0] ^= 1  # touch the batch, as a forward would read it
        os.write(replies, b"x")
    del view
    block.close()


def out_of_process_us(batches: int, nbytes: int) -> float:
    block = shared_memory.SharedMemory(create=True, size=nbytes)
    try:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        proc = multiprocessing.get_context("fork").Process(target=_worker, args=(block.name, nbytes, req_r, rep_w))
        proc.start()
        view = np.ndarray((nbytes,), np.uint8, buffer=block.buf)
        batch = np.ones(nbytes, np.uint8)
        start = time.perf_counter()
        for _ in range(batches):
            view[:] = batch  # the frontend copies the batch in
            os.write(req_w, b"x")
            os.read(rep_r, 1)
        elapsed = time.perf_counter() - start
        os.write(req_w, b"q")
        proc.join()
        for fd in (req_r, req_w, rep_r, rep_w):
            os.close(fd)
        del view
        return elapsed / batches * 1e6
    finally:
        block.close()
        block.unlink()


def in_process_us(batches: int, nbytes: int) -> float:
    from services.inference import _native  # type: ignore[attr-defined]

    batch = np.ones(nbytes, np.uint8)
    column = np.empty_like(batch)

    def run_batch() -> None:
        column[:] = batch  # the frontend's copy into the column (done natively in the real path)
        column[0] ^= 1

    return float(_native.handoff_ns(run_batch, batches)) / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20000)
    parser.add_argument("--rows", type=int, default=64, help="rows per batch (2 FP32 values a row)")
    args = parser.parse_args()
    nbytes = args.rows * 2 * 4
    inside = in_process_us(args.batches, nbytes)
    outside = out_of_process_us(args.batches, nbytes)
    load1, _, _ = os.getloadavg()
    print(f"bench_frontend_shapes: {args.batches} batches of {args.rows} rows ({nbytes} bytes), "
          f"load average {load1:.1f} on {os.cpu_count()} cores")
    print(f"  in-process (GIL hand-off from a native thread): {inside:7.2f} us per batch")
    print(f"  out-of-process (shared memory + pipe wake-ups): {outside:7.2f} us per batch")
    print(f"  ratio out/in: {outside / inside:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
