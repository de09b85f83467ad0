"""Config loading: interpolation, validation messages that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.config import ConfigError, interpolate, load_config, parse_config

BASE = """
models:
  - name: smart
    provider: openai
    model: gpt-4o-mini
    api_base: ${BASE:-http://127.0.0.1:1/v1}
    api_key: ${KEY:-}
    timeout_s: ${TIMEOUT:-30}
    fallbacks: [cheap]
  - name: cheap
    model: gpt-4o-mini
"""


def test_issue_shape_parses_and_resolves_defaults() -> None:
    cfg = parse_config(BASE, env={})
    smart = cfg.models[0]
    assert smart.timeout_s == 30.0
    [d] = smart.resolved_deployments()
    assert (d.id, d.provider, d.model, d.api_base, d.api_key) == (
        "smart",
        "openai",
        "gpt-4o-mini",
        "http://127.0.0.1:1/v1",
        None,
    )
    [cheap] = cfg.models[1].resolved_deployments()
    assert cheap.api_base == "https://api.openai.com/v1"


def test_interpolation_from_env() -> None:
    cfg = parse_config(BASE, env={"BASE": "http://up:9/v1/", "KEY": "sk-test", "TIMEOUT": "7.5"})
    [d] = cfg.models[0].resolved_deployments()
    assert d.api_base == "http://up:9/v1"
    assert d.api_key == "sk-test"
    assert cfg.models[0].timeout_s == 7.5


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("${A:-d}", {"A": ""}, "d"),
        ("${A-d}", {"A": ""}, ""),
        ("${A-d}", {}, "d"),
        ("a$${A}b", {"A": "x"}, "a${A}b"),
        ("${A}/${B:-2}", {"A": "1"}, "1/2"),
    ],
)
def test_interpolate_forms(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


def test_unset_variable_without_default_says_how_to_fix() -> None:
    with pytest.raises(ConfigError, match=r"OPENAI_KEY is not set.*\$\{OPENAI_KEY:-default\}"):
        parse_config("models:\n  - name: a\n    model: m\n    api_key: ${OPENAI_KEY}\n", env={})


def test_secret_is_not_in_repr() -> None:
    cfg = parse_config(BASE, env={"KEY": "sk-very-secret"})
    assert "sk-very-secret" not in repr(cfg)
    assert "sk-very-secret" not in repr(cfg.models[0].resolved_deployments())


def test_misspelled_key_names_key_and_suggests() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config("models:\n  - name: a\n    model: m\n    timout_s: 3\n", env={})
    text = str(exc.value)
    assert "models[0].timout_s" in text
    assert "did you mean 'timeout_s'" in text


def test_wrong_type_names_key_and_value() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config("models:\n  - name: a\n    model: m\n    max_retries: lots\n", env={})
    assert "models[0].max_retries" in str(exc.value)
    assert "'lots'" in str(exc.value)


def test_unknown_fallback_and_provider() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(
            "models:\n  - {name: a, model: m, provider: opnai, fallbacks: [chep]}\n  - {name: cheap, model: m}\n",
            env={},
        )
    text = str(exc.value)
    assert "unknown model 'chep' (did you mean 'cheap'?)" in text
    assert "unknown provider 'opnai' (did you mean 'openai'?)" in text


def test_duplicate_names_and_empty_models() -> None:
    with pytest.raises(ConfigError, match="listed twice"):
        parse_config("models:\n  - {name: a, model: m}\n  - {name: a, model: n}\n", env={})
    with pytest.raises(ConfigError, match="models: required key is missing"):
        parse_config("server: {port: 1}\n", env={})


def test_weighted_deployments() -> None:
    cfg = parse_config(
        """
models:
  - name: smart
    deployments:
      - {model: gpt-4o-mini, api_base: "http://a/v1", weight: 3}
      - {model: gpt-4o-mini, api_base: "http://b/v1"}
""",
        env={},
    )
    ds = cfg.models[0].resolved_deployments()
    assert [(d.id, d.api_base, d.weight) for d in ds] == [
        ("smart#0", "http://a/v1", 3.0),
        ("smart#1", "http://b/v1", 1.0),
    ]


def test_inline_and_deployments_conflict() -> None:
    with pytest.raises(ConfigError, match="not both"):
        parse_config("models:\n  - name: a\n    model: m\n    deployments: [{model: x}]\n", env={})


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config("models: [", env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_sample_app_config_is_valid() -> None:
    cfg = load_config(Path(__file__).parents[1] / "examples" / "phone-assistant" / "keel.yaml")
    assert cfg.models[0].name == "assistant"
