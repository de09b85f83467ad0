"""Keel's added latency and memory, measured against the fake upstream on this machine.

Two phases, each run in one invocation so the baseline shares the machine's noise:

1. Latency: the same closed-loop load (``--concurrency`` connections, non-streaming chat) goes straight to the fake
   upstream (the baseline), through Keel, and through a bare TCP relay (``bench/tcp_relay.py``: the two extra hops
   any proxy adds, with no HTTP and no pipeline, so the floor for a gateway on this machine), in alternating
   rounds; the figure that matters is the difference between the latency distributions. Two upstreams stand in
   for a model:

   - *jittered*: each answer takes ``--delay-ms`` ± ``--jitter-ms`` (uniform), as a real model's time varies, so
     the connections' requests arrive spread out. The bench draws the delays itself and sends each in the request
     (``metadata.fake_delay_s``, which Keel passes on), the same sequence to every target of a round: the targets'
     latencies then differ by what the path adds, not by which delays each happened to get. (With delays drawn by
     the fake, the median of 3,000 uniform ± 25 ms delays varies by about ± 0.5 ms from one sample to the next,
     as much as what was being measured.)
   - *lock-step*: each answer takes exactly ``--delay-ms``. Closed-loop clients of a fixed-delay upstream fall into
     step, so all ``--concurrency`` requests reach Keel within a fraction of a millisecond of each other and the
     last one waits for Keel to handle the other fifteen: a worst case that measures queueing on one event loop
     rather than the cost of a request.

2. Memory: ``--soak`` requests through Keel as fast as it goes (``--stream``: streamed answers), sampling Keel's
   RSS as they complete, the CPU time Keel spent per request, and at the end the spend ledger's backlog (rows not
   yet written) from ``/ready``.

Run: ``.venv/bin/python bench/gateway_overhead.py`` (``--help`` for knobs; ``--pin`` gives Keel a core of its own,
away from the load generator and the fakes, as in a deployment where those are other machines). Keel runs with its
default pipeline for the OpenAI-compatible route and its JSON request log on (to a temporary file, from which the bench
also reads the time Keel measured itself spending on each request: total minus upstream calls).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        return await resp.text()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used (a steadier figure than latency on a noisy machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def load(url: str, bodies: Sequence[bytes], concurrency: int) -> list[float]:
    """Closed loop: ``concurrency`` workers each send the next of ``bodies`` as soon as their previous request
    finishes."""
    latencies: list[float] = []
    queue = iter(bodies)
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as s:

        async def worker() -> None:
            for body in queue:
                t0 = time.perf_counter()
                async with s.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{url} answered {r.status}")
                latencies.append((time.perf_counter() - t0) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def keel_own_ms(log_path: Path, start: int, model: str) -> list[float]:
    """``latency_ms - upstream_ms`` of the request-log lines for ``model`` written after byte ``start``."""
    with log_path.open("rb") as f:
        f.seek(start)
        lines = [orjson.loads(line) for line in f if b'"keel.request"' in line]
    return [r["latency_ms"] - r["upstream_ms"] for r in lines if r.get("model") == model]


def gc_pauses(before: str, after: str) -> str:
    """Per generation, between two scrapes of Keel's /metrics: collections, total pause, and the smallest bucket
    bound every pause fitted under."""

    def values(metrics: str) -> dict[str, float]:
        rows = (line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("keel_gc_pause_seconds"))
        return {k: float(v) for k, v in rows}

    old, new = values(before), values(after)
    out = []
    for gen in ("0", "1", "2"):
        label = f'generation="{gen}"'
        delta = {k: v - old.get(k, 0.0) for k, v in new.items() if label in k}
        count = delta.get(f"keel_gc_pause_seconds_count{{{label}}}", 0.0)
        total = delta.get(f"keel_gc_pause_seconds_sum{{{label}}}", 0.0)
        bounds = [(k.split('le="')[1].split('"')[0], n) for k, n in delta.items() if "_bucket{" in k]
        worst = next((le for le, n in bounds if n >= count), "-") if count else "-"
        out.append(f"gen{gen} {count:.0f} x, {total * 1000:.0f} ms in all, each <= {worst} s")
    return "; ".join(out)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--delay-ms", type=float, default=50.0, help="the fake upstream's (mean) answer time")
    ap.add_argument("--jitter-ms", type=float, default=25.0, help="the jittered upstream's answer time varies ± this")
    ap.add_argument("--requests", type=int, default=3000, help="per round and target")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--soak", type=int, default=100_000, help="requests for the memory phase (0 to skip)")
    ap.add_argument("--stream", action="store_true", help="the memory phase streams its answers (SSE)")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="run Keel on the last core and this load generator and the fake upstreams on the others, as when "
        "clients and upstreams are other machines",
    )
    args = ap.parse_args()

    up_port, slow_port, keel_port, relay_port = free_port(), free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "keel.yaml"
        cfg.write_text(
            "logging: {level: info, format: json, requests: true}\n"
            "server: {upstream_connections: 256}\n"
            "models:\n"
            f"  - {{name: bench, model: m, api_base: 'http://127.0.0.1:{slow_port}/v1', api_key: k}}\n"
            f"  - {{name: fast, model: m, api_base: 'http://127.0.0.1:{up_port}/v1', api_key: k}}\n"
        )
        log_path = Path(tmp) / "keel.log"  # the request log: what Keel itself measured, per request
        log_file = log_path.open("wb")
        keel_cpus: set[int] | None = None
        if args.pin:
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) < 2:
                raise SystemExit("--pin needs at least 2 cores")
            keel_cpus = {cpus[-1]}
            os.sched_setaffinity(0, set(cpus[:-1]))  # this process, and the fakes it starts next
        fake = [str(BIN / "python"), "-m", "keel.testing.fake_upstream", "--no-record"]
        procs.append(subprocess.Popen([*fake, "--port", str(slow_port), "--delay-s", str(args.delay_ms / 1000)]))
        procs.append(subprocess.Popen([*fake, "--port", str(up_port)]))
        keel = subprocess.Popen(
            [str(BIN / "keel"), "serve", "--config", str(cfg), "--port", str(keel_port)],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            preexec_fn=None if keel_cpus is None else lambda: os.sched_setaffinity(0, keel_cpus),
        )
        procs.append(keel)
        procs.append(  # where Keel runs, so that it pays what Keel pays
            subprocess.Popen(
                [str(BIN / "python"), str(ROOT / "bench" / "tcp_relay.py"), str(relay_port), str(slow_port)],
                preexec_fn=None if keel_cpus is None else lambda: os.sched_setaffinity(0, keel_cpus),
            )
        )
        try:
            await wait_ready(f"http://127.0.0.1:{slow_port}/v1/models")
            await wait_ready(f"http://127.0.0.1:{up_port}/v1/models")
            await wait_ready(f"http://127.0.0.1:{keel_port}/health")
            await run_phases(args, slow_port, relay_port, keel_port, keel.pid, log_path)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            log_file.close()


async def run_phases(
    args: argparse.Namespace, upstream_port: int, relay_port: int, keel_port: int, keel_pid: int, log_path: Path
) -> None:
    messages = [
        {"role": "system", "content": "You are a phone expert."},
        {"role": "user", "content": "Which phone has the biggest battery in 2024?"},
    ]
    keel_url = f"http://127.0.0.1:{keel_port}/v1/chat/completions"
    direct_url = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
    relay_url = f"http://127.0.0.1:{relay_port}/v1/chat/completions"

    def bodies(model: str, delays: Sequence[float]) -> list[bytes]:
        return [
            orjson.dumps({"model": model, "messages": messages, "metadata": {"fake_delay_s": f"{d:.6f}"}})
            for d in delays
        ]

    print(
        f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; concurrency {args.concurrency}; "
        f"fake upstream answers in {args.delay_ms:g} ms (jittered: ± {args.jitter_ms:g} ms)"
        + ("; Keel pinned to its own core" if args.pin else "; Keel shares the cores with the load and the fakes")
    )
    for name, jitter_ms in (("jittered", args.jitter_ms), ("lock-step", 0.0)):
        rng = random.Random(1)

        def delays(n: int, jitter_ms: float = jitter_ms, rng: random.Random = rng) -> list[float]:
            return [max(0.0, args.delay_ms + rng.uniform(-jitter_ms, jitter_ms)) / 1000 for _ in range(n)]

        warm = delays(500)  # warm-up: connections, caches, lazy paths
        await load(keel_url, bodies("bench", warm), args.concurrency)
        await load(direct_url, bodies("m", warm), args.concurrency)
        await load(relay_url, bodies("m", warm), args.concurrency)
        direct: list[float] = []
        via: list[float] = []
        relayed: list[float] = []
        await asyncio.sleep(0.5)  # the request log is written in batches
        log_start = await asyncio.to_thread(os.path.getsize, log_path)
        print(f"\n{name} upstream")
        for r in range(args.rounds):
            same = delays(args.requests)  # the same delays, in the same order, for each target of the round
            d = await load(direct_url, bodies("m", same), args.concurrency)
            k = await load(keel_url, bodies("bench", same), args.concurrency)
            t = await load(relay_url, bodies("m", same), args.concurrency)
            direct += d
            via += k
            relayed += t
            print(
                f"  round {r + 1}: direct p50 {pct(d, 50):.2f} ms, via Keel p50 {pct(k, 50):.2f} ms, "
                f"via a TCP relay p50 {pct(t, 50):.2f} ms"
            )
        print(f"  latency over {len(via)} requests each (ms)")
        print(f"{'':>12} {'p50':>8} {'p90':>8} {'p99':>8} {'mean':>8}")
        for label, values in (("direct", direct), ("via Keel", via), ("via relay", relayed)):
            print(
                f"{label:>12} {pct(values, 50):8.2f} {pct(values, 90):8.2f} {pct(values, 99):8.2f} "
                f"{statistics.fmean(values):8.2f}"
            )
        for label, values in (("added", via), ("relay adds", relayed)):
            print(
                f"{label:>12} {pct(values, 50) - pct(direct, 50):8.2f} {pct(values, 90) - pct(direct, 90):8.2f} "
                f"{pct(values, 99) - pct(direct, 99):8.2f} {statistics.fmean(values) - statistics.fmean(direct):8.2f}"
                + ("   (Keel)" if values is via else "   (a bare TCP relay: two extra hops, no HTTP: the floor)")
            )
        await asyncio.sleep(0.5)
        inside = await asyncio.to_thread(keel_own_ms, log_path, log_start, "bench")
        print(
            f"{'in Keel':>12} {pct(inside, 50):8.2f} {pct(inside, 90):8.2f} {pct(inside, 99):8.2f} "
            f"{statistics.fmean(inside):8.2f}   (its own time per request, from its log: total minus upstream calls)"
        )

    if args.soak:
        fast_body = orjson.dumps({"model": "fast", "messages": messages, "stream": args.stream})
        step = max(1, args.soak // 10)
        await load(keel_url, [fast_body] * 2000, args.concurrency)
        base = rss_kib(keel_pid)
        metrics_before = await scrape(f"http://127.0.0.1:{keel_port}/metrics")
        kind = "streamed" if args.stream else "non-streaming"
        print(f"\nmemory: {args.soak} {kind} requests through Keel (upstream answers at once); Keel RSS in MiB")
        print(f"  after warm-up: {base / 1024:.1f}")
        done = 0
        t0 = time.perf_counter()
        cpu0 = cpu_s(keel_pid)
        samples = []
        while done < args.soak:
            await load(keel_url, [fast_body] * step, args.concurrency)
            done += step
            samples.append(rss_kib(keel_pid))
            print(f"  {done:>7} requests: {samples[-1] / 1024:.1f}  ({done / (time.perf_counter() - t0):.0f} req/s)")
        print(
            f"  growth over the soak: {(samples[-1] - base) / 1024:+.1f} MiB; over its second half: "
            f"{(samples[-1] - samples[len(samples) // 2 - 1]) / 1024:+.1f} MiB"
        )
        print(f"  Keel CPU per request: {(cpu_s(keel_pid) - cpu0) / done * 1e6:.0f} us (user + system, all threads)")
        await asyncio.sleep(2)  # one ledger flush interval, and then some
        ledger = orjson.loads(await scrape(f"http://127.0.0.1:{keel_port}/ready"))["checks"]["database"]
        metrics_after = await scrape(f"http://127.0.0.1:{keel_port}/metrics")
        print(f"  spend ledger 2 s later: {ledger['ledger_pending']} rows pending, {ledger['ledger_dropped']} dropped")
        print(f"  garbage collector over the soak: {gc_pauses(metrics_before, metrics_after)}")


if __name__ == "__main__":
    asyncio.run(main())
