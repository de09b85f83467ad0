"""``keel keys``, ``keel limits`` and ``keel usage``: administration straight against the configured database, so
it works with Keel stopped. Running workers see key changes within ``auth.key_cache_ttl_s``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from keel.config import KeelConfig
from keel.errors import KeelError
from keel.views import key_view, limits_view

if TYPE_CHECKING:
    from keel.store import Database

T = TypeVar("T")

keys_app = typer.Typer(no_args_is_help=True, help="Create, list, update and revoke virtual keys.")
limits_app = typer.Typer(no_args_is_help=True, help="Budgets and rate limits for users and teams.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Config file.")]
Loader = Callable[[Path | None], tuple[Path, KeelConfig]]
_load: Loader | None = None


def install(app: typer.Typer, loader: Loader) -> None:
    global _load
    _load = loader
    app.add_typer(keys_app, name="keys")
    app.add_typer(limits_app, name="limits")
    app.command("usage")(usage)


def _run(config: Path | None, work: Callable[[Database], Awaitable[T]]) -> T:
    from keel.store import Database, default_sqlite_url

    assert _load is not None
    cfg = _load(config)[1]

    async def go() -> T:
        db = Database.from_url(cfg.database_url or default_sqlite_url())
        try:
            await db.migrate()
            return await work(db)
        finally:
            await db.dispose()

    try:
        return asyncio.run(go())
    except KeelError as exc:
        typer.secho(f"error: {exc.message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def _show(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


Models = Annotated[str | None, typer.Option(help="Allowed models, comma-separated (default: all).")]
Budget = Annotated[float | None, typer.Option("--budget", help="Budget in US dollars.")]
Period = Annotated[str | None, typer.Option("--period", help="daily, weekly, monthly or none.")]
Soft = Annotated[float | None, typer.Option("--soft-budget", help="Downgrade threshold in US dollars.")]
Rpm = Annotated[int | None, typer.Option(help="Requests per minute.")]
Tpm = Annotated[int | None, typer.Option(help="Tokens per minute.")]
Parallel = Annotated[int | None, typer.Option("--max-parallel", help="Concurrent requests.")]


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Option("--user", help="Owner user id.")],
    team: Annotated[str | None, typer.Option("--team")] = None,
    name: Annotated[str | None, typer.Option("--name")] = None,
    models: Models = None,
    rpm: Rpm = None,
    tpm: Tpm = None,
    max_parallel: Parallel = None,
    budget: Budget = None,
    period: Period = None,
    soft_budget: Soft = None,
    expires_days: Annotated[float | None, typer.Option("--expires-days")] = None,
    config: ConfigOpt = None,
) -> None:
    """Create a key. The secret is printed once and stored only as a hash."""
    from keel.store import KeyRepository

    expires = datetime.now(UTC) + timedelta(days=expires_days) if expires_days else None

    async def work(db: Database) -> tuple[Any, str]:
        return await KeyRepository(db).create(
            user,
            team_id=team,
            name=name,
            models=_csv(models) or (),
            rpm=rpm,
            tpm=tpm,
            max_parallel=max_parallel,
            budget_usd=budget,
            budget_period=period or "none",
            soft_budget_usd=soft_budget,
            expires_at=expires,
        )

    key, secret = _run(config, work)
    _show({**key_view(key), "key": secret})
    typer.secho("Store the key now: it cannot be shown again.", fg=typer.colors.YELLOW, err=True)


@keys_app.command("list")
def keys_list(
    user: Annotated[str | None, typer.Option("--user")] = None,
    team: Annotated[str | None, typer.Option("--team")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    config: ConfigOpt = None,
) -> None:
    from keel.store import KeyRepository

    rows = _run(config, lambda db: KeyRepository(db).list(user_id=user, team_id=team, include_revoked=all_))
    for k in rows:
        state = "revoked" if k.revoked_at else "active"
        budget = f"${k.budget_usd_micros / 1e6:g}/{k.budget_period}" if k.budget_usd_micros is not None else "-"
        typer.echo(
            f"{k.id}  {k.key_prefix}…  user={k.user_id} team={k.team_id or '-'} budget={budget} "
            f"rpm={k.rpm or '-'} tpm={k.tpm or '-'} {state}"
        )


@keys_app.command("update")
def keys_update(
    key_id: str,
    models: Models = None,
    rpm: Rpm = None,
    tpm: Tpm = None,
    max_parallel: Parallel = None,
    budget: Budget = None,
    period: Period = None,
    soft_budget: Soft = None,
    config: ConfigOpt = None,
) -> None:
    """Change the options given; the others stay as they are."""
    from keel.store import KeyRepository

    changes: dict[str, Any] = {
        k: v
        for k, v in {
            "models": _csv(models),
            "rpm": rpm,
            "tpm": tpm,
            "max_parallel": max_parallel,
            "budget_usd": budget,
            "budget_period": period,
            "soft_budget_usd": soft_budget,
        }.items()
        if v is not None
    }
    key = _run(config, lambda db: KeyRepository(db).update(key_id, **changes))
    if key is None:
        typer.secho(f"no key {key_id}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    _show(key_view(key))


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigOpt = None) -> None:
    from keel.store import KeyRepository

    key = _run(config, lambda db: KeyRepository(db).revoke(key_id))
    if key is None:
        typer.secho(f"no key {key_id}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key.id} ({key.key_prefix}…)")


@limits_app.command("set")
def limits_set(
    scope: Annotated[str, typer.Argument(help="user or team")],
    scope_id: str,
    rpm: Rpm = None,
    tpm: Tpm = None,
    max_parallel: Parallel = None,
    budget: Budget = None,
    period: Period = None,
    soft_budget: Soft = None,
    config: ConfigOpt = None,
) -> None:
    """Set (replace) a user's or team's limits."""
    from keel.store import ScopeLimitsRepository

    row = _run(
        config,
        lambda db: ScopeLimitsRepository(db).upsert(
            scope,
            scope_id,
            limit_usd=budget,
            period=period or "none",
            soft_limit_usd=soft_budget,
            rpm=rpm,
            tpm=tpm,
            max_parallel=max_parallel,
        ),
    )
    _show(limits_view(row))


@limits_app.command("list")
def limits_list(config: ConfigOpt = None) -> None:
    from keel.store import ScopeLimitsRepository

    _show([limits_view(r) for r in _run(config, lambda db: ScopeLimitsRepository(db).list())])


def usage(
    group_by: Annotated[str, typer.Option("--group-by", help="key, user, team, model or day.")] = "model",
    days: Annotated[float | None, typer.Option(help="Only the last N days.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Spend and tokens per group, from the ledger."""
    from keel.store import SpendRepository

    if group_by not in ("key", "user", "team", "model", "day"):
        typer.secho("--group-by must be key, user, team, model or day", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    since = datetime.now(UTC) - timedelta(days=days) if days else None
    rows = _run(config, lambda db: SpendRepository(db).report(group_by, since, None))  # type: ignore[arg-type]
    typer.echo(f"{group_by:<32} {'requests':>9} {'prompt':>10} {'completion':>10} {'cost USD':>12}")
    for r in rows:
        cost = r["cost_usd_micros"] / 1e6 if r["cost_usd_micros"] is not None else 0.0
        unpriced = f"  (+{r['unpriced_requests']} unpriced)" if r["unpriced_requests"] else ""
        typer.echo(
            f"{r['group'] or '-':<32} {r['requests']:>9} {r['prompt_tokens']:>10} {r['completion_tokens']:>10} "
            f"{cost:>12.6f}{unpriced}"
        )
