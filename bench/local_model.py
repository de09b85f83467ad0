"""Speed of the local llama.cpp provider on this machine: load time, time to first token, prefill and generation
tokens/s, and peak RSS, through :class:`keel.llm.local.LocalProvider` (the path requests take).

    .venv/bin/python bench/local_model.py [--model NAME] [--threads N] [--max-tokens N]

Each prompt gets its own system line so llama.cpp's prefix cache cannot hide prefill, except the follow-up turn,
which measures exactly that cache. Prefill tokens/s is prompt tokens over time to first token (queue and the first
sampled token included), so it slightly understates the raw rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any

from keel.config import Deployment, LocalModelConfig
from keel.llm.base import Timeouts
from keel.llm.local import LocalProvider
from keel.llm.local_models import CATALOG, DEFAULT_MODEL

CONTEXT = " ".join(
    f"Record {i}: the warehouse in city {i % 7} shipped {i * 13 % 97} crates of part P-{i:03d} on day {i % 28 + 1}."
    for i in range(40)
)
PROMPTS: list[tuple[str, list[dict[str, str]], dict[str, Any]]] = [
    ("short question", [{"role": "user", "content": "Explain in three sentences what a hash function is."}], {}),
    (
        "RAG ~1k tokens",
        [{"role": "user", "content": f"{CONTEXT}\n\nWhich city shipped part P-013, and how many crates? Be brief."}],
        {},
    ),
    (
        "JSON schema",
        [{"role": "user", "content": "Give a JSON object for a book with title, author and year."}],
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "book",
                    "schema": {
                        "type": "object",
                        "properties": {
                            "title": {"type": "string"},
                            "author": {"type": "string"},
                            "year": {"type": "integer"},
                        },
                        "required": ["title", "author", "year"],
                    },
                },
            }
        },
    ),
]


def _busy_cores_s() -> float:
    """CPU seconds all processes have spent, from /proc/stat (Linux)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    name: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    gen_tok_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.ttft_s


async def measure(
    provider: LocalProvider, name: str, messages: list[dict[str, str]], extra: dict[str, Any], max_tokens: int
) -> tuple[Run, str]:
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    started = time.perf_counter()
    first = last = 0.0
    text: list[str] = []
    usage: dict[str, int] = {}
    async for chunk in provider.stream(body, Timeouts()):
        if chunk["choices"] and (content := chunk["choices"][0]["delta"].get("content")):
            last = time.perf_counter()
            first = first or last
            text.append(content)
        usage = chunk.get("usage") or usage
    n = usage["completion_tokens"]
    gen = (n - 1) / (last - first) if n > 1 and last > first else float("nan")
    return Run(name, usage["prompt_tokens"], n, first - started, gen), "".join(text)


async def bench(model: str, threads: int | None, max_tokens: int, runs: int) -> None:
    local = LocalModelConfig(threads=threads, max_output_tokens=max_tokens, context_window=4096)
    deployment = Deployment(id=model, public_name=model, provider="local", model=model, api_base=None, local=local)
    started = time.perf_counter()
    provider = LocalProvider(deployment)
    while not (ready := await provider.ready())[0]:
        if "failed" in ready[1]:
            raise SystemExit(ready[1])
        await asyncio.sleep(0.02)
    load_s = time.perf_counter() - started
    print(f"model {model}: {ready[1]}")
    print(f"load (file check + llama.cpp load): {load_s:.2f} s\n")
    print(f"{'prompt':<22}{'prompt tok':>11}{'gen tok':>9}{'TTFT s':>9}{'prefill tok/s':>15}{'gen tok/s':>11}")
    results: list[Run] = []
    busy_before, own_before, wall_before = _busy_cores_s(), sum(os.times()[:2]), time.perf_counter()
    try:
        for i in range(runs):
            for name, messages, extra in PROMPTS:
                system = {"role": "system", "content": f"Run {i}.{name}: you are a concise assistant."}
                run, answer = await measure(provider, name, [system, *messages], extra, max_tokens)
                results.append(run)
                print(
                    f"{run.name:<22}{run.prompt_tokens:>11}{run.completion_tokens:>9}{run.ttft_s:>9.2f}"
                    f"{run.prefill_tok_s:>15.0f}{run.gen_tok_s:>11.1f}"
                )
                if name == "RAG ~1k tokens":
                    # Same conversation, one more turn: everything before the new question is in the KV cache.
                    turn = [
                        system,
                        *messages,
                        {"role": "assistant", "content": answer},
                        {"role": "user", "content": "And part P-020?"},
                    ]
                    follow, _ = await measure(provider, "follow-up (cached)", turn, {}, max_tokens)
                    print(
                        f"{follow.name:<22}{follow.prompt_tokens:>11}{follow.completion_tokens:>9}"
                        f"{follow.ttft_s:>9.2f}{'(cached)':>15}{follow.gen_tok_s:>11.1f}"
                    )
    finally:
        await provider.aclose()
    wall = time.perf_counter() - wall_before
    others = (_busy_cores_s() - busy_before - (sum(os.times()[:2]) - own_before)) / wall
    rag = [r for r in results if r.name == "RAG ~1k tokens"]
    free = [r for r in results if r.name != "JSON schema"]
    print(
        f"\nsummary: prefill {statistics.median(r.prefill_tok_s for r in rag):.0f} tok/s (RAG prompt), "
        f"generation {statistics.median(r.gen_tok_s for r in free):.1f} tok/s (free text), "
        f"{statistics.median(r.gen_tok_s for r in results if r.name == 'JSON schema'):.1f} tok/s (JSON schema), "
        f"TTFT {statistics.median(r.ttft_s for r in results if r.name == 'short question'):.2f} s (short prompt), "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    print(f"other processes used {max(others, 0):.2f} cores on average meanwhile (figures are noisy above ~0.1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(CATALOG))
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: Keel's, cores - 1)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(bench(args.model, args.threads, args.max_tokens, args.runs))


if __name__ == "__main__":
    main()
