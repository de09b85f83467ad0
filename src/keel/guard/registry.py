"""Guard registry: check names to classes through the ``keel.guards`` entry points (built-in checks register the
same way a plugin does), and building every app's runners from config once, at start.

A check class is called with the config entry's own options as keyword arguments. Whatever goes wrong while
building (an unknown option, a bad value, a plugin that is not installed) becomes one :class:`ConfigError` that
names the key, so a bad guardrail config stops Keel at start instead of failing requests later.
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson

from keel.config import AppConfig, ConfigError, GuardCheckConfig, KeelConfig
from keel.guard.base import Check, Direction, GuardInput
from keel.guard.runner import ConfiguredCheck, GuardRunner

if TYPE_CHECKING:
    from keel.llm.router import Router

__all__ = ["AppGuards", "build_app_guards", "build_guards", "check_class", "warm_up"]

log = logging.getLogger("keel.guard")

Embed = Callable[[list[str]], Awaitable[npt.NDArray[np.float32]]]
_WARMUP_TEXT = "Hello! Which phone has the best battery life?"
_WARMUP_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class AppGuards:
    """One app's guardrails, built: a runner per direction (None when the app has no checks for it), the refusal
    a blocked request gets, and the stream window."""

    app: str
    input: GuardRunner | None
    output: GuardRunner | None
    refusal: str
    window_chars: int


@cache
def check_class(name: str) -> Callable[..., Check]:
    """The class registered as ``name`` in the ``keel.guards`` entry points."""
    for ep in entry_points(group="keel.guards"):
        if ep.name == name:
            cls: Callable[..., Check] = ep.load()
            return cls
    known = ", ".join(sorted(ep.name for ep in entry_points(group="keel.guards")))
    raise ConfigError(f"unknown guardrail check {name!r} (installed: {known}); install its plugin or fix `check:`")


def _option_problem(cls: Callable[..., Check], options: dict[str, Any]) -> str | None:
    """An unknown option, said with the known ones (a constructor's TypeError would not list them)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    known = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in _SERVICES]
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"unknown option {key!r}{hint}; its options are: {', '.join(known) or 'none'}"
    return None


# What Keel itself hands a check whose constructor asks for it by name; never settable from keel.yaml.
_SERVICES = ("router", "base_dir")


def _accepts(cls: Callable[..., Check], name: str) -> bool:
    try:
        return name in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def _build(spec: GuardCheckConfig, services: dict[str, Any]) -> Check:
    try:
        cls = check_class(spec.check)
    except ConfigError:
        raise
    except Exception as exc:  # an entry point whose module is missing or broken
        raise ConfigError(
            f"check {spec.check!r} cannot be loaded ({type(exc).__name__}: {exc}); install what it needs or remove it"
        ) from None
    options = spec.options
    if reserved := [k for k in options if k in _SERVICES]:
        raise ConfigError(f"check {spec.check!r}: {reserved[0]!r} is set by Keel, not in keel.yaml; remove it")
    problem = _option_problem(cls, options)
    if problem:
        raise ConfigError(f"check {spec.check!r}: {problem}")
    given = {k: v for k, v in services.items() if v is not None and _accepts(cls, k)}
    try:
        return cls(**options, **given)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"check {spec.check!r}: {exc}") from None


def _runner(
    app: str,
    direction: Direction,
    specs: list[GuardCheckConfig],
    where: str,
    built: dict[bytes, Check],
    services: dict[str, Any],
) -> tuple[GuardRunner | None, list[str]]:
    checks: list[ConfiguredCheck] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for j, spec in enumerate(specs):
        key = orjson.dumps([spec.check, spec.options], option=orjson.OPT_SORT_KEYS)  # equal checks are shared
        try:
            if key not in built:
                built[key] = _build(spec, services)
        except ConfigError as exc:
            problems.append(f"{where}.{direction}[{j}]: {exc}")
            continue
        check = built[key]
        seen[spec.check] = seen.get(spec.check, 0) + 1
        label = spec.check if seen[spec.check] == 1 else f"{spec.check}#{seen[spec.check]}"
        checks.append(ConfiguredCheck(label, check, spec.action, spec.timeout_ms / 1000, spec.on_error))
    return (GuardRunner(app, direction, checks) if checks else None), problems


def build_app_guards(
    app: AppConfig,
    where: str = "guardrails",
    built: dict[bytes, Check] | None = None,
    services: dict[str, Any] | None = None,
) -> AppGuards:
    """Build one app's checks; raises :class:`ConfigError` naming every bad entry. ``services``: what Keel hands
    checks that ask for it (``router``, ``base_dir``)."""
    cache_: dict[bytes, Check] = {} if built is None else built
    svc = services or {}
    g = app.guardrails
    inp, problems_in = _runner(app.name, "input", g.input, where, cache_, svc)
    out, problems_out = _runner(app.name, "output", g.output, where, cache_, svc)
    if problems_in or problems_out:
        raise ConfigError("\n".join(f"  - {p}" for p in [*problems_in, *problems_out]))
    return AppGuards(app.name, inp, out, g.refusal, g.stream_window_chars)


def build_guards(config: KeelConfig, router: Router | None = None) -> dict[str, AppGuards]:
    """Every app's guardrails (apps without any are left out, so routes skip them at no cost). Checks that ask
    for them get ``router`` (their model calls go through Keel's router) and ``base_dir`` (the config file's
    folder, which relative paths in their options are resolved against)."""
    services: dict[str, Any] = {"router": router, "base_dir": config.base_dir}
    out: dict[str, AppGuards] = {}
    problems: list[str] = []
    built: dict[bytes, Check] = {}
    for i, app in enumerate(config.apps):
        if not (app.guardrails.input or app.guardrails.output):
            continue
        try:
            out[app.name] = build_app_guards(app, f"apps[{i}].guardrails", built, services)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("invalid guardrails configuration:\n" + "\n".join(problems))
    return out


async def warm_up(guards: dict[str, AppGuards], embed: Embed | None) -> None:
    """Run every check once on a harmless text, so lazy loads (models, encodings, example embeddings) happen at
    start and not under the first user's timeout. A failure is logged; the check's ``on_error`` policy will apply
    to requests if it persists."""
    done: set[int] = set()
    for g in guards.values():
        for runner in (r for r in (g.input, g.output) if r is not None):
            for c in runner.checks:
                if id(c.check) in done:
                    continue
                done.add(id(c.check))
                inp = GuardInput(_WARMUP_TEXT, runner.direction, app=g.app, embed=embed)
                try:
                    async with asyncio.timeout(_WARMUP_TIMEOUT_S):
                        await c.check.check(inp)
                except Exception as exc:
                    log.warning(
                        "guardrail check %s of app %s failed its warm-up: %s: %s",
                        c.label,
                        g.app,
                        type(exc).__name__,
                        exc,
                    )
