"""``provider: local``: a GGUF model run in process by llama.cpp, so Keel answers with no API key and no network.

One llama.cpp context serves one request at a time, so requests take turns: a fair FIFO queue bounded by
``local.max_queue`` (full → ``Overloaded`` at once; waiting longer than ``local.queue_timeout_s`` → ``Overloaded``).
Generation runs on one worker thread and hands tokens to the event loop as they are produced; a cancelled request
(client gone, router deadline) leaves the queue at once or stops within one token (one prefill batch while reading
the prompt), which is what frees the model for the next request.

The model loads in the background from construction on; ``ready()`` reports the stage and requests wait for it.
Consecutive requests that share a prefix (a growing conversation) reuse llama.cpp's KV cache for that prefix.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import contextlib
import ctypes
import importlib
import importlib.util
import json
import math
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel.config import ConfigError, Deployment, LocalModelConfig
from keel.errors import ContextWindowExceeded, InvalidRequest, Overloaded, ProviderError, UpstreamError
from keel.llm.base import ProviderInfo, Timeouts
from keel.llm.local_models import INSTALL_SCRIPT, ModelFile, locate_model

__all__ = ["INSTALL_HINT", "LocalProvider"]

INSTALL_HINT = (
    f"{INSTALL_SCRIPT} (builds llama.cpp from source: 7-10 minutes on 2 cores the first time), "
    "or: uv sync --inexact --all-groups --extra local"
)
# Prompt tokens per llama.cpp call while prefilling. Measured with the 0.5B model on 2 cores: 64-token batches
# prefill at ~121 tokens/s against ~126 for 512-token ones, and a cancelled request stops within ~0.5 s, not ~4 s.
_PREFILL_BATCH = 64
# llama.cpp's own defaults, used where neither the catalog nor the request says otherwise.
_SAMPLING_DEFAULTS: Mapping[str, float] = {
    "temperature": 0.8,
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.05,
    "repeat_penalty": 1.0,
}


def _default_threads() -> int:
    """All cores but one. llama.cpp's threads meet at a spin barrier several times per token, so when any other
    process (or Keel's own event loop) needs a core, a thread per core stalls them all: on 2 cores with one busy
    neighbour, 2 threads generated 2-5 tokens/s where 1 thread kept ~20. Set ``local.threads`` on a dedicated box."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


# --- the typed boundary around llama_cpp (its annotations are partial; everything crossing is converted) ---------


class _Cancelled(Exception):
    """Raised inside the worker thread when the request's owner went away."""


@dataclass(frozen=True, slots=True)
class _Sampling:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float
    seed: int | None


class _Engine:
    """One loaded llama.cpp model and context. Generation methods run on the worker thread only; tokenizing and
    rendering only read the vocabulary and template and are safe from any thread."""

    def __init__(self, path: Path, n_ctx: int, threads: int) -> None:
        lc: Any = importlib.import_module("llama_cpp")
        self._lc = lc
        self._llm: Any = lc.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self._vocab: Any = lc.llama_model_get_vocab(self._llm.model)
        self.n_ctx = int(self._llm.n_ctx())
        self.n_ctx_train = int(lc.llama_model_n_ctx_train(self._llm.model))
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            self.close()
            raise ConfigError(f"{path} has no chat template in its GGUF metadata; use an instruction-tuned chat model")
        self._formatter: Any = importlib.import_module("llama_cpp.llama_chat_format").Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(int(lc.llama_vocab_eos(self._vocab))),
            bos_token=self._token_text(int(lc.llama_vocab_bos(self._vocab))),
        )
        self._piece_buf = ctypes.create_string_buffer(256)
        # Sampling buffers, reused every token: all candidates (numpy-backed), and one for probing the grammar.
        self._np: Any = importlib.import_module("numpy")
        self._n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self._candidates: Any = importlib.import_module("llama_cpp._internals").LlamaTokenDataArray(
            n_vocab=self._n_vocab
        )
        # Tokenizing runs on other threads than generation; this keeps close() from freeing the vocabulary under it.
        self._guard = threading.Lock()
        self._closed = False
        self._probe_data: Any = (lc.llama_token_data * 1)()
        self._probe: Any = lc.llama_token_data_array(data=self._probe_data, size=1, selected=-1, sorted=False)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(self._lc.llama_vocab_get_text(self._vocab, token)).decode("utf-8", "replace")

    def prompt_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        """Render the GGUF's chat template (with the assistant turn opened) and tokenize it, special tokens parsed.

        The template writes any BOS itself, as Hugging Face's tokenizer would, so none is added here.
        """
        prompt = str(self._formatter(messages=messages).prompt).encode("utf-8")
        with self._guard:
            if self._closed:
                raise RuntimeError("the local model has been unloaded")
            return [int(t) for t in self._llm.tokenize(prompt, add_bos=False, special=True)]

    @staticmethod
    def json_grammar(schema: Mapping[str, Any] | None) -> str:
        """GBNF accepting any JSON object, or only JSON matching ``schema``."""
        grammar: Any = importlib.import_module("llama_cpp.llama_grammar")
        if schema is None:
            return str(grammar.JSON_GBNF)
        return str(grammar.json_schema_to_gbnf(json.dumps(schema)))

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self._vocab, token))

    def piece(self, token: int) -> bytes:
        """The bytes of one token (possibly part of a UTF-8 character); special tokens render as nothing."""
        n = int(self._lc.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False))
        if n < 0:  # a piece longer than the buffer: grow it once to the size llama.cpp asked for
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = int(self._lc.llama_token_to_piece(self._vocab, token, self._piece_buf, -n, 0, False))
        return bytes(self._piece_buf.raw[:n])

    def prefill(self, tokens: Sequence[int], cancelled: Callable[[], bool]) -> int:
        """Evaluate all prompt tokens but the last (``generate`` feeds that one), reusing the KV cache for the prefix
        shared with the previous request; returns how many tokens were reused. Batches are small so that a
        cancelled request stops between them."""
        llm = self._llm
        cached: list[int] = llm.input_ids[: llm.n_tokens].tolist()
        limit = min(len(cached), len(tokens) - 1)
        keep = 0
        while keep < limit and cached[keep] == tokens[keep]:
            keep += 1
        llm.n_tokens = keep
        for start in range(keep, len(tokens) - 1, _PREFILL_BATCH):
            if cancelled():
                raise _Cancelled
            llm.eval(tokens[start : min(start + _PREFILL_BATCH, len(tokens) - 1)])
        return keep

    def generate(self, tokens: Sequence[int], sampling: _Sampling, grammar: str | None) -> Generator[int, None, None]:
        """Sample after :meth:`prefill`, one token per step, until the caller stops iterating.

        With a grammar, the freely sampled token is checked against it first and the grammar masks the whole
        vocabulary only when that token is refused (llama.cpp's common/sampling.cpp does the same): masking all
        150k Qwen tokens at every step costs more than the model itself.
        """
        lc, llm = self._lc, self._llm
        chain = self._chain(sampling)
        checker = None if grammar is None else lc.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        try:
            if grammar is not None and not checker:
                raise ValueError("llama.cpp rejected the grammar built for response_format")
            llm.eval(list(tokens[llm.n_tokens :]))
            while True:
                token = self._sample(chain, checker)
                yield token
                llm.eval([token])
        finally:
            lc.llama_sampler_free(chain)
            if checker:
                lc.llama_sampler_free(checker)

    def _chain(self, s: _Sampling) -> Any:
        """llama-cpp-python's sampler order (penalties, top-k, top-p, min-p, temperature, draw), without grammar."""
        lc = self._lc
        penalties = (s.repeat_penalty, s.frequency_penalty, s.presence_penalty)
        stages = [lc.llama_sampler_init_penalties(self._n_vocab, 64, *penalties)]
        if s.temperature <= 0:
            stages.append(lc.llama_sampler_init_greedy())
        else:
            seed = lc.LLAMA_DEFAULT_SEED if s.seed is None else s.seed & 0xFFFFFFFF
            stages += [
                lc.llama_sampler_init_top_k(s.top_k),
                lc.llama_sampler_init_top_p(s.top_p, 1),
                lc.llama_sampler_init_min_p(s.min_p, 1),
                lc.llama_sampler_init_temp(s.temperature),
                lc.llama_sampler_init_dist(seed),
            ]
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        for stage in stages:
            lc.llama_sampler_chain_add(chain, stage)  # the chain owns and frees its stages
        return chain

    def _sample(self, chain: Any, grammar: Any) -> int:
        lc = self._lc
        logits = self._np.ctypeslib.as_array(lc.llama_get_logits_ith(self._llm.ctx, -1), shape=(self._n_vocab,))
        token = self._pick(chain, logits, None)
        if grammar:
            probe, entry = self._probe, self._probe_data[0]
            entry.id, entry.logit, entry.p = token, 0.0, 0.0
            probe.size, probe.selected, probe.sorted = 1, -1, False
            lc.llama_sampler_apply(grammar, ctypes.byref(probe))
            if entry.logit == -math.inf:
                token = self._pick(chain, logits, grammar)
            lc.llama_sampler_accept(grammar, token)
        lc.llama_sampler_accept(chain, token)
        return token

    def _pick(self, chain: Any, logits: Any, grammar: Any) -> int:
        candidates = self._candidates
        candidates.copy_logits(logits)
        array = candidates.candidates
        array.selected = -1
        if grammar:
            self._lc.llama_sampler_apply(grammar, ctypes.byref(array))
        self._lc.llama_sampler_apply(chain, ctypes.byref(array))
        return int(candidates.candidates_data.id[array.selected])

    def close(self) -> None:
        with self._guard:
            self._closed = True
            self._llm.close()


