"""Keel's configuration: the one place settings, defaults and their validation live.

One YAML file, with ``${VAR}`` / ``${VAR:-default}`` interpolated from the environment in string values
(``$${`` escapes a literal ``${``). :func:`load_config` validates everything at start and raises
:class:`ConfigError` with one line per problem, naming the key and how to fix it.

A minimal file::

    models:
      - name: smart                     # the name clients send as "model"
        provider: openai                # openai (any OpenAI-compatible server) | anthropic | local
        model: gpt-4o-mini              # the upstream's model id
        api_base: ${OPENAI_BASE_URL:-https://api.openai.com/v1}
        api_key: ${OPENAI_API_KEY:-}
        timeout_s: 30
        max_retries: 2
        fallbacks: [cheap]

A public name may list several ``deployments`` (the same model at several bases or keys) with ``weight``s.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "AccountingConfig",
    "AppConfig",
    "AuthConfig",
    "BudgetsConfig",
    "ConfigError",
    "CooldownConfig",
    "Deployment",
    "DeploymentSpec",
    "EmbeddingsConfig",
    "GuardCheckConfig",
    "GuardrailsConfig",
    "HistoryConfig",
    "KeelConfig",
    "LimitsConfig",
    "LocalModelConfig",
    "LoggingConfig",
    "ModelConfig",
    "Price",
    "PromptRef",
    "RetrievalConfig",
    "ServerConfig",
    "SessionsConfig",
    "VectorStoreConfig",
    "default_config_path",
    "load_config",
]

DEFAULT_API_BASES = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
BUILTIN_PROVIDERS = ("openai", "anthropic", "local")


class ConfigError(Exception):
    """The configuration is invalid; ``str()`` lists every problem with its fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Strict):
    """US dollars per million tokens."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cached_input_per_mtok: float | None = Field(default=None, ge=0)


class CooldownConfig(_Strict):
    """Circuit breaker per deployment: after ``failures`` retryable failures within ``window_s``, skip the
    deployment for ``cooldown_s`` (then let one trial request through)."""

    failures: int = Field(default=3, ge=1)
    window_s: float = Field(default=30.0, gt=0)
    cooldown_s: float = Field(default=30.0, ge=0)


class LocalModelConfig(_Strict):
    """Settings for ``provider: local`` (llama.cpp in process). ``model`` on the deployment names a shipped model
    unless ``path`` points at a GGUF file of your own."""

    path: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    threads: int | None = Field(default=None, ge=1)
    context_window: int = Field(default=4096, ge=256)
    max_output_tokens: int = Field(default=512, ge=1)
    max_queue: int = Field(default=8, ge=1)
    queue_timeout_s: float = Field(default=120.0, gt=0)


class DeploymentSpec(_Strict):
    """One concrete upstream for a public model name."""

    provider: str = "openai"
    model: str
    api_base: str | None = None
    api_key: SecretStr | None = None
    weight: float = Field(default=1.0, gt=0)
    extra_headers: dict[str, str] = Field(default_factory=dict)
    local: LocalModelConfig | None = None


class ModelConfig(_Strict):
    """A public model name and how to reach it. Either the single-deployment fields (``provider``, ``model``,
    ``api_base``, ``api_key``) or a ``deployments`` list."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$")
    provider: str | None = None
    model: str | None = None
    api_base: str | None = None
    api_key: SecretStr | None = None
    extra_headers: dict[str, str] = Field(default_factory=dict)
    local: LocalModelConfig | None = None
    deployments: list[DeploymentSpec] = Field(default_factory=list)

    timeout_s: float = Field(default=60.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    first_token_timeout_s: float | None = Field(default=30.0, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.25, ge=0)
    retry_max_backoff_s: float = Field(default=8.0, ge=0)
    max_retry_after_s: float = Field(default=30.0, ge=0)
    cooldown: CooldownConfig = Field(default_factory=CooldownConfig)
    fallbacks: list[str] = Field(default_factory=list)
    context_window_fallbacks: list[str] = Field(default_factory=list)
    context_window: int | None = Field(default=None, ge=1)
    price: Price | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> ModelConfig:
        inline = self.model is not None or self.provider is not None or self.api_base is not None
        if self.deployments and inline:
            raise ValueError("give either provider/model/api_base inline or a `deployments` list, not both")
        if not self.deployments and self.model is None:
            raise ValueError("missing `model` (the upstream's model id), or a `deployments` list")
        return self

    def resolved_deployments(self) -> list[Deployment]:
        specs = self.deployments or [
            DeploymentSpec(
                provider=self.provider or "openai",
                model=self.model or "",
                api_base=self.api_base,
                api_key=self.api_key,
                extra_headers=self.extra_headers,
                local=self.local,
            )
        ]
        out = []
        for i, spec in enumerate(specs):
            did = self.name if len(specs) == 1 else f"{self.name}#{i}"
            api_base = spec.api_base or DEFAULT_API_BASES.get(spec.provider)
            key = spec.api_key.get_secret_value() if spec.api_key else None
            out.append(
                Deployment(
                    id=did,
                    public_name=self.name,
                    provider=spec.provider,
                    model=spec.model,
                    api_base=api_base.rstrip("/") if api_base else None,
                    api_key=key or None,
                    weight=spec.weight,
                    extra_headers=spec.extra_headers,
                    local=spec.local,
                    context_window=self.context_window,
                )
            )
        return out


class Deployment(BaseModel):
    """A resolved deployment, what a provider is built from. ``id`` is unique across the config."""

    model_config = ConfigDict(frozen=True)

    id: str
    public_name: str
    provider: str
    model: str
    api_base: str | None
    api_key: str | None = Field(default=None, repr=False)
    weight: float = 1.0
    extra_headers: dict[str, str] = Field(default_factory=dict)
    local: LocalModelConfig | None = None
    context_window: int | None = None


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    upstream_connections: int = Field(default=512, ge=1)


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    requests: bool = True


class AuthConfig(_Strict):
    """Who may call Keel. With a master key (``KEEL_MASTER_KEY`` or ``auth.master_key``) every ``/v1`` call needs
    a Bearer key: the master key or a virtual key. Without one Keel runs open, and then refuses to listen on a
    non-loopback address unless ``allow_insecure`` says you mean it."""

    master_key: SecretStr | None = None
    allow_insecure: bool = False
    key_cache_ttl_s: float = Field(default=5.0, ge=0, le=300)


class LimitsConfig(_Strict):
    """What to do when the shared-state backend (Redis) is unreachable: ``closed`` refuses requests that have
    limits or budgets (503), ``open`` lets them through unmetered and says so in logs and ``/ready``."""

    failure_policy: Literal["closed", "open"] = "closed"


class BudgetsConfig(_Strict):
    downgrade_model: str | None = None
    global_daily_usd: float | None = Field(default=None, gt=0)
    emergency_model: str | None = None
    emergency_max_prompt_tokens: int = Field(default=4000, ge=1)
    output_tokens_estimate: int = Field(default=1024, ge=1)
    unpriced: Literal["refuse", "allow"] = "refuse"


class AccountingConfig(_Strict):
    flush_interval_s: float = Field(default=1.0, gt=0, le=60)
    max_batch: int = Field(default=500, ge=1)


class PromptRef(_Strict):
    """Which managed prompt an app uses: a name and the label to follow (moving the label is a rollback)."""

    name: str = Field(min_length=1)
    label: str = Field(default="production", min_length=1)


class HistoryConfig(_Strict):
    """How an app keeps long conversations inside the model's context window.

    ``window``: drop the oldest turns that do not fit. ``summary``: fold dropped turns into a rolling summary,
    written in the background by ``summary_model``, and keep it in the prompt. Pinned messages are never dropped.
    """

    strategy: Literal["window", "summary"] = "summary"
    max_turns: int | None = Field(default=None, ge=1)
    reserve_output_tokens: int = Field(default=512, ge=1)
    summary_model: str | None = None
    summary_max_tokens: int = Field(default=400, ge=16)


class RetrievalConfig(_Strict):
    """What an app retrieves for each turn: the ``top_k`` chunks of ``collection`` scoring at least ``min_score``
    (cosine), trimmed to ``max_context_tokens``. ``sources`` (files or folders, relative to the config file) are
    what ``keel ingest`` ingests when given no paths, so the knowledge base travels with the config."""

    collection: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
    top_k: int = Field(default=5, ge=1, le=50)
    min_score: float = Field(default=0.3, ge=-1, le=1)
    max_context_tokens: int = Field(default=1500, ge=1)
    sources: list[str] = Field(default_factory=list)


DEFAULT_REFUSAL = "Sorry, I can't help with that request."


class GuardCheckConfig(BaseModel):
    """One guardrail check in an app's ``input`` or ``output`` list.

    ``check`` names it (``size``, ``pii``, ``topic``, ... or a plugin's ``keel.guards`` entry point); ``action`` is
    what a finding does: ``block`` refuses (input: no model call; output: the answer is withheld, a stream is cut),
    ``redact`` replaces the found spans with ``<ENTITY>``, ``warn`` only logs and counts. ``timeout_ms`` bounds
    the check; ``on_error`` says what a check that raises or times out means: ``closed`` blocks
    (``guardrail_unavailable``), ``open`` lets the text through. Both are logged and counted, never silent.
    Every other key is the check's own option, passed to its constructor (checked when Keel starts).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    check: str = Field(min_length=1)
    action: Literal["block", "redact", "warn"] = "block"
    timeout_ms: float = Field(default=200, gt=0, le=600_000)
    on_error: Literal["open", "closed"] = "closed"

    @property
    def options(self) -> dict[str, Any]:
        """The check's own options (the keys beyond the four above)."""
        return dict(self.model_extra or {})


class GuardrailsConfig(_Strict):
    """An app's guardrails: the checks run on each user message (``input``) and on each answer (``output``),
    concurrently, and the ``refusal`` a blocked request gets. On a stream, output checks run on the last
    ``stream_window_chars`` characters, every quarter window of new text and at the end."""

    input: list[GuardCheckConfig] = Field(default_factory=list)
    output: list[GuardCheckConfig] = Field(default_factory=list)
    stream_window_chars: int = Field(default=400, ge=64, le=100_000)
    refusal: str = Field(default=DEFAULT_REFUSAL, min_length=1)


class AppConfig(_Strict):
    """A chat application: the model, prompt, history, retrieval and guardrails its sessions use."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str
    prompt: PromptRef | None = None
    system_prompt: str | None = None
    history: HistoryConfig = Field(default_factory=HistoryConfig)
    retrieval: RetrievalConfig | None = None
    guardrails: GuardrailsConfig = Field(default_factory=GuardrailsConfig)


class EmbeddingsConfig(_Strict):
    """The one embedder Keel shares (retrieval, semantic cache, topic guardrails).

    ``local`` (default): all-MiniLM-L6-v2 (384 dimensions) as an int8 ONNX model from installed packages, run in
    process by onnxruntime: no network, no key. ``openai``: any OpenAI-compatible ``/v1/embeddings`` upstream
    (``api_base``, ``api_key``, ``model`` required). Concurrent callers' texts are coalesced into batches of up to
    ``batch_size``; the vectors of the last ``cache_size`` distinct texts are kept, since the same user message is
    embedded by several stages."""

    provider: Literal["local", "openai"] = "local"
    model: str | None = None
    api_base: str | None = None
    api_key: SecretStr | None = None
    batch_size: int = Field(default=16, ge=1, le=2048)
    cache_size: int = Field(default=4096, ge=0)

    @model_validator(mode="after")
    def _provider_fields(self) -> EmbeddingsConfig:
        if self.provider == "openai" and not self.model:
            raise ValueError("`model` is required for provider openai (e.g. text-embedding-3-small)")
        if self.provider == "local" and self.model not in (None, "all-MiniLM-L6-v2"):
            raise ValueError(
                f"`model`: the local provider ships only all-MiniLM-L6-v2 (got {self.model!r}); "
                "remove `model` or use provider openai"
            )
        return self


class VectorStoreConfig(_Strict):
    """Where chunk vectors live. ``local`` (default): files under ``path`` (default ``$KEEL_HOME/vectors``), exact
    search in process, no server. ``pgvector``: a PostgreSQL database with the pgvector extension at ``url``
    (``postgresql://user:password@host:5432/db``), for several hosts sharing one index."""

    backend: Literal["local", "pgvector"] = "local"
    path: str | None = None
    url: SecretStr | None = None

    @model_validator(mode="after")
    def _backend_fields(self) -> VectorStoreConfig:
        if self.backend == "pgvector" and self.url is None:
            raise ValueError("`url` is required for backend pgvector (postgresql://user:pass@host/db)")
        return self


class SessionsConfig(_Strict):
    retention_days: float | None = Field(default=30, gt=0)
    max_message_chars: int = Field(default=32_000, ge=1)


class KeelConfig(_Strict):
    """The whole file."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    database_url: str | None = None
    redis_url: str | None = None
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)
    accounting: AccountingConfig = Field(default_factory=AccountingConfig)
    models: list[ModelConfig] = Field(min_length=1)
    apps: list[AppConfig] = Field(default_factory=list)
    sessions: SessionsConfig = Field(default_factory=SessionsConfig)
    prompts_dir: str | None = None
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig)
    vector_store: VectorStoreConfig = Field(default_factory=VectorStoreConfig)
    _base_dir: Path | None = PrivateAttr(default=None)  # the config file's folder, set by load_config

    @property
    def base_dir(self) -> Path:
        """The folder relative paths in the file (prompts_dir, app sources, rails) are resolved against: the
        config file's, or the working directory for a config that came from no file."""
        return self._base_dir if self._base_dir is not None else Path.cwd()

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        seen: set[str] = set()
        for m in models:
            if m.name in seen:
                raise ValueError(f"model name {m.name!r} is listed twice; public names must be unique")
            seen.add(m.name)
        return models

    @model_validator(mode="after")
    def _references(self) -> KeelConfig:
        names = [m.name for m in self.models]
        problems = []
        for i, m in enumerate(self.models):
            for kind in ("fallbacks", "context_window_fallbacks"):
                for target in getattr(m, kind):
                    if target not in names:
                        problems.append(f"models[{i}].{kind}: unknown model {target!r}{_suggest(target, names)}")
                    elif target == m.name:
                        problems.append(f"models[{i}].{kind}: a model cannot fall back to itself")
            for d in m.resolved_deployments():
                if d.provider not in _known_providers():
                    known = ", ".join(sorted(_known_providers()))
                    hint = _suggest(d.provider, _known_providers())
                    problems.append(f"models[{i}].provider: unknown provider {d.provider!r}{hint} (known: {known})")
                if d.provider == "local" and d.api_base:
                    problems.append(f"models[{i}].api_base: a local model has no api_base; remove it")
        app_names: set[str] = set()
        for i, app in enumerate(self.apps):
            if app.name in app_names:
                problems.append(f"apps[{i}].name: app {app.name!r} is listed twice")
            app_names.add(app.name)
            for key, target in (("model", app.model), ("history.summary_model", app.history.summary_model)):
                if target is not None and target not in names:
                    problems.append(f"apps[{i}].{key}: unknown model {target!r}{_suggest(target, names)}")
            for direction in ("input", "output"):
                for j, guard in enumerate(getattr(app.guardrails, direction)):
                    if guard.check not in (guards := _known_guards()):
                        known = ", ".join(sorted(guards))
                        hint = _suggest(guard.check, guards)
                        problems.append(
                            f"apps[{i}].guardrails.{direction}[{j}].check: unknown check {guard.check!r}{hint} "
                            f"(installed: {known})"
                        )
        for key in ("downgrade_model", "emergency_model"):
            target = getattr(self.budgets, key)
            if target is not None and target not in names:
                problems.append(f"budgets.{key}: unknown model {target!r}{_suggest(target, names)}")
        if self.budgets.global_daily_usd is not None and self.budgets.emergency_model is None:
            problems.append(
                "budgets.emergency_model: required with global_daily_usd (the model used in emergency mode)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def app(self, name: str | None) -> AppConfig | None:
        """The named app, or the only one when ``name`` is None."""
        if name is None:
            return self.apps[0] if len(self.apps) == 1 else None
        return next((a for a in self.apps if a.name == name), None)


def _known_providers() -> set[str]:
    from importlib.metadata import entry_points

    return set(BUILTIN_PROVIDERS) | {ep.name for ep in entry_points(group="keel.providers")}


@cache
def _known_guards() -> frozenset[str]:
    from importlib.metadata import entry_points

    return frozenset(ep.name for ep in entry_points(group="keel.guards"))


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` (default when unset or empty) and ``${VAR-default}`` (when unset)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        current = env.get(name)
        if op == ":-":
            return current if current else default
        if op == "-":
            return current if current is not None else default
        if current is None:
            raise ConfigError(f"environment variable {name} is not set; set it, or write ${{{name}:-default}}")
        return current

    return _VAR.sub(sub, value)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env) for k, v in node.items()}
    return node


def default_config_path() -> Path:
    """``KEEL_CONFIG`` if set, else the sample app's config in this checkout."""
    env = os.environ.get("KEEL_CONFIG")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "examples" / "phone-assistant" / "keel.yaml"


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> KeelConfig:
    """Read, interpolate and validate a config file. Raises :class:`ConfigError` naming every problem."""
    p = Path(path) if path is not None else default_config_path()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"{p}: cannot read config file ({exc.strerror}); pass --config FILE or set KEEL_CONFIG"
        ) from None
    config = parse_config(text, source=str(p), env=env)
    if config.prompts_dir and not Path(config.prompts_dir).is_absolute():  # relative to the file, like app sources
        config = config.model_copy(update={"prompts_dir": str((p.parent / config.prompts_dir).resolve())})
    config._base_dir = p.parent.resolve()
    return config


def parse_config(text: str, *, source: str = "<config>", env: Mapping[str, str] | None = None) -> KeelConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys (server, models, ...)")
    environ = os.environ if env is None else env
    data = _interpolate_tree(raw, environ)
    master = environ.get("KEEL_MASTER_KEY")
    auth = data.get("auth")
    if master and (auth is None or (isinstance(auth, dict) and not auth.get("master_key"))):
        data["auth"] = {**(auth or {}), "master_key": master}
    try:
        return KeelConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid configuration:\n" + _explain(exc)) from None


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = _loc(err["loc"])
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            parent = _model_at(err["loc"][:-1])
            hint = _suggest(key, parent.model_fields) if parent else ""
            lines.append(f"  - {loc}: unknown key{hint}; remove it or check the spelling")
        elif err["type"] == "missing":
            lines.append(f"  - {loc}: required key is missing; add it")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  - {loc or 'top level'}: {msg}{shown}")
    return "\n".join(lines)


def _loc(parts: tuple[int | str, ...]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """Which model class sits at a validation location, to suggest the right key names."""
    model: type[BaseModel] = KeelConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        nxt = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model
