"""What admission costs per request: admit + settle on MemoryCounters and on RedisCounters (a real redis-server
on loopback, started by this script on a free port and stopped at the end).

Each request carries a typical set of limits: requests and tokens per minute for its key and its user (4
windows), concurrency for both (2 leases) and the key's, team's and global budgets (3 budgets). Keys are drawn
from ``--keys`` API keys, with limits high enough never to refuse, so every request takes the full path.

Two phases per backend: latency with one request in flight (p50/p99 of admit+settle), then throughput with
``--concurrency`` requests in flight on one event loop (what one Keel worker would push).

Run: ``.venv/bin/python bench/counters.py`` (``--help`` for knobs). Uses uvloop, as uvicorn does when installed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import uvloop

from keel.state import BudgetLimit, ConcurrencyLimit, Counters, MemoryCounters, RedisCounters, WindowLimit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def limits(rng: random.Random, keys: int) -> tuple[list[WindowLimit], list[ConcurrencyLimit], list[BudgetLimit]]:
    k = rng.randrange(keys)
    user, team = k // 4, k // 16
    windows = [
        WindowLimit(f"rpm:key:{k}", 10**9, 1),
        WindowLimit(f"rpm:user:{user}", 10**9, 1),
        WindowLimit(f"tpm:key:{k}", 10**12, 1500),
        WindowLimit(f"tpm:user:{user}", 10**12, 1500),
    ]
    leases = [ConcurrencyLimit(f"par:key:{k}", 10**6), ConcurrencyLimit(f"par:user:{user}", 10**6)]
    budgets = [
        BudgetLimit(f"budget:key:{k}:2025-06", 10**15, 2_000, 40 * 86400),
        BudgetLimit(f"budget:team:{team}:2025-06", 10**15, 2_000, 40 * 86400),
        BudgetLimit("budget:global:2025-06-01", None, 2_000, 2 * 86400),
    ]
    return windows, leases, budgets


def wait_for_pong(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    sys.exit("redis-server did not answer PING")


async def one_request(counters: Counters, rng: random.Random, keys: int) -> float:
    windows, leases, budgets = limits(rng, keys)
    started = time.perf_counter()
    admission = await counters.admit(uuid.uuid4().hex, windows, leases, budgets)
    assert admission.allowed, admission.denial
    await counters.settle(admission, [1, 1, 1200, 1200], 1_234)
    return time.perf_counter() - started


async def measure(name: str, counters: Counters, args: argparse.Namespace) -> None:
    rng = random.Random(1)
    for _ in range(args.warmup):
        await one_request(counters, rng, args.keys)
    latencies = [await one_request(counters, rng, args.keys) for _ in range(args.requests)]

    async def worker(n: int) -> None:
        for _ in range(n):
            await one_request(counters, rng, args.keys)

    started = time.perf_counter()
    per_task = args.requests // args.concurrency
    await asyncio.gather(*(worker(per_task) for _ in range(args.concurrency)))
    throughput = per_task * args.concurrency / (time.perf_counter() - started)
    ms = [x * 1000 for x in latencies]
    cuts = statistics.quantiles(ms, n=100)
    p50, p99 = cuts[49], cuts[98]
    print(f"{name:>8} {p50:>9.3f} {p99:>9.3f} {statistics.fmean(ms):>9.3f} {throughput:>12,.0f}")


async def run(args: argparse.Namespace, redis_url: str) -> None:
    print(f"{args.requests} requests per phase; 4 windows, 2 leases, 3 budgets each; {args.keys} API keys")
    print(f"{'':>8} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} {f'req/s @{args.concurrency}':>12}")
    memory = MemoryCounters()
    await measure("memory", memory, args)
    await memory.aclose()
    shared = RedisCounters(redis_url)
    await measure("redis", shared, args)
    await shared.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000, help="per phase and backend")
    ap.add_argument("--warmup", type=int, default=2_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--keys", type=int, default=10_000, help="distinct API keys (users = keys/4, teams = keys/16)")
    args = ap.parse_args()

    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found; install it with `bash scripts/system-deps.sh`")
    port, root = free_port(), Path(tempfile.mkdtemp(prefix="keel-bench-redis-"))
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_pong(port)
        uvloop.run(run(args, f"redis://127.0.0.1:{port}/0"))
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
