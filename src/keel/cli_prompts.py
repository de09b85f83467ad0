"""``keel prompts``: managed prompts straight against the configured database, so it works with Keel stopped.
Running workers follow label moves and experiments within the prompt cache's TTL (5 s).

::

    keel prompts push examples/phone-assistant/prompts [--label staging]
    keel prompts list | show NAME [--version V] | diff NAME V1 V2
    keel prompts label NAME VERSION --label production       # VERSION may be `latest`
    keel prompts promote NAME --from staging --to production
    keel prompts rollback NAME --label production            # back to what it pointed at before
    keel prompts experiment start NAME --treatment 4 --percent 10 [--shadow] | stop NAME | list NAME
    keel prompts stats NAME [--versions 3,4] [--days 7]

Relies on :func:`keel.cli_admin.install` having run (``keel.cli.main`` installs both).
"""

from __future__ import annotations

import getpass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from keel import cli_admin
from keel.cli_admin import _run, _show
from keel.errors import InvalidRequest
from keel.views import diff, experiment_view

if TYPE_CHECKING:  # the ORM loads only for the commands that use it: `keel --help` stays quick
    from keel.prompts import PromptService
    from keel.prompts.models import PromptExperiment, PromptLabelMove
    from keel.prompts.models import PromptVersion as VersionRow
    from keel.store import Database

__all__ = ["install"]

prompts_app = typer.Typer(no_args_is_help=True, help="Versioned prompts: push, label, roll back, experiment.")
experiment_app = typer.Typer(no_args_is_help=True, help="A/B and shadow experiments on a label.")
prompts_app.add_typer(experiment_app, name="experiment")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Config file.")]
By = Annotated[str | None, typer.Option("--by", help="Who makes the change (default: cli:$USER).")]
Reason = Annotated[str | None, typer.Option("--reason", help="Why, for the history.")]
LabelOpt = Annotated[str, typer.Option("--label", "-l", help="The label.")]


def install(app: typer.Typer) -> None:
    app.add_typer(prompts_app, name="prompts")


def _service(db: Database, **options: Any) -> PromptService:
    from keel.prompts import PromptService

    return PromptService(db, **options)


def _by(by: str | None) -> str:
    return by or f"cli:{getpass.getuser()}"


