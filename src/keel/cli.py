"""The ``keel`` command line. Every command takes ``--config FILE`` (default: ``KEEL_CONFIG``, else the sample
app's config)."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from keel.config import ConfigError, KeelConfig, default_config_path, load_config

if TYPE_CHECKING:
    from keel.guard.registry import AppGuards

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Keel: a production runtime for LLM chat apps.")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Config file (default: $KEEL_CONFIG or the sample app's).")
]


def _load(config: Path | None) -> tuple[Path, KeelConfig]:
    path = (config or default_config_path()).resolve()
    try:
        return path, load_config(path)
    except ConfigError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _check_guardrails(path: Path, cfg: KeelConfig) -> dict[str, AppGuards]:
    """Build every app's guardrail checks, as the server will at start, so a bad option is reported here."""
    from keel.guard.registry import build_guards

    try:
        return build_guards(cfg)
    except ConfigError as exc:
        typer.secho(f"{path}: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind (default: server.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: server.port).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: server.workers).")] = None,
) -> None:
    """Serve the OpenAI-compatible API and the app routes."""
    import uvicorn

    from keel.api.protocol import KeelHttpProtocol

    path, cfg = _load(config)
    _check_guardrails(path, cfg)
    host = host or cfg.server.host
    port = cfg.server.port if port is None else port
    workers = workers or cfg.server.workers
    if cfg.auth.master_key is None and not cfg.auth.allow_insecure and not _is_loopback(host):
        typer.secho(
            f"Refusing to listen on {host} without a master key: anyone who can reach it could use your models "
            "and administer Keel. Set KEEL_MASTER_KEY (or auth.master_key), or bind 127.0.0.1, or set "
            "auth.allow_insecure: true if something in front of Keel authenticates callers.",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)
    if workers > 1 and not cfg.redis_url:
        typer.secho(
            f"warning: {workers} workers without redis_url: rate limits and budgets are counted per worker, so a "
            "key may get up to N times its limits. Set redis_url to share them.",
            fg=typer.colors.YELLOW,
            err=True,
        )
    os.environ["KEEL_CONFIG"] = str(path)
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="keel-metrics-")
    base = f"http://{host}:{port}"
    typer.echo(
        f"Keel serving {path.name} on {base} ({workers} worker{'s' if workers > 1 else ''}); "
        f"models: {', '.join(m.name for m in cfg.models)}\n"
        f"  OpenAI SDK:  OpenAI(base_url='{base}/v1', api_key='unused')\n"
        f"  curl:        curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{cfg.models[0].name}", "messages": [{{"role": "user", "content": "Hi"}}]}}\'\n'
        f"  CLI:         keel chat 'Which phones have the biggest battery?' --url {base}\n"
        f"  health:      {base}/health  {base}/ready  {base}/metrics  {base}/docs"
    )
    uvicorn.run(
        "keel.app:app_factory",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http=KeelHttpProtocol,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
    )


@app.command()
def check(config: ConfigOpt = None) -> None:
    """Validate a config file and show what it defines."""
    path, cfg = _load(config)
    guards = _check_guardrails(path, cfg)
    typer.echo(f"{path}: OK")
    for m in cfg.models:
        for d in m.resolved_deployments():
            where = d.api_base or "in process"
            typer.echo(f"  {m.name:<16} {d.id:<20} {d.provider:<10} {d.model}  ({where})")
        if m.fallbacks:
            typer.echo(f"  {'':<16} fallbacks: {', '.join(m.fallbacks)}")
    for name, g in guards.items():
        for direction, runner in (("input", g.input), ("output", g.output)):
            if runner is not None:
                listed = ", ".join(f"{c.label} ({c.action})" for c in runner.checks)
                typer.echo(f"  app {name}: {direction} guardrails: {listed}")


@app.command()
def chat(
    message: Annotated[str, typer.Argument(help="What to say.")],
    model: Annotated[str | None, typer.Option(help="Model name (default: the config's first).")] = None,
    url: Annotated[str, typer.Option(help="Keel's base URL.")] = "http://127.0.0.1:8000",
    api_key: Annotated[str, typer.Option(envvar="KEEL_API_KEY", help="Bearer key, if Keel requires one.")] = "",
    config: ConfigOpt = None,
) -> None:
    """Send one message to a running Keel and stream the answer."""
    if model is None:
        model = _load(config)[1].models[0].name
    code = asyncio.run(_chat(url.rstrip("/"), model, message, api_key))
    raise typer.Exit(code)


async def _chat(base: str, model: str, message: str, api_key: str) -> int:
    import aiohttp
    import orjson

    body = {"model": model, "messages": [{"role": "user", "content": message}], "stream": True}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{base}/v1/chat/completions", json=body, headers=headers) as resp,
        ):
            if resp.status != 200:
                data = await resp.json(content_type=None)
                typer.secho(f"error {resp.status}: {data.get('error', {}).get('message')}", fg="red", err=True)
                return 1
            event = None
            async for raw in resp.content:
                line = raw.decode().strip()
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = orjson.loads(data)
                    if event == "error":
                        typer.secho(f"\nerror: {chunk['error']['message']}", fg="red", err=True)
                        return 1
                    for choice in chunk.get("choices") or []:
                        sys.stdout.write((choice.get("delta") or {}).get("content") or "")
                        sys.stdout.flush()
            sys.stdout.write("\n")
    except aiohttp.ClientConnectionError as exc:
        typer.secho(
            f"cannot reach Keel at {base} ({exc}); start it with `make run` or `keel serve`", fg="red", err=True
        )
        return 1
    return 0


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main() -> None:
    from keel import cli_ingest, cli_prompts
    from keel.cli_admin import install

    install(app, _load)
    cli_prompts.install(app)
    cli_ingest.install(app, _load)
    app()


if __name__ == "__main__":
    main()
