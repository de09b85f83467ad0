"""``keel prompts``: push, label, promote, diff, show, rollback, experiments and stats against a real database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from keel import cli, cli_admin, cli_prompts

KEEL = str(Path(sys.executable).parent / "keel")


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    """The commands as `keel.cli.main` installs them, on an app of their own (in process: `keel` takes seconds to
    start)."""
    app = typer.Typer()
    cli_admin.install(app, cli._load)
    cli_prompts.install(app)
    return app


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "keel.yaml"
    path.write_text(
        f"database_url: sqlite+aiosqlite:///{tmp_path}/keel.db\n"
        "models:\n  - {name: smart, model: up, api_base: 'http://127.0.0.1:9/v1'}\n"
    )
    return path


def run(app: typer.Typer, config: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, ["prompts", *args, "--config", str(config)])
    assert result.exit_code == code, result.output
    return result.output


def write(directory: Path, system: str) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "assistant.yaml").write_text(
        f"name: assistant\nvariables:\n  who:\nsystem: |\n  {system}\n  Be brief.\n"
    )
    return directory


def test_push_label_promote_diff_show_rollback(app: typer.Typer, config: Path, tmp_path: Path) -> None:
    prompts = write(tmp_path / "prompts", "You help {{ who }}.")
    assert run(app, config, "push", str(prompts), "--by", "alice") == "assistant: v1 created\n"
    assert run(app, config, "push", str(prompts)) == "assistant: v1 unchanged\n"
    assert run(app, config, "label", "assistant", "latest", "--label", "production") == (
        "assistant@production: (new) -> v1\n"
    )
    write(prompts, "You help {{ who }} with phones.")
    out = run(app, config, "push", str(prompts), "--label", "staging", "-m", "phones only", "--by", "bob")
    assert out == "assistant: v2 created\n  assistant@staging: (new) -> v2\n"
    assert run(app, config, "promote", "assistant", "--from", "staging", "--to", "production") == (
        "assistant@production: v1 -> v2\n"
    )

    diff = run(app, config, "diff", "assistant", "1", "2")
    assert "-  You help {{ who }}.\n+  You help {{ who }} with phones.\n" in diff
    assert run(app, config, "diff", "assistant", "2", "latest") == "(no differences)"

    shown = run(app, config, "show", "assistant")
    assert "labels:   production=v2 staging=v2" in shown
    assert "bob" in shown and "phones only" in shown and "promoted from staging" in shown
    version = run(app, config, "show", "assistant", "--version", "1")
    assert version.startswith("# assistant@1 by alice at ") and "You help {{ who }}." in version

    assert run(app, config, "rollback", "assistant", "--label", "production", "--reason", "worse") == (
        "assistant@production: v2 -> v1\n"
    )
    assert "no earlier version" in run(app, config, "rollback", "assistant", "-l", "production", code=1)
    listing = run(app, config, "list")
    assert listing.split() == ["assistant", "latest", "v2", "production=v1", "staging=v2"]

    started = run(app, config, "experiment", "start", "assistant", "--treatment", "2", "--percent", "20", "--shadow")
    assert '"active": true' in started and '"shadow": true' in started
    run(app, config, "experiment", "start", "assistant", "-t", "2", "-p", "5", code=1)
    stopped = run(app, config, "experiment", "stop", "assistant", "--reason", "seen enough")
    assert '"active": false' in stopped and '"stop_reason": "seen enough"' in stopped
    assert run(app, config, "stats", "assistant", "--versions", "1,2", "--days", "1").startswith(" version")


def test_push_refuses_invalid_files_naming_them(app: typer.Typer, config: Path, tmp_path: Path) -> None:
    prompts = write(tmp_path / "prompts", "{{ who.__class__ }}")
    out = run(app, config, "push", str(prompts), code=1)
    assert "attribute '__class__' is not allowed" in out
    (prompts / "assistant.yaml").write_text("name: assistant\nsystem: x\ntemperature: 2\n")
    out = run(app, config, "push", str(prompts), code=1)
    assert "assistant.yaml" in out and "temperature" in out
    assert run(app, config, "list") == ""


def test_keel_prompts_is_installed(config: Path) -> None:
    out = subprocess.run([KEEL, "prompts", "list", "--config", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