# --- admission: one model context, many requests --------------------------------------------------------------


class _FairSlot:
    """A one-holder lock with a bounded FIFO wait queue. Thread-safe: the worker thread releases it when it is
    really done with the model, not when the awaiting task gave up, so two generations never overlap."""

    def __init__(self, label: str, max_queue: int, timeout_s: float) -> None:
        self._label = label
        self._max_queue = max_queue
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._busy = False
        self._closed = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        with self._lock:
            if self._closed:
                raise Overloaded(f"local model {self._label} is shutting down")
            if not self._busy:
                self._busy = True
                return
            if len(self._waiters) >= self._max_queue:
                raise Overloaded(
                    f"local model {self._label} is busy and {len(self._waiters)} requests are already waiting "
                    f"(local.max_queue={self._max_queue}); retry later"
                )
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
        try:
            done, _ = await asyncio.wait({waiter}, timeout=self._timeout_s)
        except BaseException:
            self._abandon(waiter)
            raise
        if not done:
            self._abandon(waiter)
            raise Overloaded(
                f"local model {self._label}: waited {self._timeout_s:g} s in the queue "
                f"(local.queue_timeout_s) without getting a turn; retry later"
            )
        waiter.result()  # raises Overloaded when the slot was closed while waiting

    def _abandon(self, waiter: asyncio.Future[None]) -> None:
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                waiter.cancel()
                return
        # Already handed to us (the grant may still be in flight): pass it on, or let _grant do so once cancelled.
        if not waiter.cancel() and waiter.exception() is None:
            self.release()

    def release(self) -> None:
        with self._lock:
            if not self._waiters:
                self._busy = False
                return
            waiter = self._waiters.popleft()
        try:
            waiter.get_loop().call_soon_threadsafe(self._grant, waiter)
        except RuntimeError:  # that waiter's event loop is closed
            self.release()

    def _grant(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            self.release()
        else:
            waiter.set_result(None)

    def close(self) -> None:
        """Refuse new requests and fail everyone waiting; the current holder finishes (or is cancelled) normally."""
        with self._lock:
            self._closed = True
            waiters, self._waiters = list(self._waiters), deque()
        for waiter in waiters:
            with contextlib.suppress(RuntimeError):
                waiter.get_loop().call_soon_threadsafe(self._fail, waiter)

    def _fail(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(Overloaded(f"local model {self._label} is shutting down"))


# --- requests ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Request:
    messages: list[dict[str, Any]]
    max_tokens: int
    stop: tuple[str, ...]
    sampling: _Sampling
    json_schema: Mapping[str, Any] | None
    json_mode: bool
    include_usage: bool


@dataclass(frozen=True, slots=True)
class _Finish:
    reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class _Job:
    """One request's link between the event loop and the worker thread."""

    request: _Request
    prompt: list[int]
    grammar: str | None
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    # Text deltas, then a _Finish or an error, then None (the worker is done with the model).
    events: asyncio.Queue[str | _Finish | ProviderError | None] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: str | _Finish | ProviderError | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            self.cancelled.set()


class _TextStream:
    """Token bytes in, text deltas out: completes split UTF-8 characters and holds back any tail that could be the
    start of a stop sequence, so a stop sequence is never streamed to the client."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = stops
        self._pending = ""

    def push(self, data: bytes) -> tuple[str, bool]:
        """(text safe to send, whether a stop sequence was reached)."""
        self._pending += self._decoder.decode(data)
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        cut = len(self._pending) - self._held()
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def _held(self) -> int:
        """Length of the longest tail of the pending text that begins some stop sequence."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        out, self._pending = self._pending + self._decoder.decode(b"", final=True), ""
        return out


def _number(body: Mapping[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise InvalidRequest(f"{key} must be a number between {lo:g} and {hi:g}", param=key)
    return float(value)


def _text_of(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequest(
                    f"messages[{index}]: local models take text only, not {kind!r} content parts",
                    param=f"messages[{index}].content",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequest(f"messages[{index}].content must be a string or a list of text parts", param="messages")


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a role", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text_of(m.get("content"), i)})
    return out


def _response_format(body: Mapping[str, Any]) -> tuple[bool, Mapping[str, Any] | None]:
    """(json_mode, schema) from ``response_format``."""
    fmt = body.get("response_format")
    if fmt is None:
        return False, None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest(
                "response_format.json_schema.schema must be a JSON Schema object", param="response_format"
            )
        return True, schema
    raise InvalidRequest("response_format.type must be text, json_object or json_schema", param="response_format")


class LocalProvider:
    """A deployment served by an in-process llama.cpp model (``provider: local``)."""

    def __init__(self, deployment: Deployment, client: object | None = None) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ConfigError(
                f"models: {deployment.public_name!r} uses provider: local, which needs llama-cpp-python; "
                f"install it with: {INSTALL_HINT}"
            )
        self.deployment = deployment
        self._config = local = deployment.local or LocalModelConfig()
        self._file: ModelFile = locate_model(local.path or deployment.model, local.sha256)
        shipped = self._file.shipped
        n_ctx = local.context_window
        if shipped is not None:
            if "context_window" not in local.model_fields_set:
                n_ctx = shipped.default_context_window
            n_ctx = min(n_ctx, shipped.n_ctx_train)
        self._threads = local.threads or _default_threads()
        self._sampling_defaults = {**_SAMPLING_DEFAULTS, **(shipped.sampling if shipped else {})}
        self.info = ProviderInfo(
            interface="local",
            model=deployment.model,
            context_window=n_ctx,
            details={"path": str(self._file.path), "sha256": self._file.sha256, "threads": self._threads},
        )
        self._slot = _FairSlot(deployment.id, local.max_queue, local.queue_timeout_s)
        self._jobs: set[_Job] = set()
        self._stage = "waiting to load"
        self._closing = False
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"keel-local-{deployment.id}")
        self._loaded = self._executor.submit(self._load, n_ctx)

    # --- lifecycle -------------------------------------------------------------------------------------------

    def _load(self, n_ctx: int) -> _Engine:
        started = time.monotonic()
        self._stage = "verifying model file" if len(self._file.sources) < 2 else "assembling and verifying model"
        path = self._file.materialize()
        self._stage = f"loading {path.name} into llama.cpp"
        engine = _Engine(path, n_ctx, self._threads)
        self.info = ProviderInfo(
            interface="local",
            model=self.deployment.model,
            context_window=engine.n_ctx,
            details={**self.info.details, "path": str(path), "n_ctx_train": engine.n_ctx_train},
        )
        self._stage = f"loaded in {time.monotonic() - started:.1f} s"
        return engine

    async def _engine(self) -> _Engine:
        if self._closing:
            raise Overloaded(f"local model {self.deployment.id} is shutting down")
        try:
            return await asyncio.shield(asyncio.wrap_future(self._loaded))
        except Exception as exc:
            raise UpstreamError(
                f"local model {self.deployment.id} failed to load: {exc}", deployment=self.deployment.id
            ) from exc

    async def ready(self) -> tuple[bool, str]:
        name = self.deployment.model
        if not self._loaded.done():
            return False, f"local {name}: {self._stage}"
        if (exc := self._loaded.exception()) is not None:
            return False, f"local {name} failed to load: {exc}"
        state = "generating" if self._slot.busy else "idle"
        return True, (
            f"local {name} ({self._stage}; n_ctx={self.info.context_window}, threads={self._threads}; {state}, "
            f"{self._slot.waiting}/{self._config.max_queue} queued)"
        )

    async def aclose(self) -> None:
        self._closing = True
        self._slot.close()
        for job in list(self._jobs):
            job.cancelled.set()
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._loaded.done() and not self._loaded.cancelled() and self._loaded.exception() is None:
            self._loaded.result().close()

    # --- token counting -------------------------------------------------------------------------------------

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Prompt tokens for ``messages`` as this model will see them (chat template included), by the model's
        own tokenizer. Blocks until the model has loaded; tokenizing is safe alongside a running generation."""
        return len(self._loaded.result().prompt_tokens(_messages({"messages": messages})))

    # --- the Provider protocol ------------------------------------------------------------------------------

    def _parse(self, body: Mapping[str, Any]) -> _Request:
        if body.get("tools") or body.get("functions"):
            param = "tools" if body.get("tools") else "functions"
            raise InvalidRequest(
                "local models do not support tool calling (small local models do not call tools reliably); "
                "route tool requests to a hosted model",
                param=param,
            )
        if body.get("n") not in (None, 1):
            raise InvalidRequest("local models generate one choice: n must be 1", param="n")
        if body.get("logprobs"):
            raise InvalidRequest("local models do not return logprobs", param="logprobs")
        messages = _messages(body)
        limit = self._config.max_output_tokens
        requested = body.get("max_completion_tokens", body.get("max_tokens"))
        if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
            raise InvalidRequest("max_tokens must be a positive integer", param="max_tokens")
        stop = body.get("stop")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise InvalidRequest("stop must be a non-empty string or a list of them", param="stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidRequest("seed must be an integer", param="seed")
        d = self._sampling_defaults
        temperature = _number(body, "temperature", 0, 2)
        top_p = _number(body, "top_p", 0, 1)
        json_mode, schema = _response_format(body)
        options = body.get("stream_options")
        return _Request(
            messages=messages,
            max_tokens=min(requested or limit, limit),
            stop=stops,
            sampling=_Sampling(
                temperature=d["temperature"] if temperature is None else temperature,
                top_p=d["top_p"] if top_p is None else top_p,
                top_k=int(d["top_k"]),
                min_p=d["min_p"],
                repeat_penalty=d["repeat_penalty"],
                frequency_penalty=_number(body, "frequency_penalty", -2, 2) or 0.0,
                presence_penalty=_number(body, "presence_penalty", -2, 2) or 0.0,
                seed=seed,
            ),
            json_schema=schema,
            json_mode=json_mode,
            include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        )

    async def _events(self, request: _Request) -> AsyncGenerator[str | _Finish, None]:
        """Queue, generate and yield text deltas then one :class:`_Finish`. Everything that can be refused
        (context window, bad schema, full queue) is refused before the first item."""
        did = self.deployment.id
        engine = await self._engine()
        prompt = await asyncio.to_thread(engine.prompt_tokens, request.messages)
        room = engine.n_ctx - len(prompt)
        if room < 1:
            raise ContextWindowExceeded(
                f"the prompt is {len(prompt)} tokens but local model {did} has a context window of {engine.n_ctx} "
                "tokens (prompt and answer together); shorten the conversation",
                deployment=did,
            )
        grammar = None
        if request.json_mode:
            try:
                grammar = engine.json_grammar(request.json_schema)
            except Exception as exc:  # the converter raises bare exceptions for schema features it lacks
                raise InvalidRequest(
                    f"response_format: cannot turn this JSON Schema into a grammar: {exc}", param="response_format"
                ) from exc
        job = _Job(request, prompt, grammar, min(request.max_tokens, room), asyncio.get_running_loop())
        await self._slot.acquire()
        try:
            self._executor.submit(self._work, job)
        except RuntimeError:  # executor shut down by aclose() meanwhile
            self._slot.release()
            raise Overloaded(f"local model {did} is shutting down") from None
        self._jobs.add(job)
        try:
            while (event := await job.events.get()) is not None:
                if isinstance(event, ProviderError):
                    raise event
                yield event
        finally:
            job.cancelled.set()
            self._jobs.discard(job)

    def _work(self, job: _Job) -> None:
        """Runs on the worker thread and holds the slot until the model is free again."""
        try:
            engine = self._loaded.result()
            cached = engine.prefill(job.prompt, job.cancelled.is_set)
            text = _TextStream(job.request.stop)
            reason, produced = "length", 0
            with contextlib.closing(engine.generate(job.prompt, job.request.sampling, job.grammar)) as tokens:
                for token in tokens:
                    if job.cancelled.is_set():
                        raise _Cancelled
                    if engine.is_eog(token):
                        reason = "stop"
                        break
                    produced += 1
                    delta, stopped = text.push(engine.piece(token))
                    if delta:
                        job.emit(delta)
                    if stopped:
                        reason = "stop"
                        break
                    if produced >= job.max_tokens:
                        break
            if tail := text.flush():
                job.emit(tail)
            job.emit(_Finish(reason, len(job.prompt), cached, produced))
        except _Cancelled:
            pass
        except Exception as exc:
            did = self.deployment.id
            job.emit(UpstreamError(f"local model {did} failed while generating: {exc}", deployment=did))
        finally:
            job.emit(None)
            self._slot.release()

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.deployment.model,
            "system_fingerprint": None,
        }

    @staticmethod
    def _usage(finish: _Finish) -> dict[str, Any]:
        """OpenAI's usage object; ``cached_tokens`` counts prompt tokens served from llama.cpp's KV cache."""
        return {
            "prompt_tokens": finish.prompt_tokens,
            "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finish.cached_tokens},
        }

    async def complete(self, body: dict[str, Any], timeouts: Timeouts) -> dict[str, Any]:
        request = self._parse(body)
        parts: list[str] = []
        finish: _Finish | None = None
        events = self._events(request)
        try:
            async for event in events:
                if isinstance(event, _Finish):
                    finish = event
                else:
                    parts.append(event)
        finally:
            await events.aclose()
        if finish is None:
            raise UpstreamError(
                f"local model {self.deployment.id} stopped without finishing", deployment=self.deployment.id
            )
        message = {"role": "assistant", "content": "".join(parts), "refusal": None}
        return {
            **self._envelope("chat.completion"),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish.reason}],
            "usage": self._usage(finish),
        }

    async def stream(self, body: dict[str, Any], timeouts: Timeouts) -> AsyncIterator[dict[str, Any]]:
        request = self._parse(body)
        envelope = self._envelope("chat.completion.chunk")
        extra = {"usage": None} if request.include_usage else {}

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**envelope, "choices": [choice], **extra}

        events = self._events(request)
        try:
            first = True
            async for event in events:
                if first:
                    # Sent with the first token, as HTTP upstreams do: queueing, refusals and prefill all happen
                    # before the first chunk, where the router can still retry elsewhere.
                    yield chunk({"role": "assistant", "content": ""})
                    first = False
                if isinstance(event, _Finish):
                    yield chunk({}, event.reason)
                    if request.include_usage:
                        yield {**envelope, "choices": [], "usage": self._usage(event)}
                    return
                yield chunk({"content": event})
        finally:
            await events.aclose()
        raise UpstreamError(
            f"local model {self.deployment.id} stopped without finishing", deployment=self.deployment.id
        )

    async def embed(self, body: dict[str, Any], timeouts: Timeouts) -> dict[str, Any]:
        raise InvalidRequest(
            f"model {self.deployment.public_name!r} is a local chat model and does not produce embeddings",
            param="model",
        )
