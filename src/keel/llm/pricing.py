"""Prices and the cost of a request, in integer micro-dollars (1 USD = 1_000_000) so sums never drift.

A model's price comes from its config entry's ``price`` when given, else from the shipped table below (matched on
the upstream model id, exactly or as a dated variant such as ``gpt-4o-mini-2024-07-18``), else it is *unknown*:
the cost is ``None``, reported as such in headers, logs and the ledger, never a silent zero. Local models cost
nothing in dollars and say so explicitly.

The shipped table holds vendors' published list prices in USD per million tokens, as of late 2025; prices change,
so production deployments should set ``price`` in their config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keel.config import Deployment, ModelConfig, Price

__all__ = ["DEFAULT_PRICES", "PriceBook", "cost_micros", "estimate_cost_micros"]

# input, output, cached input ($ per 1M tokens)
DEFAULT_PRICES: Mapping[str, tuple[float, float, float | None]] = {
    "gpt-5": (1.25, 10.0, 0.125),
    "gpt-5-mini": (0.25, 2.0, 0.025),
    "gpt-5-nano": (0.05, 0.40, 0.005),
    "gpt-4.1": (2.0, 8.0, 0.50),
    "gpt-4.1-mini": (0.40, 1.60, 0.10),
    "gpt-4.1-nano": (0.10, 0.40, 0.025),
    "gpt-4o": (2.50, 10.0, 1.25),
    "gpt-4o-mini": (0.15, 0.60, 0.075),
    "gpt-4-turbo": (10.0, 30.0, None),
    "gpt-3.5-turbo": (0.50, 1.50, None),
    "o1": (15.0, 60.0, 7.50),
    "o3": (2.0, 8.0, 0.50),
    "o3-mini": (1.10, 4.40, 0.55),
    "o4-mini": (1.10, 4.40, 0.275),
    "text-embedding-3-small": (0.02, 0.0, None),
    "text-embedding-3-large": (0.13, 0.0, None),
    "text-embedding-ada-002": (0.10, 0.0, None),
    "claude-opus-4": (15.0, 75.0, 1.50),
    "claude-sonnet-4": (3.0, 15.0, 0.30),
    "claude-sonnet-4-5": (3.0, 15.0, 0.30),
    "claude-haiku-4-5": (1.0, 5.0, 0.10),
    "claude-3-7-sonnet": (3.0, 15.0, 0.30),
    "claude-3-5-sonnet": (3.0, 15.0, 0.30),
    "claude-3-5-haiku": (0.80, 4.0, 0.08),
    "claude-3-opus": (15.0, 75.0, 1.50),
    "claude-3-haiku": (0.25, 1.25, 0.03),
}

FREE = Price(input_per_mtok=0, output_per_mtok=0, cached_input_per_mtok=0)


def _shipped(upstream_model: str) -> Price | None:
    """Exact id, else the longest known id that the upstream id extends with a date or version suffix."""
    name = upstream_model.rsplit("/", 1)[-1].lower()
    best = None
    for known in DEFAULT_PRICES:
        if (name == known or name.startswith(known + "-")) and (best is None or len(known) > len(best)):
            best = known
    if best is None:
        return None
    i, o, c = DEFAULT_PRICES[best]
    return Price(input_per_mtok=i, output_per_mtok=o, cached_input_per_mtok=c)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def cost_micros(price: Price | None, usage: Mapping[str, Any] | None) -> int | None:
    """The cost of ``usage`` (an OpenAI usage object) at ``price``; ``None`` when the price is unknown."""
    if price is None:
        return None
    if not usage:
        return 0
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = min(prompt, _int(details.get("cached_tokens"))) if isinstance(details, Mapping) else 0
    cached_price = price.cached_input_per_mtok if price.cached_input_per_mtok is not None else price.input_per_mtok
    dollars_per_mtok = (
        (prompt - cached) * price.input_per_mtok + cached * cached_price + completion * price.output_per_mtok
    )
    return round(dollars_per_mtok)  # ($/1M tokens) x tokens = micro-dollars


def estimate_cost_micros(price: Price | None, prompt_tokens: int, max_output_tokens: int) -> int | None:
    """An upper-bound estimate for a budget reservation before the call."""
    if price is None:
        return None
    return round(prompt_tokens * price.input_per_mtok + max_output_tokens * price.output_per_mtok)


class PriceBook:
    """Prices per deployment id and per public model name, resolved once at start."""

    def __init__(self, models: list[ModelConfig]) -> None:
        self._by_deployment: dict[str, Price | None] = {}
        self._by_model: dict[str, Price | None] = {}
        for m in models:
            deployments = m.resolved_deployments()
            for d in deployments:
                self._by_deployment[d.id] = _resolve(m, d)
            # For estimates before a deployment is picked: the dearest of the model's deployments.
            prices = [self._by_deployment[d.id] for d in deployments]
            known = [p for p in prices if p is not None]
            self._by_model[m.name] = (
                None if len(known) < len(prices) else max(known, key=lambda p: p.input_per_mtok + p.output_per_mtok)
            )

    def for_deployment(self, deployment_id: str | None) -> Price | None:
        return self._by_deployment.get(deployment_id or "")

    def for_model(self, name: str) -> Price | None:
        return self._by_model.get(name)

    def unpriced(self) -> list[str]:
        return [d for d, p in self._by_deployment.items() if p is None]


def _resolve(model: ModelConfig, d: Deployment) -> Price | None:
    if model.price is not None:
        return model.price
    if d.provider == "local":
        return FREE
    return _shipped(d.model)
