"""Guardrail quality and cost on public datasets: injection, PII, topic, and the latency of a chat turn's input rail.

    .venv/bin/python bench/guardrails.py [--split dev|test] [--data DIR] [-v]
    .venv/bin/python bench/guardrails.py --build-data     # regenerate the derived files in src/keel/guard/data/

The data lives outside the repository (``--data``, default ``../shared/benchmarks`` from the repo root; each folder's
SOURCES.md says where it comes from). ``--split test`` (the default) reports held-out figures; ``--split dev`` is
what the thresholds were tuned on. The splits:

============================  ==============================================  ==========================================
dataset                       dev                                             test
============================  ==============================================  ==========================================
deepset/prompt-injections     train rows with sha1(text) % 5 == 0 (left out   upstream ``test`` split (116 rows)
                              of the shipped training data)
XSTest safe prompts           (not used for tuning: test only)                all 250 safe prompts
Quora phone questions         ``device_specific`` with sha1(text) % 5 == 0    the other ``device_specific`` questions
CLINC150 (off-topic, benign)  ``val`` split                                   ``test`` split
presidio-research PII         ``extra`` (generated_large)                     ``test`` (synth_dataset_v2)
============================  ==============================================  ==========================================

The team's own retrieval questions (``bench/data/retrieval_questions.jsonl``) are reported with both splits.

Injection, PII and topic run the checks directly; the latency section builds the sample app's input guardrails from
``examples/phone-assistant/keel.yaml`` (size, injection, pii, topic) and runs them through :class:`GuardRunner`,
exactly as a chat turn does, with a warm embedder whose cache has never seen the messages (so every message pays for
its embedding).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from keel.config import load_config
from keel.embed import LocalEmbedder
from keel.guard.base import GuardInput
from keel.guard.injection import InjectionCheck
from keel.guard.pii import ENTITIES, find_urls, scan
from keel.guard.registry import build_guards
from keel.guard.topic import CHITCHAT_INTENTS, NEAR_DOMAIN_INTENTS, TopicCheck

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "benchmarks"
GUARD_DATA = ROOT / "src" / "keel" / "guard" / "data"
CONFIG = ROOT / "examples" / "phone-assistant" / "keel.yaml"
KB = ROOT / "examples" / "phone-assistant" / "kb"
QUESTIONS = ROOT / "bench" / "data" / "retrieval_questions.jsonl"
APP = "phone-assistant"
CLINC_PER_INTENT = 10  # rows of each CLINC150 train intent shipped in clinc_train.jsonl

# CLINC's out-of-scope queries are out of *its* scope; some are phone questions, on-topic here.
PHONE_WORDS = re.compile(r"(?i)\b(?:phones?|android|iphone|ios|samsung|galaxy|pixel|smartphones?|mobile|cell ?phone)\b")
GERMAN = re.compile(r"(?i)\b(?:und|der|die|das|ist|nicht|ich|du|sie|wie|was|warum|mir|dich|bitte|jetzt|alle)\b|[äöüß]")
# presidio-research entity types -> Keel's; the others have no recognizer (names only after a cue, see pii.py).
PRESIDIO: dict[str, str] = {e: e for e in ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE")}
PRESIDIO |= {"US_SSN": "US_SSN", "IP_ADDRESS": "IP_ADDRESS"}


def fold(text: str) -> int:
    """The stable split bucket of a text: 0 is dev."""
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 5


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def rate(hits: int, total: int) -> str:
    return f"{hits / total:6.1%} ({hits}/{total})" if total else "   n/a"


class Data:
    """The benchmark files of one split, read from ``--data``."""

    def __init__(self, root: Path, split: str) -> None:
        self.root, self.split = root, split
        deepset = jsonl(root / "deepset-prompt-injections" / "prompts.jsonl")
        if split == "test":
            self.injection = [r for r in deepset if r["split"] == "test"]
        else:
            self.injection = [r for r in deepset if r["split"] == "train" and fold(r["text"]) == 0]
        self.xstest_safe = (
            [r["text"] for r in jsonl(root / "xstest" / "prompts.jsonl") if r["label"] == "safe"]
            if split == "test"
            else []
        )
        phone = [r["text"] for r in jsonl(root / "qqp-phone-domain" / "questions.jsonl") if r["device_specific"]]
        self.phone = [t for t in phone if (fold(t) == 0) == (split == "dev")]
        rows = jsonl(QUESTIONS)
        self.retrieval = [r.get("question") or r["conversation"][-1]["content"] for r in rows if r["answer"]]
        self.clinc = [
            r
            for r in jsonl(root / "clinc150-oos" / "queries.jsonl")
            if r["split"] == ("val" if split == "dev" else "test")
        ]
        presidio = "extra" if split == "dev" else "test"
        self.pii = [r for r in jsonl(root / "presidio-pii" / "pii.jsonl") if r["split"] == presidio]


# --- injection ---------------------------------------------------------------------------------------------------


async def injection(data: Data, embed: Callable[..., Any], verbose: bool) -> None:
    full, rules, model = InjectionCheck(), InjectionCheck(model=False), InjectionCheck(heuristics=False)
    await full.warm(embed)

    async def flagged(check: InjectionCheck, texts: Iterable[str]) -> list[bool]:
        return [bool(await check.check(GuardInput(t, "input", embed=embed))) for t in texts]

    texts = [r["text"] for r in data.injection]
    labels = [r["binary"] == 1 for r in data.injection]
    name = "deepset test split" if data.split == "test" else "deepset dev (train fold 0)"
    print(f"\n== prompt injection (threshold {full.threshold}) ==")
    for label, check in (("rules + model", full), ("phrase rules only", rules), ("model only", model)):
        got = await flagged(check, texts)
        tp = sum(g and y for g, y in zip(got, labels, strict=True))
        fp = sum(g and not y for g, y in zip(got, labels, strict=True))
        print(f"{name}, {label:17s}: catch rate {rate(tp, sum(labels))}, false blocks {rate(fp, labels.count(False))}")
        if check is full:
            german = [bool(GERMAN.search(t)) for t in texts]
            for lang, want in (("German-looking", True), ("other", False)):
                pos = [g for g, y, d in zip(got, labels, german, strict=True) if y and d == want]
                print(f"    attacks, {lang:14s}: caught {rate(sum(pos), len(pos))}")
            if verbose:
                for t, g, y in zip(texts, got, labels, strict=True):
                    if g != y:
                        print(f"    {'missed' if y else 'false block'}: {t[:110]!r}")
    benign_sets = [
        ("XSTest safe prompts", data.xstest_safe),
        ("Quora phone questions", data.phone),
        ("retrieval questions (team's)", data.retrieval),
        (f"CLINC150 {'val' if data.split == 'dev' else 'test'} (everyday requests)", [r["text"] for r in data.clinc]),
    ]
    for label, benign in benign_sets:
        if not benign:
            print(f"{label}: test split only")
            continue
        got = await flagged(full, benign)
        print(f"{label}: false blocks {rate(sum(got), len(got))}")
        if verbose:
            for t, g in zip(benign, got, strict=True):
                if g:
                    print(f"    false block: {t[:110]!r}")


# --- PII ---------------------------------------------------------------------------------------------------------


def pii(data: Data, verbose: bool) -> None:
    print(
        f"\n== PII recognizers (presidio-research {'synth_dataset_v2' if data.split == 'test' else 'generated_large'}"
        f", {len(data.pii)} texts; a gold span counts as found when a same-type match overlaps it) =="
    )
    found, total, correct, predicted = Counter[str](), Counter[str](), Counter[str](), Counter[str]()
    unsupported = Counter[str]()
    urls_found = urls_total = 0
    misses: dict[str, list[str]] = defaultdict(list)
    for row in data.pii:
        text = row["text"]
        matches = scan(text, ENTITIES)
        gold = [(PRESIDIO.get(s["entity_type"]), s) for s in row["spans"]]
        for entity, span in gold:
            if span["entity_type"] == "DOMAIN_NAME":  # the contact-details check's URL recognizer
                urls_total += 1
                urls_found += any(u.start < span["end"] and span["start"] < u.end for u in find_urls(text))
            if entity is None:
                unsupported[span["entity_type"]] += 1
                continue
            total[entity] += 1
            hit = any(m.entity == entity and m.start < span["end"] and span["start"] < m.end for m in matches)
            found[entity] += hit
            if not hit:
                misses[entity].append(text[max(0, span["start"] - 30) : span["end"] + 10])
        for m in matches:
            predicted[m.entity] += 1
            correct[m.entity] += any(e == m.entity and m.start < s["end"] and s["start"] < m.end for e, s in gold)
    for entity in sorted(set(total) | set(predicted)):
        recall, precision = rate(found[entity], total[entity]), rate(correct[entity], predicted[entity])
        print(f"{entity:15s} recall {recall}   precision {precision}")
        if verbose:
            for miss in misses[entity][:15]:
                print(f"    missed: {miss!r}")
    print("not supported (no recognizer): " + ", ".join(f"{e} {n}" for e, n in unsupported.most_common()))
    print(f"URL recognizer (contact_details) on DOMAIN_NAME spans: recall {rate(urls_found, urls_total)}")
    domain: Counter[str] = Counter()
    questions = data.phone + data.retrieval
    for text in questions:
        domain.update(m.entity for m in scan(text))
    kb_text = [p.read_text(encoding="utf-8") for p in sorted(KB.rglob("*")) if p.is_file()]
    kb_matches = Counter(m.entity for t in kb_text for m in scan(t))
    print(
        f"default entities on {len(questions)} phone questions: {sum(domain.values())} matches "
        f"({dict(domain) or 'none'}); on the knowledge base ({sum(map(len, kb_text)) // 1000}k chars of specs): "
        f"{sum(kb_matches.values())} ({dict(kb_matches) or 'none'})"
    )


# --- topic -------------------------------------------------------------------------------------------------------


def sample_topic_options() -> dict[str, Any]:
    config = load_config(CONFIG, env={})
    app = next(a for a in config.apps if a.name == APP)
    return next(c.options for c in app.guardrails.input if c.check == "topic")


async def topic(data: Data, embed: Callable[..., Any], verbose: bool) -> None:
    sample = TopicCheck(**sample_topic_options(), base_dir=CONFIG.parent)
    configs = {f"sample app ({len(sample.allowed)} allowed, {len(sample.denied)} denied examples)": sample}
    clinc = data.clinc
    groups: dict[str, list[str]] = {
        "off-topic intents": [
            r["text"] for r in clinc if not r["is_oos"] and r["intent"] not in CHITCHAT_INTENTS | NEAR_DOMAIN_INTENTS
        ],
        "out-of-scope queries": [r["text"] for r in clinc if r["is_oos"] and not PHONE_WORDS.search(r["text"])],
        "small talk (should pass)": [r["text"] for r in clinc if r["intent"] in CHITCHAT_INTENTS],
        "phone-ish intents (find_phone, make_call, ...)": [
            r["text"] for r in clinc if r["intent"] in NEAR_DOMAIN_INTENTS
        ],
    }
    dropped = sum(1 for r in clinc if r["is_oos"] and PHONE_WORDS.search(r["text"]))
    print("\n== topic rail (threshold, margin, chitchat_threshold from the check's defaults unless configured) ==")
    print(
        f"CLINC150 {'val' if data.split == 'dev' else 'test'}: every query is off-topic for a phone assistant except "
        f"small talk; {dropped} out-of-scope queries that mention phones are left out"
    )
    for name, check in configs.items():
        await check.warm(embed)

        async def off(texts: Sequence[str], check: TopicCheck = check) -> list[bool]:
            return [bool(await check.check(GuardInput(t, "input", embed=embed))) for t in texts]

        print(f"-- {name}")
        for label, texts in (("Quora phone questions", data.phone), ("retrieval questions (team's)", data.retrieval)):
            got = await off(texts)
            print(f"   false rejects, {label}: {rate(sum(got), len(got))}")
            if verbose:
                for t, g in zip(texts, got, strict=True):
                    if g:
                        print(f"       rejected: {t[:110]!r}")
        for label, texts in groups.items():
            got = await off(texts)
            passed = len(got) - sum(got)
            kind = "accepted" if "should pass" in label or "phone-ish" in label else "false accepts"
            print(f"   {kind}, CLINC {label}: {rate(passed, len(got))}")


# --- latency -----------------------------------------------------------------------------------------------------


async def latency(data: Data, messages: int) -> None:
    config = load_config(CONFIG, env={})
    guards = build_guards(config)[APP]
    assert guards.input is not None
    runner = guards.input
    embedder = LocalEmbedder()  # a cache that has seen none of the messages below
    embedder.load()
    for c in runner.checks:  # example vectors come from the disk cache; fit the injection model
        warm = getattr(c.check, "warm", None)
        if warm is not None:
            await warm(embedder.embed)
    for text in ("warm-up one", "Which phone has the best battery?", "thanks!"):
        await runner.run(GuardInput(text, "input", app=APP, embed=embedder.embed))
    pool = [r["text"] for r in data.injection] + data.phone + [r["text"] for r in data.clinc]
    rng = np.random.default_rng(7)
    texts = list(dict.fromkeys(pool[i] for i in rng.permutation(len(pool))))[:messages]
    embed_ms, total_ms, short_ms, model_ms = [], [], [], []
    blocked = Counter[str]()
    for text in texts:
        inp = GuardInput(text, "input", app=APP, embed=embedder.embed)
        start = time.perf_counter()
        await inp.embedding()
        embedded = time.perf_counter()
        verdict = await runner.run(inp)
        done = time.perf_counter()
        embed_ms.append((embedded - start) * 1000)
        total_ms.append((done - start) * 1000)
        if len(text) <= 200:
            short_ms.append(total_ms[-1])
        blocked[verdict.action] += 1
    for text in texts:  # the model call alone, without the embedder's batching window and thread hop
        start = time.perf_counter()
        embedder.encode([text])
        model_ms.append((time.perf_counter() - start) * 1000)
    await embedder.aclose()

    def pct(xs: list[float]) -> str:
        p50, p95, p99 = np.percentile(xs, [50, 95, 99])
        return f"p50 {p50:5.1f} ms, p95 {p95:5.1f} ms, p99 {p99:5.1f} ms"

    labels = ", ".join(c.label for c in runner.checks)
    print(f"\n== input guardrails of {APP} ({labels}) per message, one shared embedding, warm embedder ==")
    median = np.median([len(t) for t in texts])
    print(f"{len(texts)} messages (deepset, Quora phone questions, CLINC; median {median:.0f} chars)")
    print(f"  total (embedding + checks): {pct(total_ms)}")
    print(f"  of which the embedding:     {pct(embed_ms)}")
    print(f"  (the model call alone:      {pct(model_ms)})")
    print(f"  messages <= 200 chars ({len(short_ms)}): {pct(short_ms)}")
    print(f"  verdicts: {dict(blocked)}")
    prompt = yaml.safe_load((CONFIG.parent / "prompts" / f"{APP}.yaml").read_text(encoding="utf-8"))
    await output_latency(guards.output, prompt["system"], messages)


async def output_latency(runner: Any, system_prompt: str, answers: int) -> None:
    """The output rail on answer-sized text (1-2 KB paragraphs of the sample knowledge base): regex checks only, so
    this is where a pathological pattern would show."""
    if runner is None:
        return
    pages = sorted((CONFIG.parent / "kb" / "phones").glob("*.md"))
    texts = [p.read_text(encoding="utf-8")[:1500] for p in pages][:answers]
    ms = []
    for text in texts:
        start = time.perf_counter()
        await runner.run(GuardInput(text, "output", app=APP, context=text, system_prompt=system_prompt))
        ms.append((time.perf_counter() - start) * 1000)
    p50, p99, worst = np.percentile(ms, [50, 99, 100])
    labels = ", ".join(c.label for c in runner.checks)
    print(f"\n== output guardrails of {APP} ({labels}) per answer ==")
    print(f"{len(texts)} answers of up to 1,500 chars: p50 {p50:.2f} ms, p99 {p99:.2f} ms, worst {worst:.2f} ms")


# --- shipped data ------------------------------------------------------------------------------------------------


def build_data(root: Path) -> None:
    """Regenerate the derived example files (train splits only, see src/keel/guard/data/NOTICE.md)."""
    deepset = jsonl(root / "deepset-prompt-injections" / "prompts.jsonl")
    rows = [{"text": r["text"], "label": r["binary"]} for r in deepset if r["split"] == "train" and fold(r["text"])]
    write(GUARD_DATA / "injection_deepset.jsonl", rows)
    clinc = json.loads((root / "clinc150-oos" / "data_full.json").read_text(encoding="utf-8"))
    domains = json.loads((root / "clinc150-oos" / "domains.json").read_text(encoding="utf-8"))
    domain_of = {intent: domain for domain, intents in domains.items() for intent in intents}
    rank: Counter[str] = Counter()
    sample = []
    for text, intent in clinc["train"]:
        if rank[intent] < CLINC_PER_INTENT:
            sample.append({"text": text, "intent": intent, "domain": domain_of[intent], "rank": rank[intent]})
        rank[intent] += 1
    write(GUARD_DATA / "clinc_train.jsonl", sample)


def write(path: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    changed = not path.exists() or path.read_text(encoding="utf-8") != text
    path.write_text(text, encoding="utf-8")
    print(f"{path.relative_to(ROOT)}: {len(rows)} rows{' (changed)' if changed else ' (unchanged)'}")


async def main(args: argparse.Namespace) -> None:
    data = Data(args.data, args.split)
    print(f"split: {args.split}; data: {args.data}")
    embedder = LocalEmbedder()
    embedder.load()
    if "injection" in args.only:
        await injection(data, embedder.embed, args.verbose)
    if "pii" in args.only:
        pii(data, args.verbose)
    if "topic" in args.only:
        await topic(data, embedder.embed, args.verbose)
    await embedder.aclose()
    if "latency" in args.only:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"\n(load average before the latency run: {load} on {os.cpu_count()} cores)")
        await latency(data, args.messages)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--split", choices=["dev", "test"], default="test", help="test: held out (default); dev: tuned on"
    )
    parser.add_argument("--data", type=Path, default=DATA, help=f"benchmark data directory (default {DATA})")
    parser.add_argument("--messages", type=int, default=300, help="messages for the latency section")
    parser.add_argument(
        "--only",
        type=lambda v: set(v.split(",")),
        default={"injection", "pii", "topic", "latency"},
        help="comma-separated sections to run: injection,pii,topic,latency (default all)",
    )
    parser.add_argument("--build-data", action="store_true", help="regenerate src/keel/guard/data/ and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="print misses and false alarms")
    args = parser.parse_args()
    needed = ["deepset-prompt-injections", "xstest", "qqp-phone-domain", "clinc150-oos", "presidio-pii"]
    missing = [d for d in needed if not (args.data / d).is_dir()]
    if missing:
        sys.exit(
            f"benchmark data not found: {', '.join(str(args.data / d) for d in missing)}; pass --data DIR pointing "
            "at the shared benchmarks folder (one subfolder per dataset, each with its SOURCES.md)"
        )
    if args.build_data:
        build_data(args.data)
    else:
        asyncio.run(main(args))
