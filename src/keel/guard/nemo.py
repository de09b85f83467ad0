"""``nemo``: a NVIDIA NeMo Guardrails rails config (Colang 1.x) run as one Keel check, fully offline.

Keel runs the rails, not NeMo's chat loop: the check asks "would these rails refuse this text?" and reports each
refusal as a :class:`~keel.guard.base.Finding` named ``nemo.<flow>``; what a finding does (block, warn) is the
app's config, as for any check. A user message runs the config's input rails, then its dialog rails (user intents
and the flows that answer them); an answer runs its output rails.

Everything NeMo would fetch or call is Keel's own, so nothing leaves the process:

- Models: ``engine: keel`` in the rails ``config.yml`` names a Keel model (``model: assistant``), called through
  Keel's :class:`~keel.llm.router.Router` in process (retries, fallbacks, timeouts, the local model), not over
  HTTP. Other engines (``openai`` with ``parameters.base_url``) work as NeMo documents them.
- Embeddings: ``engine: keel`` (what Keel sets when the config names none) is Keel's one shared embedder: the same
  vectors and cache as retrieval and the ``topic`` check, one model in memory. NeMo's default engine, FastEmbed,
  downloads its model at first use, so any other embeddings engine is refused at startup (fastembed is not even
  installed: see ``exclude-dependencies`` in pyproject.toml).
- Dialog: where NeMo would ask the model what to do next (its ``generate_next_steps`` action, reached when no flow
  of the config claimed the message), Keel ends the turn instead: the rails let the message through, and Keel's
  pipeline writes the answer. With ``embeddings_only`` intents, a topical rail costs one embedding, no model call.

What counts as a refusal: an input or output rail that stops (``stop``, or a library rail that blocks), and a
dialog flow of the config that answers the user itself (``bot ...``) or stops. So a Keel rails config holds
refusals, not small talk: a greeting flow would "refuse" hellos.

Failures are not refusals: when a rail's model call or the embedder fails, NeMo logs it and carries on as if the
rail had passed; Keel makes that a failure of the check, so the check's ``on_error`` policy decides, never silently.
NeMo's usage telemetry is switched off (``NEMO_GUARDRAILS_NO_USAGE_STATS=1`` unless set otherwise), and its loggers,
which log prompts and user text at INFO (and a failed action's parameters at WARNING), are kept quieter unless
configured.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from keel.context import RequestContext, on_behalf_of
from keel.errors import KeelError
from keel.guard.base import Direction, Finding, GuardInput

if TYPE_CHECKING:
    from nemoguardrails import RailsConfig
    from nemoguardrails.types import ChatMessage, LLMResponse, LLMResponseChunk

    from keel.llm.router import Router

__all__ = ["ENGINE", "INSTALL_HINT", "NemoCheck"]

log = logging.getLogger("keel.guard")

INSTALL_HINT: Final = (
    "the `nemo` check needs NeMo Guardrails, Keel's optional extra `nemo`: run `make setup` in a Keel checkout "
    "(it runs `uv sync --frozen --inexact --all-groups --extra local --extra nemo`), or `pip install 'keel[nemo]'`"
)
ENGINE: Final = "keel"  # the engine name of Keel's models and embedder in a rails config.yml
NO_MODEL: Final = "none"  # the main model Keel adds to a config that declares none

EmbedFn = Callable[[list[str]], Awaitable[npt.NDArray[np.float32]]]

# The embedder of the check in progress. NeMo builds embedding models by name from a process-wide registry, so the
# one Keel hands each check (``GuardInput.embed``) reaches NeMo through the task's context, not a constructor.
_EMBED: ContextVar[EmbedFn | None] = ContextVar("keel_nemo_embed", default=None)

# The OpenAI chat-completion parameters passed on from NeMo's tasks (temperature ~0 for classification, ...).
_BODY_KEYS: Final = frozenset(
    {"temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "presence_penalty", "frequency_penalty"}
)
_FINISH: Final = frozenset({"stop", "length", "tool_calls", "content_filter"})


class NemoCheck:
    """The NeMo Guardrails config in ``config_dir`` as a check; see the module docstring.

    ``config_dir`` (the one option in keel.yaml): the rails folder, ``config.yml`` and ``*.co`` files; a relative
    path is relative to ``base_dir``. Keel supplies ``base_dir`` (the folder of keel.yaml; without it, the folder
    of ``$KEEL_CONFIG``, else the current directory) and ``router`` (the model router ``engine: keel`` models
    call).

    Construction validates the config and says how to fix it (the extra is missing, Colang 2.x, an embeddings
    engine that would download, a model keel.yaml does not have, a rail that does not exist), so building it costs
    about 0.4 s (NeMo parses its whole flow library), once, at start. The intent examples are embedded on the first
    check, which Keel's guard warm-up runs at start too.
    """

    name = "nemo"

    def __init__(self, *, config_dir: str, base_dir: str | Path | None = None, router: Router | None = None) -> None:
        from keel.llm.router import Router

        if router is not None and not isinstance(router, Router):
            raise ValueError("`router` is Keel's model router, passed by Keel: it cannot be set in keel.yaml")
        nemo = _import_nemo()
        folder = Path(config_dir)
        if not folder.is_absolute():
            folder = _default_base_dir() / folder if base_dir is None else Path(base_dir) / folder
        folder = folder.resolve()
        if not folder.is_dir():
            raise ValueError(f"`config_dir`: {folder} is not a folder (a relative path is relative to keel.yaml)")
        try:
            with warnings.catch_warnings():  # NeMo's defaults trip its own deprecation warnings, on every load
                warnings.simplefilter("ignore", DeprecationWarning)
                config = nemo.RailsConfig.from_path(str(folder))
        except Exception as exc:
            raise ValueError(f"`config_dir`: {folder} is not a valid NeMo Guardrails config: {exc}") from None
        if config.colang_version != "1.0":
            raise ValueError(
                f"`config_dir`: {folder} is Colang {config.colang_version}; Keel runs Colang 1.x configs "
                '(`colang_version: "1.0"`): about 5-50 ms a turn, where 2.x costs 225-570 ms'
            )
        self.config_dir = folder
        self.router = router
        self._config = _bind_models(config, folder, router)
        if router is None and any(_is_keel_model(m) and m.model != NO_MODEL for m in self._config.models):
            log.warning(
                "the nemo check got no model router: its rails that ask a model will fail (on_error applies)",
                extra={"fields": {"config_dir": str(folder)}},
            )
        self._warm = False
        self._warming = asyncio.Lock()
        self._input_rails = bool(config.rails.input.flows)
        self._output_rails = bool(config.rails.output.flows)
        self._dialog = bool(config.user_messages)  # user intents: the dialog rails classify every message
        try:
            self._rails = self._build()
        except Exception as exc:  # a flow that does not exist, a bad prompt, ...
            raise ValueError(f"`config_dir`: {folder}: {exc}") from None
        # The config's own flows: NeMo's system and library flows are marked as such once the rails are built.
        self._flows = frozenset(f["id"] for f in self._rails.config.flows if not f.get("is_system_flow"))

    async def check(self, inp: GuardInput) -> list[Finding]:
        if inp.direction == "input" and not (self._input_rails or self._dialog):
            return []
        if inp.direction == "output" and not self._output_rails:
            return []
        token, caller = _EMBED.set(inp.embed), on_behalf_of.set(inp.request)
        try:
            if self._warm:
                return await self._run(inp.direction, inp.text)
            # NeMo embeds the intent examples on first use, and concurrent first uses race (the later ones search
            # an index still being built): the first check runs alone.
            async with self._warming:
                try:
                    findings = await self._run(inp.direction, inp.text)
                except Exception:
                    # A failed index build leaves NeMo holding an empty index for good: start over, for the next.
                    self._rails = await asyncio.to_thread(self._build)
                    raise
                self._warm = inp.direction == "input" or not self._dialog  # an answer builds no intent index
                return findings
        finally:
            _EMBED.reset(token)
            on_behalf_of.reset(caller)

    async def _run(self, direction: Direction, text: str) -> list[Finding]:
        from nemoguardrails.rails.llm.options import GenerationResponse

        if direction == "input":
            messages = [{"role": "user", "content": text}]
            enabled = {"input": self._input_rails, "dialog": self._dialog, "output": False, "retrieval": False}
        else:
            messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": text}]
            enabled = {"input": False, "dialog": False, "output": True, "retrieval": False}
        # ``state={}``: no history cache inside NeMo (keyed by the messages, it would grow with every new text).
        log_options = {"activated_rails": True, "internal_events": True}
        response = await self._rails.generate_async(
            messages=messages, options={"rails": enabled, "log": log_options}, state={}
        )
        if not isinstance(response, GenerationResponse) or response.log is None:  # NeMo's contract with options
            raise TypeError(f"NeMo returned {type(response).__name__} without a log")
        # NeMo logs an action that raised (the model or the embedder failed) and goes on as if it had passed: the
        # rail would fail open, silently. It is a failure of the check instead, for its on_error policy.
        for event in response.log.internal_events or []:
            if event.get("type") == "InternalSystemActionFinished" and event.get("status") == "failed":
                raise RuntimeError(f"NeMo action {event.get('action_name')!r} failed (see the nemoguardrails log)")
        findings: list[Finding] = []
        for rail in response.log.activated_rails:
            said = [d for d in rail.decisions if d != "stop" and not d.startswith("execute ")]
            if rail.type in ("input", "output") and rail.stop:
                detail = f"NeMo Guardrails {rail.type} rail {rail.name!r} refused the text"
            elif rail.type == "dialog" and rail.name in self._flows and (said or "stop" in rail.decisions):
                detail = f"NeMo Guardrails flow {rail.name!r} answered in place of the model"
                detail += f" (bot {said[-1]})" if said else ""
            else:
                continue
            findings.append(Finding(self.name, f"nemo.{rail.name}", detail))
        return findings

    def _build(self) -> Any:
        """NeMo's ``LLMRails`` for the config, with Keel's end of the turn (0.4 s: NeMo parses its flow library)."""
        from nemoguardrails import LLMRails

        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            rails = LLMRails(self._config)
        rails.register_action(_end_turn, name="generate_next_steps")
        ms = round((time.perf_counter() - started) * 1000)
        log.info("NeMo Guardrails config loaded", extra={"fields": {"config_dir": str(self.config_dir), "ms": ms}})
        return rails


# -- NeMo plumbing -----------------------------------------------------------------------------------------------

_registered = False


def _import_nemo() -> Any:
    """``nemoguardrails`` with Keel's model and embedding engines registered; a ``ValueError`` with the install
    command when the extra is missing (Keel builds its checks at start, so that is when it shows)."""
    global _registered
    os.environ.setdefault("NEMO_GUARDRAILS_NO_USAGE_STATS", "1")  # it would post usage events to NVIDIA
    try:
        import nemoguardrails
        from nemoguardrails.embeddings.providers import register_embedding_provider
        from nemoguardrails.llm.providers import register_provider
    except ImportError as exc:
        raise ValueError(f"{INSTALL_HINT} ({exc})") from None
    if not _registered:
        # NeMo logs prompts and user text at INFO, and a failed action's parameters (the user's message among them)
        # at WARNING; its traceback, at ERROR, is what Keel keeps of that.
        for name, level in (("nemoguardrails", logging.WARNING), ("nemoguardrails.actions", logging.ERROR)):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(level)
        register_embedding_provider(_KeelEmbeddings, ENGINE)
        register_provider(ENGINE, _RouterLLM)
        _registered = True
    return nemoguardrails


def _default_base_dir() -> Path:
    from keel.config import default_config_path

    return default_config_path().parent if os.environ.get("KEEL_CONFIG") else Path.cwd()


def _is_keel_model(m: Any) -> bool:
    return bool(m.type != "embeddings" and m.engine == ENGINE)


def _bind_models(config: RailsConfig, folder: Path, router: Router | None) -> RailsConfig:
    """The config with its ``engine: keel`` models bound to ``router`` and Keel's embedder as its embeddings model,
    once nothing in it would download a model or name one keel.yaml lacks. A config without a main model gets one
    that explains itself if a rail asks it (without one, NeMo warns on every turn)."""
    from nemoguardrails.rails.llm.config import Model

    models: list[Model] = []
    where = f"`config_dir`: {folder}/config.yml"
    for m in config.models:
        if m.type == "embeddings" and m.engine != ENGINE:
            raise ValueError(
                f"{where}: embeddings engine {m.engine!r}: Keel runs NeMo with its shared embedder (NeMo's engines "
                f"download their models); set `engine: {ENGINE}` or remove the embeddings model"
            )
        if _is_keel_model(m):
            if router is not None and m.model not in router.names:
                known = ", ".join(router.names)
                raise ValueError(f"{where}: the {m.type} model {m.model!r} is not in keel.yaml (models: {known})")
            m = m.model_copy(update={"parameters": {**m.parameters, "keel_router": router}})
        models.append(m)
    if not any(m.type == "embeddings" for m in models):
        models.append(Model(type="embeddings", engine=ENGINE, model="shared"))
    if not any(m.type == "main" for m in models):
        models.append(Model(type="main", engine=ENGINE, model=NO_MODEL, parameters={"keel_router": None}))
    return config.model_copy(update={"models": models})


class _KeelEmbeddings:
    """NeMo embedding engine ``keel``: the shared embedder of the check in progress (see ``_EMBED``)."""

    engine_name = ENGINE

    def __init__(self, embedding_model: str, **_: Any) -> None:
        self.embedding_model = embedding_model

    async def encode_async(self, documents: list[str]) -> list[list[float]]:
        embed = _EMBED.get()
        if embed is None:
            raise RuntimeError("the nemo check ran without an embedder (Keel's guardrails pass their shared one)")
        vectors = np.asarray(await embed(list(documents)), dtype=np.float32)
        return [row.tolist() for row in vectors]

    def encode(self, documents: list[str]) -> list[list[float]]:
        raise RuntimeError("Keel's embedder is asynchronous; NeMo's rails call encode_async")


class _RouterLLM:
    """NeMo model engine ``keel`` (NeMo's ``LLMModel`` protocol): chat completions through Keel's router."""

    def __init__(self, model: str, keel_router: Router | None = None, **parameters: Any) -> None:
        self._model = model
        self._keel_router = keel_router
        self._defaults = {k: v for k, v in parameters.items() if k in _BODY_KEYS}

    @property
    def model_name(self) -> str:
        return self._model

    @property
    def provider_name(self) -> str:
        return ENGINE

    @property
    def provider_url(self) -> str | None:
        return None

    async def generate_async(
        self, prompt: str | list[ChatMessage], *, stop: list[str] | None = None, **kwargs: Any
    ) -> LLMResponse:
        from nemoguardrails.types import LLMResponse, UsageInfo

        ctx, router = self._request(prompt, stop, kwargs)
        async with _billed(ctx):
            result = await router.complete(ctx, ctx.body)
            usage = result.get("usage") or {}
            ctx.usage = usage if isinstance(usage, dict) and usage else None
        choice = (result.get("choices") or [{}])[0]
        reason = choice.get("finish_reason")
        return LLMResponse(
            content=(choice.get("message") or {}).get("content") or "",
            model=result.get("model"),
            finish_reason=reason if reason in _FINISH else "other",
            request_id=result.get("id"),
            usage=UsageInfo(
                input_tokens=int(usage.get("prompt_tokens") or 0),
                output_tokens=int(usage.get("completion_tokens") or 0),
                total_tokens=int(usage.get("total_tokens") or 0),
            ),
        )

    async def stream_async(
        self, prompt: str | list[ChatMessage], *, stop: list[str] | None = None, **kwargs: Any
    ) -> AsyncIterator[LLMResponseChunk]:
        from nemoguardrails.types import LLMResponseChunk

        ctx, router = self._request(prompt, stop, kwargs)
        async with _billed(ctx):
            async for chunk in await router.stream(ctx, ctx.body):
                if isinstance(chunk.get("usage"), dict):
                    ctx.usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    reason = choice.get("finish_reason")
                    if text or reason:
                        yield LLMResponseChunk(delta_content=text, finish_reason=reason if reason in _FINISH else None)

    def _request(
        self, prompt: str | list[ChatMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[RequestContext, Router]:
        if self._keel_router is None:
            raise RuntimeError(
                "a NeMo rail asked for a model, but the rails config names none: add a `type: main` model with "
                "`engine: keel` and `model:` one of keel.yaml's models"
                if self._model == NO_MODEL
                else f"a NeMo rail asked model {self._model!r}, but Keel passed no model router to the nemo check"
            )
        if isinstance(prompt, str):
            messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
        else:
            messages = [{"role": m.role.value, "content": m.content or ""} for m in prompt]
        body: dict[str, Any] = {"model": self._model, "messages": messages, **self._defaults}
        body.update({k: v for k, v in kwargs.items() if k in _BODY_KEYS and v is not None})
        if stop:
            body["stop"] = stop[:4]  # OpenAI's limit
        caller = on_behalf_of.get()
        if caller is None:
            ctx = RequestContext(request_id="nemo_" + secrets.token_hex(12), route="guard.nemo", body=body)
        else:
            request_id = f"{caller.request_id}:nemo:{len(caller.side_calls) + 1}"
            ctx = RequestContext(request_id=request_id, route="guard.nemo", body=body, principal=caller.principal)
            caller.side_calls.append(ctx)
        ctx.public_model = self._model
        return ctx, self._keel_router


@asynccontextmanager
async def _billed(ctx: RequestContext) -> AsyncIterator[None]:
    """Ends a rail's model call: how long it took and how it went. A call made for a Keel request is recorded with
    that request (its own ledger row and log line, its cost in the request's budgets); one made outside any, by a
    check run on its own, only gets its log line and metrics, here."""
    from keel.pipeline.accounting import record_request

    try:
        yield
    except KeelError as exc:
        ctx.fail(exc)
        raise
    except asyncio.CancelledError:
        ctx.status, ctx.outcome = 499, "client_closed"
        raise
    finally:
        ctx.ended = time.perf_counter()
        if on_behalf_of.get() is None:
            record_request(ctx)


async def _end_turn(**_: Any) -> Any:
    """Stands in for NeMo's ``generate_next_steps``: no flow claimed the message, so the rails let it through and
    Keel, not NeMo, asks the model for the answer."""
    from nemoguardrails.actions.actions import ActionResult

    return ActionResult(events=[])


_end_turn.action_meta = {  # type: ignore[attr-defined]  # what NeMo's @action decorator would set
    "name": "generate_next_steps",
    "is_system_action": True,
    "execute_async": False,
}