def _version(raw: str) -> int | Literal["latest"]:
    if raw == "latest":
        return "latest"
    if not raw.isdigit():
        typer.secho(f"version must be a number or `latest`, got {raw!r}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    return int(raw)


def _move_line(move: PromptLabelMove | None, name: str, label: str) -> str:
    if move is None:
        return f"{name}@{label}: unchanged"
    before = "(new)" if move.from_version is None else f"v{move.from_version}"
    return f"{name}@{label}: {before} -> v{move.to_version}"


@prompts_app.command("push")
def push(
    directory: Annotated[
        Path | None, typer.Argument(help="A directory of prompt files (*.yaml); default: the config's prompts_dir.")
    ] = None,
    label: Annotated[str | None, typer.Option("--label", "-l", help="Also point this label at them.")] = None,
    init_label: Annotated[
        str | None,
        typer.Option("--init-label", help="Point this label at them where it is not set yet."),
    ] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="What changed.")] = None,
    by: By = None,
    config: ConfigOpt = None,
) -> None:
    """Sync prompt files into Keel: a new version for each changed file, nothing for unchanged ones."""
    assert cli_admin._load is not None
    if directory is None:
        prompts_dir = cli_admin._load(config)[1].prompts_dir
        if prompts_dir is None:
            typer.secho("give a directory, or set prompts_dir in the config", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        directory = Path(prompts_dir)
    try:
        from keel.prompts import load_prompt_dir

        files = load_prompt_dir(directory)
    except InvalidRequest as exc:
        typer.secho(f"error: {exc.message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    if not files:
        typer.secho(f"no prompt files (*.yaml, *.yml) in {directory}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    models = [m.name for m in cli_admin._load(config)[1].models]

    async def work(db: Database) -> list[str]:
        service = _service(db, known_models=models)
        lines = []
        for f in files:
            row, created = await service.push(f.name, f.content(), by=_by(by), message=message)
            lines.append(f"{f.name}: v{row.version} {'created' if created else 'unchanged'}")
            if label is not None:
                move = await service.repo.set_label(f.name, label, row.version, by=_by(by))
                lines.append("  " + _move_line(move, f.name, label))
            if init_label is not None and all(x.label != init_label for x in await service.repo.labels(f.name)):
                move = await service.repo.set_label(f.name, init_label, row.version, by=_by(by))
                lines.append("  " + _move_line(move, f.name, init_label))
        return lines

    for line in _run(config, work):
        typer.echo(line)


@prompts_app.command("list")
def list_prompts(config: ConfigOpt = None) -> None:
    """Every prompt, its latest version and its labels."""
    rows = _run(config, lambda db: _service(db).repo.list())
    for prompt, labels in rows:
        pointers = " ".join(f"{lb}=v{v}" for lb, v in labels.items()) or "(no labels)"
        typer.echo(f"{prompt.name:<32} latest v{prompt.latest_version:<4} {pointers}")


@prompts_app.command("show")
def show(
    name: str,
    version: Annotated[str | None, typer.Option("--version", "-v", help="Print one version (or `latest`).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Versions, labels and who moved them when; with --version, that version's content."""
    if version is not None:
        row = _run(config, lambda db: _service(db).repo.get_version(name, _version(version)))
        typer.echo(f"# {name}@{row.version} by {row.created_by} at {row.created_at:%Y-%m-%d %H:%M:%S} UTC")
        from keel.prompts.repository import content_of

        typer.echo(content_of(row).to_yaml(), nl=False)
        return

    async def work(db: Database) -> tuple[list[VersionRow], dict[str, int], list[PromptLabelMove]]:
        repo = _service(db).repo
        versions = await repo.versions(name)
        labels = {lb.label: lb.version for lb in await repo.labels(name)}
        return versions, labels, await repo.history(name, limit=20)

    versions, labels, history = _run(config, work)
    typer.echo(f"{name}")
    typer.echo("labels:   " + (" ".join(f"{lb}=v{v}" for lb, v in labels.items()) or "(none)"))
    typer.echo("versions:")
    for v in reversed(versions):
        pointed = ",".join(lb for lb, n in labels.items() if n == v.version)
        typer.echo(
            f"  v{v.version:<4} {v.created_at:%Y-%m-%d %H:%M} {v.created_by:<20} {v.content_hash[:12]} "
            f"{v.message or ''}{f'  <- {pointed}' if pointed else ''}"
        )
    typer.echo("label history (newest first):")
    for m in history:
        before = "-" if m.from_version is None else f"v{m.from_version}"
        why = f"  ({m.reason})" if m.reason else ""
        when = f"{m.changed_at:%Y-%m-%d %H:%M:%S}"
        typer.echo(f"  {when} {m.label:<12} {before} -> v{m.to_version} {m.action} by {m.changed_by}{why}")


@prompts_app.command("diff")
def diff_cmd(name: str, v1: str, v2: str, config: ConfigOpt = None) -> None:
    """Unified diff of two versions."""

    async def work(db: Database) -> str:
        repo = _service(db).repo
        return diff(await repo.get_version(name, _version(v1)), await repo.get_version(name, _version(v2)))

    typer.echo(_run(config, work) or "(no differences)", nl=False)


@prompts_app.command("label")
def label_cmd(
    name: str, version: str, label: LabelOpt, reason: Reason = None, by: By = None, config: ConfigOpt = None
) -> None:
    """Point a label at a version (`latest` for the newest)."""
    move = _run(
        config, lambda db: _service(db).repo.set_label(name, label, _version(version), by=_by(by), reason=reason)
    )
    typer.echo(_move_line(move, name, label))


@prompts_app.command("promote")
def promote(
    name: str,
    source: Annotated[str, typer.Option("--from", help="The label whose version to promote.")] = "staging",
    target: Annotated[str, typer.Option("--to", help="The label to move.")] = "production",
    reason: Reason = None,
    by: By = None,
    config: ConfigOpt = None,
) -> None:
    """Point one label at the version another points at (staging -> production)."""

    async def work(db: Database) -> PromptLabelMove | None:
        repo = _service(db).repo
        current = {lb.label: lb.version for lb in await repo.labels(name)}
        if source not in current:
            raise InvalidRequest(f"prompt {name!r} has no label {source!r}")
        return await repo.set_label(
            name, target, current[source], by=_by(by), reason=reason or f"promoted from {source}"
        )

    typer.echo(_move_line(_run(config, work), name, target))


@prompts_app.command("rollback")
def rollback(
    name: str, label: LabelOpt = "production", reason: Reason = None, by: By = None, config: ConfigOpt = None
) -> None:
    """Move a label back to the version it pointed at before its last move."""
    move = _run(config, lambda db: _service(db).repo.rollback(name, label, by=_by(by), reason=reason))
    typer.echo(_move_line(move, name, label))


@experiment_app.command("start")
def experiment_start(
    name: str,
    treatment: Annotated[str, typer.Option("--treatment", "-t", help="The version to try (or `latest`).")],
    percent: Annotated[float, typer.Option("--percent", "-p", help="Share of units that get it, 0-100.")],
    label: LabelOpt = "production",
    unit: Annotated[str, typer.Option("--unit", help="user or session: what the split is stable for.")] = "user",
    shadow: Annotated[bool, typer.Option("--shadow", help="Run it on a copy of the traffic; never shown.")] = False,
    factor: Annotated[float, typer.Option("--rollback-factor", help="Stop when its error rate is over this x.")] = 2.0,
    min_requests: Annotated[int, typer.Option("--min-requests", help="...over at least this many requests.")] = 100,
    no_auto: Annotated[bool, typer.Option("--no-auto-rollback", help="Never stop it automatically.")] = False,
    by: By = None,
    config: ConfigOpt = None,
) -> None:
    """Start an experiment: the label's version is the control."""
    row = _run(
        config,
        lambda db: _service(db).repo.start_experiment(
            name,
            label,
            _version(treatment),
            percent,
            by=_by(by),
            unit=unit,
            shadow=shadow,
            rollback_error_factor=None if no_auto else factor,
            rollback_min_requests=min_requests,
        ),
    )
    _show(experiment_view(row))


@experiment_app.command("stop")
def experiment_stop(
    name: str,
    label: LabelOpt = "production",
    promote_: Annotated[bool, typer.Option("--promote", help="Also point the label at the treatment.")] = False,
    reason: Reason = None,
    by: By = None,
    config: ConfigOpt = None,
) -> None:
    """Stop the experiment running on a label."""

    async def work(db: Database) -> PromptExperiment | None:
        repo = _service(db).repo
        running = [e for e in await repo.experiments(name, active=True) if e.label == label]
        if not running:
            raise InvalidRequest(f"no experiment is running on {name}@{label}")
        return await repo.stop_experiment(running[0].id, by=_by(by), reason=reason, promote=promote_)

    stopped = _run(config, work)
    if stopped is not None:
        _show(experiment_view(stopped))


@experiment_app.command("list")
def experiment_list(name: str, config: ConfigOpt = None) -> None:
    _show([experiment_view(e) for e in _run(config, lambda db: _service(db).repo.experiments(name))])


@prompts_app.command("stats")
def stats(
    name: str,
    versions: Annotated[str | None, typer.Option(help="Only these versions, comma-separated.")] = None,
    days: Annotated[float | None, typer.Option(help="Only the last N days.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Compare versions: requests, error rate, latency, cost, tokens and feedback, from the ledger."""
    wanted = [_version_number(v) for v in versions.split(",")] if versions else None
    since = datetime.now(UTC) - timedelta(days=days) if days else None
    rows = _run(config, lambda db: _service(db).stats(name, wanted, since))
    typer.echo(
        f"{'version':>8} {'requests':>9} {'errors':>7} {'p50 ms':>9} {'p95 ms':>9} {'avg USD':>11} "
        f"{'tok in':>7} {'tok out':>7} {'up':>4} {'down':>4}"
    )
    for r in rows:
        d = r.as_dict()
        cost = "-" if r.avg_cost_usd is None else f"{r.avg_cost_usd:.6f}"
        typer.echo(
            f"{'fallback' if r.version is None else 'v' + str(r.version):>8} {r.requests:>9} {r.error_rate:>7.1%} "
            f"{_ms(r.p50_ms):>9} {_ms(r.p95_ms):>9} {cost:>11} {d['avg_prompt_tokens'] or 0:>7} "
            f"{d['avg_completion_tokens'] or 0:>7} {r.thumbs_up:>4} {r.thumbs_down:>4}"
        )


def _version_number(raw: str) -> int:
    value = _version(raw.strip())
    if value == "latest":
        typer.secho("--versions takes version numbers", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    return value


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
