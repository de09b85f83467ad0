"""Output guardrails on a stream: a sliding window, so a long answer costs a few short checks and the client
still gets text as it comes.

:class:`StreamGuard` works on text. Received text is held until a check has seen it: checks run on the last
``window_chars`` characters (the held text plus what was already sent before it, for patterns that straddle two
pieces) each time a quarter window of new text has arrived, and once more at the end. After a check the held
text goes out, redacted, except its last few characters (:data:`HOLDBACK_CHARS`), which could be the start of an
entity whose end has not arrived yet. A block raises :class:`~keel.errors.GuardrailBlocked`; the route turns it into
an SSE ``error`` event and the stream ends without ``[DONE]`` (see :mod:`keel.api.streaming`). Checks that need the
whole answer (``json_schema``) run once, on all of it, at the end.

:func:`guard_stream` applies one guard per choice to an OpenAI chunk stream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any, Final

from keel.errors import GuardrailBlocked
from keel.guard.base import GuardInput, Span
from keel.guard.runner import GuardRunner, Verdict, redact
from keel.llm.router import PrimedStream

__all__ = ["HOLDBACK_CHARS", "StreamGuard", "guard_stream"]

HOLDBACK_CHARS: Final = 64  # longer than an email address, a card number or an IBAN as usually written


class StreamGuard:
    """Checks one streamed text (see the module docstring). ``template`` supplies everything but the text
    (context, system prompt, schema, embedder); ``on_verdict`` sees every verdict (timings, metrics)."""

    def __init__(
        self,
        runner: GuardRunner,
        template: GuardInput,
        window_chars: int,
        refusal: str,
        on_verdict: Callable[[Verdict], None] | None = None,
        request_id: str | None = None,
    ) -> None:
        self.runner = runner
        self.template = template
        self.window = window_chars
        self.every = max(1, window_chars // 4)
        self.hold = min(HOLDBACK_CHARS, window_chars // 4)
        self.refusal = refusal
        self.on_verdict = on_verdict
        self.request_id = request_id
        self.window_checks = [c for c in runner.checks if not c.whole_text]
        self.whole_checks = [c for c in runner.checks if c.whole_text]
        self._sent = ""  # the end of what went out (unredacted), context for the next window
        self._held = ""  # received, not yet sent
        self._unchecked = 0
        self._all: list[str] | None = [] if self.whole_checks else None  # kept only if a check needs it all

    async def feed(self, text: str) -> str:
        """Take the next piece of the answer; returns what may be sent now (often nothing)."""
        self._held += text
        self._unchecked += len(text)
        if self._all is not None:
            self._all.append(text)
        if self._unchecked < self.every:
            return ""
        return await self._check(final=False)

    async def end(self) -> str:
        """The answer is complete: the last checks, and the rest of the text."""
        out = await self._check(final=True) if self._held or self._unchecked else ""
        if self._all is not None:
            verdict = await self.runner.run(self._input("".join(self._all)), checks=self.whole_checks)
            self._judge(verdict)  # redactions are for window checks: this text has gone out already
        return out

    def _input(self, text: str) -> GuardInput:
        t = self.template
        return GuardInput(
            text,
            t.direction,
            app=t.app,
            context=t.context,
            system_prompt=t.system_prompt,
            schema=t.schema,
            embed=t.embed,
            request=t.request,
        )

    def _judge(self, verdict: Verdict) -> None:
        if self.on_verdict is not None:
            self.on_verdict(verdict)
        if not verdict.allowed:
            raise GuardrailBlocked(self.refusal, reasons=verdict.blocking)

    async def _check(self, *, final: bool) -> str:
        keep = max(0, self.window - len(self._held))
        before = self._sent[len(self._sent) - keep :] if keep else ""
        window = before + self._held
        if self.window_checks:
            verdict = await self.runner.run(self._input(window), checks=self.window_checks, request_id=self.request_id)
            self._judge(verdict)
            spans = verdict.spans
        else:
            spans = []
        offset = len(before)
        mine = [Span(max(s.start, offset) - offset, s.end - offset, s.entity) for s in spans if s.end > offset]
        cut = len(self._held) if final else max(0, len(self._held) - self.hold)
        for s in mine:  # never split an entity: hold it whole until it can be masked whole
            if s.start < cut < s.end:
                cut = s.start
                break
        out = redact(self._held[:cut], [s for s in mine if s.end <= cut])
        self._sent = (self._sent + self._held[:cut])[-self.window :]
        self._held = self._held[cut:]
        self._unchecked = 0
        return out


async def guard_stream(stream: PrimedStream, new_guard: Callable[[], StreamGuard]) -> PrimedStream:
    """``stream`` with each choice's content passed through its own :class:`StreamGuard`. Chunks whose content is
    all held back are dropped (the first one is kept, emptied: it starts the response); what is still held when a
    choice finishes goes out in its ``finish_reason`` chunk. A block raises from the iteration, after closing the
    upstream stream; raised here, for the first chunk, the response has not started."""
    guards: dict[int, StreamGuard] = {}
    finished: set[int] = set()

    async def transform(chunk: dict[str, Any], first: bool = False) -> dict[str, Any] | None:
        choices = chunk.get("choices")
        if not choices:
            return chunk
        changed, held_back = [], True
        for c in choices:
            index = c.get("index", 0)
            delta = c.get("delta") or {}
            content = delta.get("content")
            guard = guards.get(index) or guards.setdefault(index, new_guard())
            text = await guard.feed(content) if isinstance(content, str) and content else None
            if c.get("finish_reason") and index not in finished:
                finished.add(index)
                text = (text or "") + await guard.end()
            if text is not None:
                c = {**c, "delta": {**delta, "content": text}}
            if text != "" or c.get("finish_reason") or not delta.keys() <= {"content"}:
                held_back = False
            changed.append(c)
        if held_back and not first and not chunk.get("usage"):
            return None  # nothing left to say in this chunk
        return {**chunk, "choices": changed}

    try:
        head = await transform(stream.first, first=True)
    except BaseException:
        await stream.close()
        raise
    assert head is not None

    async def rest() -> AsyncGenerator[dict[str, Any], None]:
        async for chunk in stream.rest:
            out = await transform(chunk)
            if out is not None:
                yield out
        for index, guard in guards.items():  # the upstream ended without a finish_reason
            if index not in finished:
                finished.add(index)
                if text := await guard.end():
                    base = {k: v for k, v in stream.first.items() if k not in ("choices", "usage")}
                    yield {**base, "choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]}

    guarded = rest()

    async def close() -> None:
        await guarded.aclose()
        await stream.close()

    return PrimedStream(head, guarded, stream.deadline, close)
